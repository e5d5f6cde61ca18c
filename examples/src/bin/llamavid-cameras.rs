//! Many cameras, one model: N live sources in one pipeline, each with its own
//! `llamavidcaption`; every element names the same model, so they share one loaded copy and
//! its scheduler (frames of all cameras encoded in batches, captions decoded together). Each
//! caption is printed with its camera's name and how many captions were decoded with it.
//!
//! ```text
//! llamavid-cameras --model DIR [--cameras N] [--seconds S] [--source FRAGMENT] [--prompt Q]
//!                  [--set PROPERTY=VALUE]...
//! ```
//! `--source` is a gst-launch fragment producing raw video in which `{k}` stands for the camera
//! number, by default a test pattern per camera (`videotestsrc is-live=true pattern={k} !
//! video/x-raw,width=320,height=240,framerate=10/1`); for real cameras e.g.
//! `"v4l2src device=/dev/video{k} ! videoconvert"` or `"rtspsrc location=rtsp://cam{k}/ !
//! decodebin ! videoconvert"`. `--set` applies to every camera's element (`--set
//! caption-interval=2000 --set dtype=int8`). With `--seconds` the pipeline ends (EOS, final
//! captions included) after that long; without, it runs until the sources end. Video goes to
//! fakesinks that keep the live pace: the example runs headless (CI runs it on the fixture).

use anyhow::{bail, Context, Result};
use gst::prelude::*;
use llamavid_examples::pipeline::{
    camera_pipeline, clock_time, eos_after, init, numbered_source, option_value, parse_seconds,
    run_bus, CaptionSettings, TEST_PATTERN_SOURCE,
};

const USAGE: &str = "usage: llamavid-cameras --model DIR [--cameras N] [--seconds S] \
[--source FRAGMENT] [--prompt Q] [--set PROPERTY=VALUE]...";

struct Args {
    caption: CaptionSettings,
    cameras: usize,
    seconds: Option<f64>,
    source: String,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        caption: CaptionSettings::default(),
        cameras: 4,
        seconds: None,
        source: TEST_PATTERN_SOURCE.into(),
    };
    while let Some(arg) = args.next() {
        if parsed.caption.take_option(&arg, &mut args, USAGE)? {
            continue;
        }
        match arg.as_str() {
            "--cameras" => {
                parsed.cameras = option_value(&arg, &mut args, USAGE)?
                    .parse()
                    .context("--cameras")?
            }
            "--seconds" => {
                parsed.seconds = Some(parse_seconds(&option_value(&arg, &mut args, USAGE)?)?)
            }
            "--source" => parsed.source = option_value(&arg, &mut args, USAGE)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    parsed.caption.check(USAGE)?;
    if parsed.cameras == 0 {
        bail!("--cameras must be at least 1");
    }
    Ok(parsed)
}

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = parse_args()?;
    init()?;
    let sources: Vec<String> = (0..args.cameras)
        .map(|k| numbered_source(&args.source, k))
        .collect();
    let (pipeline, elements) = camera_pipeline(&sources, &args.caption)?;

    pipeline.set_state(gst::State::Playing)?;
    eos_after(&pipeline, args.seconds);
    let result = run_bus(&pipeline, |camera, caption| {
        println!(
            "{camera} [{} .. {}] ({} frames, batch {}, {} late) {}",
            clock_time(caption.start),
            clock_time(caption.end),
            caption.frames,
            caption.batch,
            clock_time(caption.latency),
            caption.text
        );
        Ok(())
    });
    // The statistics before NULL (READY -> PAUSED starts them again).
    for element in &elements {
        let stat = |name: &str| element.property::<u64>(name);
        println!(
            "{}: {} captions, {} frames encoded ({} of them in batches of 2 or more), {} dropped",
            element.name(),
            stat("captions"),
            stat("frames-encoded"),
            stat("frames-batched"),
            stat("frames-dropped")
        );
    }
    pipeline.set_state(gst::State::Null)?;
    result
}
