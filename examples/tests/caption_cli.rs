//! `llamavid-caption` on the fixture's own frames gives the reference's greedy ids: the
//! command-line path (frames decoded from image files, encoded in batches, captioned) is held
//! to the reference code, not only to "some caption came out".

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use llamavid_gst_tests::{fixture_dir, gst_tool, model_dir, run_tool};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Writes the frames as lossless PNG files, `frame-00.png` on, through GStreamer.
fn write_png_frames(dir: &Path, (count, height, width): (usize, usize, usize), data: &[u8]) {
    let raw = dir.join("frames.rgb");
    std::fs::write(&raw, data).unwrap();
    let location = format!("location={}", raw.display());
    let width_arg = format!("width={width}");
    let height_arg = format!("height={height}");
    // Rows of exactly 3 × width bytes, as the .npy file holds them (GStreamer's own RGB rows
    // are padded to 4 bytes).
    let strides = format!("plane-strides=<{}>", width * 3);
    let sink = format!("location={}/frame-%02d.png", dir.display());
    #[rustfmt::skip]
    let args = [
        "-q", "filesrc", &location,
        "!", "rawvideoparse", &width_arg, &height_arg, "format=rgb", "framerate=1/1", &strides,
        "!", "videoconvert", "!", "pngenc", "!", "multifilesink", &sink,
    ];
    let output = gst_tool("gst-launch-1.0", &args, TIMEOUT);
    assert!(output.success, "{}", output.all());
    std::fs::remove_file(&raw).unwrap();
    let pngs = std::fs::read_dir(dir).unwrap().count();
    assert_eq!(pngs, count, "{count} frames, {pngs} PNG files");
}

#[test]
fn llamavid_caption_of_the_fixture_frames_gives_the_reference_ids() {
    let fixture = fixture_dir();
    let reference = candle_core::safetensors::load(
        fixture.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // The raw frames (T, H, W, 3) u8, as frames.npy holds them.
    let frames = &reference["frames"];
    let (count, height, width, _) = frames.dims4().unwrap();
    let data: Vec<u8> = frames.flatten_all().unwrap().to_vec1().unwrap();
    let shape = (count, height, width);
    let dir = tempfile::tempdir().unwrap();
    write_png_frames(dir.path(), shape, &data);

    let prompt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("prompt.json")).unwrap()).unwrap();
    let question = prompt["question"].as_str().unwrap();
    let max_new_tokens = prompt["max_new_tokens"].as_u64().unwrap().to_string();
    let expected: Vec<i64> = reference["generated_ids"].to_vec1().unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llamavid-caption"));
    cmd.args([
        "--model",
        model_dir().to_str().unwrap(),
        "--prompt",
        question,
        "--max-new-tokens",
        &max_new_tokens,
        "--json",
        dir.path().to_str().unwrap(),
    ]);
    let output = run_tool(cmd, TIMEOUT);
    assert!(output.success, "{}", output.all());
    assert!(
        output
            .stderr
            .contains(&format!("{} frames sampled", shape.0)),
        "{}",
        output.all()
    );
    let printed: serde_json::Value = serde_json::from_str(output.stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {}", output.all()));
    let ids: Vec<i64> = printed["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_i64().unwrap())
        .collect();
    assert_eq!(ids, expected, "{}", output.all());
}
