//! An application embedding `llamavidcaption`: runs a pipeline and prints each caption from
//! the bus with its timing, the way a media app would consume them.
//!
//! ```text
//! llamavid-live MODEL [PIPELINE_SOURCE [VIDEO_SINK]]     (MODEL: a directory or a hub id)
//! ```
//! `PIPELINE_SOURCE` is a gst-launch fragment producing raw video, by default a camera
//! (`v4l2src ! videoconvert`); `VIDEO_SINK` shows the video, by default `autovideosink`
//! (`fakesink` on a machine without a display). Example without a camera:
//! `llamavid-live YanweiLi/llama-vid-7b-full-224-video-fps-1 "videotestsrc is-live=true ! video/x-raw,width=640,height=360"`

use anyhow::{Context, Result};
use gst::prelude::*;
use llamavid_examples::pipeline::{clock_time, element, init, launch, run_bus};

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .context("usage: llamavid-live MODEL [PIPELINE_SOURCE [VIDEO_SINK]] (MODEL: a directory or a hub id)")?;
    let source = args
        .next()
        .unwrap_or_else(|| "v4l2src ! videoconvert".into());
    let video_sink = args.next().unwrap_or_else(|| "autovideosink".into());
    init()?;

    let description = format!(
        "{source} ! llamavidcaption name=captioner ! videoconvert ! {video_sink} \
         captioner.text_src ! fakesink"
    );
    let pipeline = launch(&description)?;
    element(&pipeline, "captioner")?.set_property("model", &model);

    pipeline.set_state(gst::State::Playing)?;
    let result = run_bus(&pipeline, |_, caption| {
        println!(
            "[{} .. {}] ({} frames, {} late) {}",
            clock_time(caption.start),
            clock_time(caption.end),
            caption.frames,
            clock_time(caption.latency),
            caption.text
        );
        Ok(())
    });
    pipeline.set_state(gst::State::Null)?;
    result
}
