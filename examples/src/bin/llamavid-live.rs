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

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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
    gst::init()?;
    // Make the element available even when the plugin is not installed.
    gstllamavid::plugin_register_static()?;

    let description = format!(
        "{source} ! llamavidcaption name=captioner ! videoconvert ! {video_sink} \
         captioner.text_src ! fakesink"
    );
    let pipeline = gst::parse::launch(&description)?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let captioner = pipeline.by_name("captioner").context("captioner")?;
    captioner.set_property("model", &model);

    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().context("bus")?;
    let result = (|| -> Result<()> {
        for msg in bus.iter_timed(gst::ClockTime::NONE) {
            match msg.view() {
                gst::MessageView::Element(e) => {
                    let Some(s) = e.structure() else { continue };
                    if s.name() != gstllamavid::llamavidcaption::CAPTION_MESSAGE {
                        continue;
                    }
                    let ns = |f: &str| gst::ClockTime::from_nseconds(s.get::<u64>(f).unwrap_or(0));
                    println!(
                        "[{} .. {}] ({} frames, {} late) {}",
                        ns("start"),
                        ns("end"),
                        s.get::<u32>("frames").unwrap_or(0),
                        ns("latency"),
                        s.get::<String>("text").unwrap_or_default()
                    );
                }
                gst::MessageView::Warning(w) => {
                    eprintln!("warning: {} ({:?})", w.error(), w.debug())
                }
                gst::MessageView::Error(e) => anyhow::bail!("{} ({:?})", e.error(), e.debug()),
                gst::MessageView::Eos(_) => break,
                _ => {}
            }
        }
        Ok(())
    })();
    pipeline.set_state(gst::State::Null)?;
    result
}
