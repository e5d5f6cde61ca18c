//! `llamavid-cameras` headless on the fixture model: three live test cameras on one model for
//! two seconds; every camera prints its captions under its own name, the video keeps the live
//! pace, and the summary shows frames encoded in batches.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixture's model directory (`LLAMAVID_FIXTURE`, else `../shared/fixtures/llamavid-tiny-a`).
fn fixture_model() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = match std::env::var_os("LLAMAVID_FIXTURE") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => repo.join(dir),
        None => repo.join("../shared/fixtures/llamavid-tiny-a"),
    };
    std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("config.json").is_file() && p.join("vision_config.json").exists())
        .unwrap_or_else(|| panic!("no model directory in {}", root.display()))
}

#[test]
fn three_cameras_on_one_model_each_caption_under_their_name() {
    let model = fixture_model();
    let output = Command::new(env!("CARGO_BIN_EXE_llamavid-cameras"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--cameras",
            "3",
            "--seconds",
            "2",
        ])
        .args([
            "--source",
            "videotestsrc is-live=true pattern={k} ! video/x-raw,width=64,height=48,framerate=10/1",
        ])
        .args(["--set", "device=cpu", "--set", "sample-interval=100"])
        .args(["--set", "caption-interval=500", "--set", "max-new-tokens=4"])
        .output()
        .expect("llamavid-cameras runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for k in 0..3 {
        let captions = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("camera-{k} [")))
            .count();
        assert!(
            captions >= 2,
            "camera-{k}: {captions} captions in 2 s:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!("camera-{k}: ")),
            "camera-{k}'s summary:\n{stdout}"
        );
    }
    let batched: u64 = stdout
        .lines()
        .filter_map(|l| l.split_once(" frames encoded ("))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    println!("{stdout}");
    assert!(batched > 0, "no frame encoded in a batch:\n{stdout}");
}
