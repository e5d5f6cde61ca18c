//! The command-line tools and the README's first command (`examples/caption-video.sh`), run on
//! the fixture model served by the hub test double (`HubMirrorDouble`) through HF_ENDPOINT:
//! what a newcomer's first run does, without the real hub.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use llamavid_gst_tests::hub_mirror::FixtureHub;
use llamavid_gst_tests::{run_tool, ToolOutput};

const TIMEOUT: Duration = Duration::from_secs(600);

fn tool(name: &str, args: &[&str], env: &[(String, String)]) -> ToolOutput {
    let mut cmd = Command::new(name);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    run_tool(cmd, TIMEOUT)
}

/// `key=value` lines of llamavid-fetch.
fn value<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{stdout}"))
}

/// Three PNG frames made by GStreamer.
fn frames(dir: &Path) {
    let location = format!("location={}/frame-%02d.png", dir.display());
    let output = tool(
        "gst-launch-1.0",
        &[
            "videotestsrc",
            "num-buffers=3",
            "pattern=ball",
            "!",
            "video/x-raw,width=64,height=48",
            "!",
            "videoconvert",
            "!",
            "pngenc",
            "!",
            "multifilesink",
            &location,
        ],
        &[],
    );
    assert!(output.success, "{}", output.all());
}

#[test]
fn llamavid_fetch_and_llamavid_caption_take_a_hub_id() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let env = hub.env(home.path());
    let fetch = env!("CARGO_BIN_EXE_llamavid-fetch");

    let output = tool(
        fetch,
        &["--vision-tower", &hub.eva_url, &hub.model_id],
        &env,
    );
    assert!(output.success, "{}", output.all());
    assert_eq!(value(&output.stdout, "model"), hub.pinned_id());
    let model_dir = value(&output.stdout, "model-dir");
    assert!(
        model_dir.starts_with(&home.path().display().to_string()),
        "{model_dir}"
    );
    assert!(Path::new(model_dir).join("config.json").is_file());
    let vision_tower = value(&output.stdout, "vision-tower").to_owned();
    assert!(Path::new(&vision_tower).is_file());
    let weights: u64 = value(&output.stdout, "weights-bytes").parse().unwrap();
    assert!(weights > 1_000_000, "{weights}");
    // Not a terminal: plain progress lines.
    assert!(output.stderr.contains("Downloading "), "{}", output.stderr);
    assert!(output.stderr.contains("100% of"), "{}", output.stderr);

    // The pinned id it printed loads with no request at all.
    hub.mirror.clear_log();
    let again = tool(
        fetch,
        &["--vision-tower", &vision_tower, &hub.pinned_id()],
        &env,
    );
    assert!(again.success, "{}", again.all());
    assert_eq!(hub.mirror.requests(), vec![]);

    let dir = tempfile::tempdir().unwrap();
    frames(dir.path());
    let caption = tool(
        env!("CARGO_BIN_EXE_llamavid-caption"),
        &[
            "--model",
            &hub.pinned_id(),
            "--vision-tower",
            &vision_tower,
            "--max-new-tokens",
            "4",
            dir.path().to_str().unwrap(),
        ],
        &env,
    );
    assert!(caption.success, "{}", caption.all());
    assert!(
        caption.stderr.contains("3 frames sampled"),
        "{}",
        caption.stderr
    );
    assert!(
        !caption.stdout.trim().is_empty(),
        "no caption:\n{}",
        caption.all()
    );
    assert_eq!(hub.mirror.requests(), vec![]);

    // Errors name the repository and say what to do.
    let missing = tool(fetch, &["test/no-such-model"], &env);
    assert!(!missing.success);
    assert!(
        missing.stderr.contains("test/no-such-model") && missing.stderr.contains("404"),
        "{}",
        missing.stderr
    );
}

#[test]
fn caption_video_sh_captions_the_test_clip_from_a_hub_id() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let build = tempfile::tempdir().unwrap();
    let mut env = hub.env(home.path());
    env.extend([
        ("LLAMAVID_BUILD".into(), "debug".into()),
        (
            "LLAMAVID_BUILDDIR".into(),
            build.path().join("builddir").display().to_string(),
        ),
        (
            "LLAMAVID_FETCH".into(),
            env!("CARGO_BIN_EXE_llamavid-fetch").into(),
        ),
        (
            "GST_REGISTRY".into(),
            build.path().join("registry.bin").display().to_string(),
        ),
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("caption-video.sh");
    let output = tool(
        script.to_str().unwrap(),
        &[
            "--model",
            &hub.model_id,
            "--vision-tower",
            &hub.eva_url,
            "--max-new-tokens",
            "4",
        ],
        &env,
    );
    assert!(output.success, "{}", output.all());
    // One line per caption: "[    0.00 s ..     4.00 s] text", windows in order.
    let captions: Vec<(f64, f64, &str)> = output
        .stdout
        .lines()
        .map(|line| {
            let (span, text) = line
                .strip_prefix('[')
                .and_then(|l| l.split_once("] "))
                .unwrap_or_else(|| panic!("not a caption line: {line:?}\n{}", output.all()));
            let (start, end) = span.split_once("..").expect("start .. end");
            let seconds = |s: &str| {
                s.trim()
                    .trim_end_matches(" s")
                    .trim()
                    .parse::<f64>()
                    .unwrap()
            };
            (seconds(start), seconds(end), text)
        })
        .collect();
    // 20 s at a caption every 5 s, plus the final one at EOS.
    assert!(captions.len() >= 4, "{}", output.all());
    assert!(
        captions.windows(2).all(|w| w[0].1 <= w[1].1),
        "{captions:?}"
    );
    assert!(
        captions.iter().all(|c| c.0 <= c.1 && c.1 <= 20.0),
        "{captions:?}"
    );
    assert!(
        captions.iter().any(|c| !c.2.trim().is_empty()),
        "{captions:?}"
    );
    assert!(
        output
            .stderr
            .contains("==> fetching test/llama-vid-tiny-video"),
        "{}",
        output.stderr
    );
    assert!(output.stderr.contains("caption(s) in"), "{}", output.stderr);
}
