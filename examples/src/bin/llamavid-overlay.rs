//! A camera with its caption drawn over the live picture: `llamavidcaption`'s text stream
//! feeds `textoverlay`, which shows each caption over the frames it describes. Captions are
//! also printed with their timing.
//!
//! ```text
//! llamavid-overlay --model DIR [--source FRAGMENT] [--sink FRAGMENT] [--seconds S]
//!                  [--prompt Q] [--set PROPERTY=VALUE]...
//! ```
//! The source is the first camera (`v4l2src ! videoconvert`) when `/dev/video*` exists, else a
//! live test pattern (said on stderr); `--source` is any gst-launch fragment producing raw
//! video, or a video file. The sink shows the picture, `autovideosink` by default (`fakesink` or
//! a file writer on a machine without a display). In a live pipeline the text stream adds the
//! element's `latency` property (default 10 s) to the picture's delay so that a caption lands
//! on its frames: set it a little above `last-caption-latency` on your hardware (`--set
//! latency=3000`).

use anyhow::{bail, Result};
use gst::prelude::*;
use llamavid_examples::pipeline::{
    clock_time, element, eos_after, init, launch, option_value, parse_seconds, run_bus,
    source_fragment, CaptionSettings,
};

const USAGE: &str = "usage: llamavid-overlay --model DIR [--source FRAGMENT|FILE] \
[--sink FRAGMENT] [--seconds S] [--prompt Q] [--set PROPERTY=VALUE]...";

const CAMERA_SOURCE: &str = "v4l2src ! videoconvert";
const TEST_SOURCE: &str = "videotestsrc is-live=true ! video/x-raw,width=640,height=360";

struct Args {
    caption: CaptionSettings,
    source: Option<String>,
    sink: String,
    seconds: Option<f64>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        caption: CaptionSettings::default(),
        source: None,
        sink: "autovideosink".into(),
        seconds: None,
    };
    while let Some(arg) = args.next() {
        if parsed.caption.take_option(&arg, &mut args, USAGE)? {
            continue;
        }
        match arg.as_str() {
            "--source" => {
                parsed.source = Some(source_fragment(&option_value(&arg, &mut args, USAGE)?)?)
            }
            "--sink" => parsed.sink = option_value(&arg, &mut args, USAGE)?,
            "--seconds" => {
                parsed.seconds = Some(parse_seconds(&option_value(&arg, &mut args, USAGE)?)?)
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    parsed.caption.check(USAGE)?;
    Ok(parsed)
}

/// Whether a V4L2 device node exists (`/dev/video0`, `/dev/video1`, ...).
fn has_camera() -> bool {
    std::fs::read_dir("/dev").is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("video"))
    })
}

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let source = match &args.source {
        Some(source) => source.clone(),
        None if has_camera() => CAMERA_SOURCE.to_owned(),
        None => {
            eprintln!("no camera (/dev/video*): showing a live test pattern ({TEST_SOURCE})");
            TEST_SOURCE.to_owned()
        }
    };
    init()?;

    // The caption along the bottom, on a shaded band so that it reads on any picture.
    let description = format!(
        "{source} ! llamavidcaption name=captioner ! videoconvert ! \
         textoverlay name=overlay valignment=bottom halignment=center shaded-background=true \
         wrap-mode=wordchar ! videoconvert ! {sink} captioner.text_src ! overlay.text_sink",
        sink = args.sink
    );
    let pipeline = launch(&description)?;
    args.caption.apply(&element(&pipeline, "captioner")?)?;

    pipeline.set_state(gst::State::Playing)?;
    eos_after(&pipeline, args.seconds);
    let result = run_bus(&pipeline, |_, caption| {
        println!(
            "[{} .. {}] shown from {} ({} frames, {} late) {}",
            clock_time(caption.start),
            clock_time(caption.end),
            clock_time(caption.pts),
            caption.frames,
            clock_time(caption.latency),
            caption.text
        );
        Ok(())
    });
    pipeline.set_state(gst::State::Null)?;
    result
}
