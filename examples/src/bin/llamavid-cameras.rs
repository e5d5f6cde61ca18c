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

const USAGE: &str = "usage: llamavid-cameras --model DIR [--cameras N] [--seconds S] \
[--source FRAGMENT] [--prompt Q] [--set PROPERTY=VALUE]...";

const DEFAULT_SOURCE: &str =
    "videotestsrc is-live=true pattern={k} ! video/x-raw,width=320,height=240,framerate=10/1";

struct Args {
    model: String,
    cameras: usize,
    seconds: Option<f64>,
    source: String,
    prompt: Option<String>,
    properties: Vec<(String, String)>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        model: String::new(),
        cameras: 4,
        seconds: None,
        source: DEFAULT_SOURCE.into(),
        prompt: None,
        properties: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--model" => parsed.model = value()?,
            "--cameras" => parsed.cameras = value()?.parse().context("--cameras")?,
            "--seconds" => parsed.seconds = Some(value()?.parse().context("--seconds")?),
            "--source" => parsed.source = value()?,
            "--prompt" => parsed.prompt = Some(value()?),
            "--set" => {
                let setting = value()?;
                let (name, value) = setting
                    .split_once('=')
                    .with_context(|| format!("--set {setting}: expected PROPERTY=VALUE"))?;
                parsed.properties.push((name.into(), value.into()));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if parsed.model.is_empty() {
        bail!("--model is required\n{USAGE}");
    }
    if parsed.cameras == 0 {
        bail!("--cameras must be at least 1");
    }
    Ok(parsed)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    gst::init()?;
    // Make the element available even when the plugin is not installed.
    gstllamavid::plugin_register_static()?;

    let branches: String = (0..args.cameras)
        .map(|k| {
            let source = args.source.replace("{k}", &k.to_string());
            format!(
                "{source} ! llamavidcaption name=camera-{k} ! fakesink sync=true \
                 camera-{k}.text_src ! fakesink sync=false "
            )
        })
        .collect();
    let pipeline = gst::parse::launch(&branches)?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let elements: Vec<gst::Element> = (0..args.cameras)
        .map(|k| {
            pipeline
                .by_name(&format!("camera-{k}"))
                .context("caption element")
        })
        .collect::<Result<_>>()?;
    for element in &elements {
        element.set_property("model", &args.model);
        if let Some(prompt) = &args.prompt {
            element.set_property("prompt", prompt);
        }
        for (name, value) in &args.properties {
            if element.find_property(name).is_none() {
                bail!("llamavidcaption has no property `{name}`");
            }
            element.set_property_from_str(name, value);
        }
    }

    pipeline.set_state(gst::State::Playing)?;
    if let Some(seconds) = args.seconds {
        // EOS from every source after `seconds` (each camera then gets its final caption).
        let weak = pipeline.downgrade();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
            if let Some(pipeline) = weak.upgrade() {
                pipeline.send_event(gst::event::Eos::new());
            }
        });
    }
    let bus = pipeline.bus().context("bus")?;
    let result = (|| -> Result<()> {
        for msg in bus.iter_timed(gst::ClockTime::NONE) {
            let camera = msg.src().map(|s| s.name().to_string()).unwrap_or_default();
            match msg.view() {
                gst::MessageView::Element(e) => {
                    let Some(s) = e.structure() else { continue };
                    if s.name() != gstllamavid::llamavidcaption::CAPTION_MESSAGE {
                        continue;
                    }
                    let ns = |f: &str| gst::ClockTime::from_nseconds(s.get::<u64>(f).unwrap_or(0));
                    println!(
                        "{camera} [{} .. {}] ({} frames, batch {}, {} late) {}",
                        ns("start"),
                        ns("end"),
                        s.get::<u32>("frames").unwrap_or(0),
                        s.get::<u32>("batch").unwrap_or(0),
                        ns("latency"),
                        s.get::<String>("text").unwrap_or_default()
                    );
                }
                gst::MessageView::Warning(w) => {
                    eprintln!("{camera}: warning: {} ({:?})", w.error(), w.debug())
                }
                gst::MessageView::Error(e) => {
                    bail!("{camera}: {} ({:?})", e.error(), e.debug())
                }
                gst::MessageView::Eos(_) => break,
                _ => {}
            }
        }
        Ok(())
    })();
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
