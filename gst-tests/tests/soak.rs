//! Soak (issue 13): a live camera-like pipeline captioning as fast as the fixture model allows
//! (a caption every 200 ms of video, 25x the default 5 s schedule), with the Rust heap (the
//! metered allocator), the resident memory and each caption's latency sampled throughout.
//! After a warm-up, memory must stay flat (< 5% drift, last 10% of the run against the first
//! 10% after warm-up), latency must not creep, and captions keep coming at the schedule the
//! load allows.
//!
//! `cargo test -p llamavid-gst-tests --test soak -- --nocapture`: 30 s (CI);
//! `LLAMAVID_SOAK_SECONDS=144` is one hour of captions at the default schedule (720 captions),
//! `LLAMAVID_SOAK_SECONDS=3600` a full hour of this one (18,000 captions).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use llamavid_gst_tests::alloc_meter::{live_bytes, MeteredAllocator};
use llamavid_gst_tests::process::resident_bytes;
use llamavid_gst_tests::*;

#[global_allocator]
static ALLOC: MeteredAllocator = MeteredAllocator;

const CAPTION_INTERVAL_MS: u64 = 200;
/// 20 frames at the default sample interval (100 ms).
const WINDOW_MS: u64 = 2000;

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The mean of the first and of the last `share` of `values`.
fn ends(values: &[f64], share: f64) -> (f64, f64) {
    let n = ((values.len() as f64 * share).ceil() as usize).clamp(1, values.len());
    (mean(&values[..n]), mean(&values[values.len() - n..]))
}

#[test]
fn a_live_pipeline_captioning_for_a_while_keeps_memory_flat_and_latency_steady() {
    let seconds: u64 = std::env::var("LLAMAVID_SOAK_SECONDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(30);
    init();
    let pipeline = gst::parse::launch(
        "videotestsrc is-live=true pattern=ball \
         ! video/x-raw,format=I420,width=64,height=48,framerate=30/1 \
         ! llamavidcaption name=c ! fakesink sync=false  c.text_src ! fakesink sync=false",
    )
    .expect("pipeline")
    .downcast::<gst::Pipeline>()
    .unwrap();
    let caption = pipeline.by_name("c").unwrap();
    configure_caption(&caption);
    caption.set_property_from_str("frame-policy", "drop");
    caption.set_property("caption-interval", CAPTION_INTERVAL_MS);
    caption.set_property("max-new-tokens", 8u32);
    // The window fills within the warm-up: until it is full, every caption's prompt is longer
    // than the last and the tokens held grow, which is the design, not drift.
    caption.set_property("window-duration", WINDOW_MS);

    // Captions' latencies as they are posted (a sync handler: nothing piles up on the bus).
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors_seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (lat, errs) = (latencies.clone(), errors_seen.clone());
    pipeline.bus().unwrap().set_sync_handler(move |_bus, msg| {
        if let Some(c) = Caption::from_message(msg) {
            lat.lock().unwrap().push(c.latency as f64 / 1e6);
        }
        errs.lock()
            .unwrap()
            .extend(errors(std::slice::from_ref(msg)));
        gst::BusSyncReply::Drop
    });
    let stop = StopOnDrop(pipeline.clone());
    set_state_within(&pipeline, gst::State::Playing).unwrap();

    let started = Instant::now();
    let mut heap = Vec::new();
    let mut resident = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(250));
        heap.push(live_bytes() as f64);
        resident.push(resident_bytes() as f64);
        let errors = errors_seen.lock().unwrap().clone();
        assert!(errors.is_empty(), "{errors:?}");
    }
    let sampled = caption.property::<u64>("frames-sampled");
    let dropped = caption.property::<u64>("frames-dropped");
    let made = caption.property::<u64>("captions");
    drop(stop);

    let latencies = latencies.lock().unwrap().clone();
    // Warm-up: the first fifth (model load, first allocations, the allocator's arenas).
    let skip = |v: &[f64]| v[v.len() / 5..].to_vec();
    let (heap, resident, steady) = (skip(&heap), skip(&resident), skip(&latencies));
    let (heap0, heap1) = ends(&heap, 0.1);
    let (rss0, rss1) = ends(&resident, 0.1);
    let (lat0, lat1) = ends(&steady, 0.1);
    let heap_drift = (heap1 - heap0) / heap0;
    let rss_drift = (rss1 - rss0) / rss0;
    let expected = seconds * 1000 / CAPTION_INTERVAL_MS;
    println!(
        "soak {seconds} s: {made} captions ({expected} due), {sampled} frames sampled, \
         {dropped} dropped; Rust heap {:.1} -> {:.1} MiB ({:+.2}%), RSS {:.1} -> {:.1} MiB \
         ({:+.2}%), caption latency {lat0:.1} -> {lat1:.1} ms (first vs last 10% after warm-up)",
        heap0 / 1048576.0,
        heap1 / 1048576.0,
        heap_drift * 100.0,
        rss0 / 1048576.0,
        rss1 / 1048576.0,
        rss_drift * 100.0,
    );
    assert!(
        made >= expected / 2,
        "captions fell behind: {made} of {expected}"
    );
    assert!(
        heap_drift.abs() < 0.05,
        "the Rust heap drifted {:+.2}%",
        heap_drift * 100.0
    );
    assert!(
        rss_drift < 0.05,
        "resident memory drifted {:+.2}%",
        rss_drift * 100.0
    );
    // Within noise: this machine's load from other work moves latencies by tens of percent.
    assert!(
        lat1 <= lat0 * 1.5 + 20.0,
        "caption latency crept from {lat0:.1} to {lat1:.1} ms"
    );
}
