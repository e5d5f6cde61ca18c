//! What the element costs the video path while its model is busy: the same pipeline with
//! `identity` and with `llamavidcaption` in its place, frames timed between the element's
//! sink and src pads.
//!
//! ```text
//! cargo bench -p llamavid-gst-tests --bench video_path [-- --model DIR --frames N --width W --height H]
//! ```
//! Defaults: the tiny fixture model, 600 frames of 1280×720 I420. Every frame is sampled
//! (`sample-interval=1`) and a caption is due every 100 ms, so the worker never idles; the
//! `drop` frame policy lets the video run at its own pace, as with a live source.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

struct Options {
    model: String,
    frames: u32,
    width: u32,
    height: u32,
}

fn options() -> Options {
    let mut options = Options {
        model: llamavid_gst_tests::model_dir().display().to_string(),
        frames: 600,
        width: 1280,
        height: 720,
    };
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => options.model = value,
            "--frames" => options.frames = value.parse().expect("--frames N"),
            "--width" => options.width = value.parse().expect("--width W"),
            "--height" => options.height = value.parse().expect("--height H"),
            other => panic!("unknown option {other}"),
        }
    }
    options
}

struct Run {
    wall: Duration,
    frames: usize,
    /// Time each buffer spent between entering the element and leaving it.
    in_element: Vec<Duration>,
    captions: u64,
    sampled: u64,
    dropped: u64,
}

fn run(element: &str, o: &Options) -> Run {
    let description = format!(
        "videotestsrc num-buffers={} pattern=ball ! video/x-raw,format=I420,width={},height={},framerate=30/1 ! \
         {element} name=e ! fakesink sync=false",
        o.frames, o.width, o.height
    );
    let pipeline = gst::parse::launch(&description)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let e = pipeline.by_name("e").unwrap();
    let entered: Arc<Mutex<std::collections::HashMap<u64, Instant>>> = Arc::default();
    let spent: Arc<Mutex<Vec<Duration>>> = Arc::default();
    {
        let entered = entered.clone();
        e.static_pad("sink")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                if let Some(pts) = info.buffer().and_then(|b| b.pts()) {
                    entered
                        .lock()
                        .unwrap()
                        .insert(pts.nseconds(), Instant::now());
                }
                gst::PadProbeReturn::Ok
            });
    }
    {
        let (entered, spent) = (entered.clone(), spent.clone());
        e.static_pad("src")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                if let Some(pts) = info.buffer().and_then(|b| b.pts()) {
                    if let Some(t) = entered.lock().unwrap().remove(&pts.nseconds()) {
                        spent.lock().unwrap().push(t.elapsed());
                    }
                }
                gst::PadProbeReturn::Ok
            });
    }
    let started = Instant::now();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    for msg in bus.iter_timed(gst::ClockTime::from_seconds(600)) {
        match msg.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(err) => panic!("{} ({:?})", err.error(), err.debug()),
            _ => {}
        }
    }
    let wall = started.elapsed();
    let stat = |name: &str| {
        if element.starts_with("llamavidcaption") {
            e.property::<u64>(name)
        } else {
            0
        }
    };
    let in_element = std::mem::take(&mut *spent.lock().unwrap());
    let run = Run {
        wall,
        frames: in_element.len(),
        in_element,
        captions: stat("captions"),
        sampled: stat("frames-sampled"),
        dropped: stat("frames-dropped"),
    };
    pipeline.set_state(gst::State::Null).unwrap();
    run
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    llamavid_gst_tests::init();
    let o = options();
    let captioner = format!(
        "llamavidcaption model=\"{}\" sample-interval=1 caption-interval=100 max-new-tokens=16 frame-policy=drop",
        o.model
    );
    // Warm-up (page cache, model load), then the two runs back to back.
    run("identity", &o);
    let mut baseline = run("identity", &o);
    let mut ours = run(&captioner, &o);
    baseline.in_element.sort();
    ours.in_element.sort();
    let fps = |r: &Run| r.frames as f64 / r.wall.as_secs_f64();
    println!(
        "video path, {} frames of {}x{} I420 (fakesink sync=false)",
        o.frames, o.width, o.height
    );
    println!("| element | frames/s | p50 in element | p99 in element |");
    println!("|---|---|---|---|");
    for (name, r) in [("identity", &baseline), ("llamavidcaption", &ours)] {
        println!(
            "| {name} | {:.0} | {:.1} µs | {:.1} µs |",
            fps(r),
            percentile(&r.in_element, 0.5).as_secs_f64() * 1e6,
            percentile(&r.in_element, 0.99).as_secs_f64() * 1e6
        );
    }
    println!(
        "throughput ratio (llamavidcaption / identity): {:.3}; model busy: {} captions, {} frames sampled, {} dropped",
        fps(&ours) / fps(&baseline),
        ours.captions,
        ours.sampled,
        ours.dropped
    );
}
