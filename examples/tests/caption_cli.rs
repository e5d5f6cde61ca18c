//! `llamavid-caption` on the fixture's own frames gives the reference's greedy ids: the
//! command-line path (frames decoded from image files, encoded in batches, captioned) is held
//! to the reference code, not only to "some caption came out".

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use llamavid_gst_tests::{fixture_dir, gst_tool, model_dir, run_tool};

const TIMEOUT: Duration = Duration::from_secs(600);

/// The (count, height, width) of a `uint8` (T, H, W, 3) `.npy` file, and its pixel bytes.
fn read_npy_frames(path: &Path) -> ((usize, usize, usize), Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x93NUMPY"),
        "{} is no .npy file",
        path.display()
    );
    // Version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one.
    let (header_start, header_len) = match bytes[6] {
        1 => (10, u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        _ => (
            12,
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
        ),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len]).unwrap();
    assert!(header.contains("'|u1'"), "frames are not uint8: {header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no shape in {header}"));
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().unwrap())
        .collect();
    assert_eq!(
        (dims.len(), dims[3]),
        (4, 3),
        "frames are not (T, H, W, 3): {header}"
    );
    let data = bytes[header_start + header_len..].to_vec();
    assert_eq!(data.len(), dims[0] * dims[1] * dims[2] * 3);
    ((dims[0], dims[1], dims[2]), data)
}

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
    let (shape, data) = read_npy_frames(&fixture.join("frames.npy"));
    let dir = tempfile::tempdir().unwrap();
    write_png_frames(dir.path(), shape, &data);

    let prompt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("prompt.json")).unwrap()).unwrap();
    let question = prompt["question"].as_str().unwrap();
    let max_new_tokens = prompt["max_new_tokens"].as_u64().unwrap().to_string();
    let reference = candle_core::safetensors::load(
        fixture.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
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
