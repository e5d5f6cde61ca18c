//! Small helpers shared by the example programs.

pub mod export_llm;
pub mod pipeline;
pub mod progress;

use std::path::Path;

use anyhow::{bail, Context, Result};
use gst::prelude::*;

/// The end of every example's `main`: on an error, `error: ` and its chain of causes on stderr,
/// and exit status 1 (no backtrace, no `Debug` dump of the error).
pub fn exit_on_error(result: Result<()>) {
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// One decoded frame, packed RGB.
pub struct RgbFrame {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Python's `round` (half to even), which the reference uses for the frame step.
pub fn round_half_even(x: f64) -> u64 {
    let floor = x.floor();
    let diff = x - floor;
    let rounded = if diff > 0.5 || (diff == 0.5 && floor % 2.0 != 0.0) {
        floor + 1.0
    } else {
        floor
    };
    rounded.max(0.0) as u64
}

/// Decodes `path` with GStreamer and keeps frames `0, step, 2·step, …` with
/// `step = round(fps / frames_per_second)`, as LLaMA-VID samples video (about one frame per
/// second, starting with frame 0). At most `max_frames` frames are returned.
pub fn decode_video(
    path: &Path,
    frames_per_second: f64,
    max_frames: usize,
) -> Result<Vec<RgbFrame>> {
    let uri = gst::glib::filename_to_uri(
        path.canonicalize()
            .with_context(|| format!("{}", path.display()))?,
        None,
    )?;
    let pipeline = gst::parse::launch(&format!(
        "uridecodebin uri=\"{uri}\" ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let sink = pipeline
        .by_name("sink")
        .context("appsink")?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| anyhow::anyhow!("not an appsink"))?;
    pipeline.set_state(gst::State::Playing)?;
    let mut frames = Vec::new();
    let mut index: u64 = 0;
    let mut step: Option<u64> = None;
    while frames.len() < max_frames {
        let Ok(sample) = sink.pull_sample() else {
            break;
        };
        let caps = sample.caps().context("sample without caps")?;
        let info = gst_video::VideoInfo::from_caps(caps)?;
        let step = *step.get_or_insert_with(|| {
            let fps = info.fps();
            let avg = if fps.numer() > 0 {
                fps.numer() as f64 / fps.denom() as f64
            } else {
                1.0
            };
            round_half_even(avg / frames_per_second).max(1)
        });
        if index.is_multiple_of(step) {
            let buffer = sample.buffer().context("sample without buffer")?;
            let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)?;
            let (w, h) = (info.width() as usize, info.height() as usize);
            let stride = info.stride()[0] as usize;
            let plane = frame.plane_data(0)?;
            let mut data = Vec::with_capacity(w * h * 3);
            for row in 0..h {
                data.extend_from_slice(&plane[row * stride..row * stride + w * 3]);
            }
            frames.push(RgbFrame {
                width: w,
                height: h,
                data,
            });
        }
        index += 1;
    }
    let bus = pipeline.bus().context("bus")?;
    let error = bus.pop_filtered(&[gst::MessageType::Error]);
    pipeline.set_state(gst::State::Null)?;
    if let Some(msg) = error {
        if let gst::MessageView::Error(e) = msg.view() {
            bail!(
                "decoding {} failed: {} ({:?})",
                path.display(),
                e.error(),
                e.debug()
            );
        }
    }
    if frames.is_empty() {
        bail!("no frames decoded from {}", path.display());
    }
    Ok(frames)
}

/// Decodes every image file of a directory in name order (PNG, JPEG, … whatever GStreamer's
/// decodebin can read), one frame each.
pub fn decode_image_dir(dir: &Path, max_frames: usize) -> Result<Vec<RgbFrame>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "bmp" | "webp"
                )
            })
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!(
            "{} holds no .png/.jpg/.jpeg/.bmp/.webp frames",
            dir.display()
        );
    }
    paths
        .iter()
        .take(max_frames)
        .map(|p| decode_video(p, 1.0, 1).map(|mut f| f.remove(0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::round_half_even;

    #[test]
    fn rounds_like_python() {
        assert_eq!(round_half_even(29.97), 30);
        assert_eq!(round_half_even(23.976), 24);
        assert_eq!(round_half_even(12.5), 12);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
    }
}
