//! Surveillance: watches N cameras or files in one pipeline, each with its own
//! `llamavidcaption emit=on-change` (all on one loaded model), and writes one JSON line per
//! event, that is per caption that says something new:
//!
//! ```text
//! {"camera":"door","running_time_ns":4500000000,"start_ns":0,"end_ns":4500000000,
//!  "wall_clock":"2024-05-01T12:00:04.500Z","text":"a man opens the door"}
//! ```
//! (one line each). `running_time_ns` is the running time of the caption (its newest frame),
//! `start_ns`/`end_ns` the span of video it describes, `wall_clock` (RFC 3339, UTC) the moment
//! that newest frame was captured: the pipeline runs on the real-time clock, so a frame's wall
//! time is the pipeline's base time plus its running time (for files: when it was played).
//!
//! ```text
//! llamavid-events --model DIR (--camera NAME=SOURCE)... | --cameras N [--seconds S]
//!                 [--output FILE] [--prompt Q] [--set PROPERTY=VALUE]...
//! ```
//! `SOURCE` is a video file or a gst-launch fragment producing raw video
//! (`"v4l2src device=/dev/video0 ! videoconvert"`, `"rtspsrc location=rtsp://door/ ! decodebin !
//! videoconvert"`); `--cameras N` watches N live test patterns instead. `--set` applies to every
//! camera (`--set change-threshold=0.3`). Lines go to stdout, or appended to `--output FILE`,
//! each flushed as it is written. At the end a summary per camera goes to stderr: captions
//! made, suppressed by `on-change`, and events written.

use std::io::Write;

use anyhow::{bail, Context, Result};
use gst::prelude::*;
use llamavid_examples::pipeline::{
    camera_pipeline, eos_after, init, numbered_source, option_value, parse_seconds, rfc3339_utc,
    run_bus, source_fragment, CaptionSettings, TEST_PATTERN_SOURCE,
};

const USAGE: &str = "usage: llamavid-events --model DIR (--camera NAME=SOURCE)... | --cameras N \
[--seconds S] [--output FILE] [--prompt Q] [--set PROPERTY=VALUE]...";

struct Camera {
    name: String,
    source: String,
}

struct Args {
    caption: CaptionSettings,
    cameras: Vec<Camera>,
    seconds: Option<f64>,
    output: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        caption: CaptionSettings::default(),
        cameras: Vec::new(),
        seconds: None,
        output: None,
    };
    let mut test_patterns: Option<usize> = None;
    while let Some(arg) = args.next() {
        if parsed.caption.take_option(&arg, &mut args, USAGE)? {
            continue;
        }
        match arg.as_str() {
            "--camera" => {
                let spec = option_value(&arg, &mut args, USAGE)?;
                let (name, source) = spec
                    .split_once('=')
                    .with_context(|| format!("--camera {spec}: expected NAME=SOURCE"))?;
                if name.is_empty() || source.is_empty() {
                    bail!("--camera {spec}: expected NAME=SOURCE, both non-empty");
                }
                if parsed.cameras.iter().any(|c| c.name == name) {
                    bail!("--camera {name} given twice");
                }
                parsed.cameras.push(Camera {
                    name: name.into(),
                    source: source_fragment(source)?,
                });
            }
            "--cameras" => {
                test_patterns = Some(
                    option_value(&arg, &mut args, USAGE)?
                        .parse()
                        .context("--cameras")?,
                )
            }
            "--seconds" => {
                parsed.seconds = Some(parse_seconds(&option_value(&arg, &mut args, USAGE)?)?)
            }
            "--output" => parsed.output = Some(option_value(&arg, &mut args, USAGE)?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    parsed.caption.check(USAGE)?;
    match test_patterns {
        Some(_) if !parsed.cameras.is_empty() => {
            bail!("--cameras N and --camera NAME=SOURCE exclude each other")
        }
        Some(0) => bail!("--cameras must be at least 1"),
        Some(n) => {
            parsed.cameras = (0..n)
                .map(|k| Camera {
                    name: format!("camera-{k}"),
                    source: numbered_source(TEST_PATTERN_SOURCE, k),
                })
                .collect()
        }
        None if parsed.cameras.is_empty() => {
            bail!("no camera: give --camera NAME=SOURCE or --cameras N\n{USAGE}")
        }
        None => {}
    }
    Ok(parsed)
}

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    init()?;
    let sources: Vec<String> = args.cameras.iter().map(|c| c.source.clone()).collect();
    // emit=on-change first, so that a `--set emit=...` (applied after it) still wins.
    let mut caption = args.caption.clone();
    caption
        .properties
        .insert(0, ("emit".to_owned(), "on-change".to_owned()));
    let (pipeline, elements) = camera_pipeline(&sources, &caption)?;
    // Running time on the real-time clock: base time + running time is a wall-clock instant.
    let realtime = gst::glib::Object::builder::<gst::SystemClock>()
        .property("clock-type", gst::ClockType::Realtime)
        .build();
    pipeline.use_clock(Some(&realtime));

    pipeline.set_state(gst::State::Playing)?;
    eos_after(&pipeline, args.seconds);
    let mut events = vec![0u64; elements.len()];
    let result = run_bus(&pipeline, |element_name, caption| {
        let Some(k) = elements.iter().position(|e| e.name() == element_name) else {
            return Ok(());
        };
        let wall_ns = match pipeline.base_time() {
            Some(base) => base.nseconds() + caption.pts,
            None => realtime.time().nseconds(),
        };
        let line = serde_json::json!({
            "camera": args.cameras[k].name,
            "running_time_ns": caption.pts,
            "start_ns": caption.start,
            "end_ns": caption.end,
            "wall_clock": rfc3339_utc(wall_ns),
            "text": caption.text,
        });
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .context("writing an event")?;
        events[k] += 1;
        Ok(())
    });
    // The statistics before NULL (READY -> PAUSED starts them again).
    for ((camera, element), events) in args.cameras.iter().zip(&elements).zip(&events) {
        eprintln!(
            "{}: {} captions, {} suppressed by on-change, {events} events",
            camera.name,
            element.property::<u64>("captions"),
            element.property::<u64>("captions-suppressed"),
        );
    }
    pipeline.set_state(gst::State::Null)?;
    result
}
