//! State and lifecycle (issue 13): random transitions between all four states in both
//! directions, on two pipelines that share one loaded model, landing while captions decode and
//! while the other pipeline loads the model; elements disposed mid-caption. No transition may
//! hang or take longer than a bound, none may fail, and nothing may grow from one round to the
//! next (threads, the Rust heap, resident memory).
//!
//! `cargo test -p llamavid-gst-tests --test lifecycle` (LLAMAVID_LIFECYCLE_TRANSITIONS=1000 for
//! the full run of issue 13; CI does 200)

use std::time::{Duration, Instant};

use gst::prelude::*;
use llamavid_gst_tests::alloc_meter::{live_bytes, MeteredAllocator};
use llamavid_gst_tests::process::{resident_bytes, thread_count};
use llamavid_gst_tests::*;

#[global_allocator]
static ALLOC: MeteredAllocator = MeteredAllocator;

/// Longest acceptable state change: a model load (the fixture loads in well under a second)
/// or an interrupted caption (one layer), on a loaded machine.
const TRANSITION_BOUND: Duration = Duration::from_secs(20);

/// The tests measure the whole process (threads, heap): one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const STATES: [gst::State; 4] = [
    gst::State::Null,
    gst::State::Ready,
    gst::State::Paused,
    gst::State::Playing,
];

/// splitmix64, so that a failing sequence reproduces from its printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// A live camera-like pipeline captioning fast: long enough captions that transitions often
/// land mid-decode.
fn live_pipeline() -> gst::Pipeline {
    init();
    let pipeline = gst::parse::launch(
        "videotestsrc is-live=true pattern=ball \
         ! video/x-raw,format=I420,width=64,height=48,framerate=20/1 \
         ! llamavidcaption name=c ! fakesink sync=false  c.text_src ! fakesink sync=false",
    )
    .expect("pipeline")
    .downcast::<gst::Pipeline>()
    .unwrap();
    let caption = pipeline.by_name("c").unwrap();
    configure_caption(&caption);
    caption.set_property_from_str("frame-policy", "drop");
    caption.set_property("caption-interval", 200u64);
    caption.set_property("max-new-tokens", 32u32);
    pipeline
}

struct Round {
    transitions: usize,
    slowest: Duration,
    mid_caption: usize,
}

/// `transitions` random state changes spread over two pipelines sharing the model, driven
/// from two threads at once. Fails on an error message, a failed or slow transition.
fn random_transitions(transitions: usize, seed: u64) -> Round {
    let handles: Vec<_> = (0..2u64)
        .map(|p| {
            std::thread::spawn(move || {
                let pipeline = live_pipeline();
                let messages = record_bus(&pipeline.bus().unwrap());
                let caption = pipeline.by_name("c").unwrap();
                let mut rng = Rng(seed ^ (p + 1));
                let mut slowest = Duration::ZERO;
                let mut mid_caption = 0;
                let mut history = Vec::new();
                for i in 0..transitions / 2 {
                    let target = STATES[rng.below(4) as usize];
                    history.push(target);
                    std::thread::sleep(Duration::from_millis(rng.below(120)));
                    let decoding = caption.property::<u64>("frames-encoded") > 0;
                    let t0 = Instant::now();
                    let result = set_state_within(&pipeline, target);
                    // PAUSED on a live source is NO_PREROLL; going up, async changes finish
                    // in the background: wait for them, within the same bound.
                    let (done, _, _) = pipeline
                        .state(gst::ClockTime::from_seconds(TRANSITION_BOUND.as_secs()));
                    let took = t0.elapsed();
                    slowest = slowest.max(took);
                    mid_caption += usize::from(decoding && target < gst::State::Paused);
                    assert!(
                        result.is_ok() && done.is_ok(),
                        "pipeline {p}, transition {i} to {target:?} (seed {seed:#x}): \
                         {result:?} {done:?}; errors {:?}",
                        errors(&messages.lock().unwrap())
                    );
                    if took >= TRANSITION_BOUND {
                        let mut stuck = Vec::new();
                        for e in pipeline.iterate_recurse().into_iter().flatten() {
                            let (r, cur, pend) = e.state(gst::ClockTime::ZERO);
                            stuck.push(format!("{}: {r:?} {cur:?}->{pend:?}", e.name()));
                        }
                        panic!(
                            "pipeline {p}, transition {i} to {target:?} took {took:?}; history {history:?}; {stuck:?}"
                        );
                    }
                    let mut recorded = messages.lock().unwrap();
                    let errors = errors(&recorded);
                    assert!(errors.is_empty(), "pipeline {p}, transition {i}: {errors:?}");
                    recorded.clear();
                }
                set_state_within(&pipeline, gst::State::Null).unwrap();
                // The recorded messages name the pipeline, and the bus's handler holds them:
                // a cycle that would keep every round's pipeline alive.
                pipeline.bus().unwrap().unset_sync_handler();
                messages.lock().unwrap().clear();
                (slowest, mid_caption)
            })
        })
        .collect();
    let mut round = Round {
        transitions: transitions / 2 * 2,
        slowest: Duration::ZERO,
        mid_caption: 0,
    };
    for h in handles {
        let (slowest, mid) = h.join().expect("a transition thread failed");
        round.slowest = round.slowest.max(slowest);
        round.mid_caption += mid;
    }
    round
}

/// Lets the threads that ended go (GLib's pool keeps idle ones for a while).
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn random_state_transitions_on_a_shared_model_never_hang_fail_or_leak() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let total: usize = std::env::var("LLAMAVID_LIFECYCLE_TRANSITIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    // Three rounds: the first warms up (model load, GLib pools, the allocator's arenas); the
    // later ones must not grow past it.
    let mut figures = Vec::new();
    for r in 0..3u64 {
        let round = random_transitions(total / 3, 0x13_0000 + r);
        settle();
        figures.push((thread_count(), live_bytes(), resident_bytes()));
        println!(
            "round {r}: {} transitions ({} down to READY/NULL after encoding began), slowest {:?}; \
             after: {} threads, Rust heap {} KiB, RSS {} MiB",
            round.transitions,
            round.mid_caption,
            round.slowest,
            figures[r as usize].0,
            figures[r as usize].1 / 1024,
            figures[r as usize].2 >> 20
        );
    }
    let (t1, h1, r1) = figures[0];
    let (t3, h3, r3) = figures[2];
    assert!(t3 <= t1 + 2, "threads grew from {t1} to {t3}");
    // The model is dropped when both pipelines are at NULL, so the heap comes back down.
    assert!(
        h3 <= h1 + (256 << 10),
        "the Rust heap grew from {h1} to {h3} bytes"
    );
    assert!(r3 <= r1 + (64 << 20), "RSS grew from {r1} to {r3} bytes");
}

#[test]
fn elements_disposed_mid_caption_leave_nothing_behind() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = |rounds: usize| {
        for i in 0..rounds {
            let pipeline = live_pipeline();
            let caption = pipeline.by_name("c").unwrap();
            caption.set_property("max-new-tokens", 64u32);
            let bus = pipeline.bus().unwrap();
            set_state_within(&pipeline, gst::State::Playing).unwrap();
            // Wait for the first caption to be under way, then tear everything down.
            let deadline = Instant::now() + TIMEOUT;
            while caption.property::<u64>("frames-encoded") < 2 {
                assert!(Instant::now() < deadline, "round {i}: nothing encoded");
                std::thread::sleep(Duration::from_millis(10));
            }
            let t0 = Instant::now();
            set_state_within(&pipeline, gst::State::Null).unwrap();
            let took = t0.elapsed();
            assert!(took < TRANSITION_BOUND, "round {i}: NULL took {took:?}");
            let msgs: Vec<gst::Message> = std::iter::from_fn(|| bus.pop()).collect();
            assert!(errors(&msgs).is_empty(), "round {i}: {:?}", errors(&msgs));
            drop(caption);
            drop(pipeline);
        }
    };
    run(3);
    settle();
    let (t1, h1) = (thread_count(), live_bytes());
    run(10);
    settle();
    let (t2, h2) = (thread_count(), live_bytes());
    println!(
        "after 3 disposals: {t1} threads, heap {} KiB; after 10 more: {t2} threads, heap {} KiB",
        h1 / 1024,
        h2 / 1024
    );
    assert!(t2 <= t1 + 2, "threads grew from {t1} to {t2}");
    assert!(
        h2 <= h1 + (4 << 20),
        "the Rust heap grew from {h1} to {h2} bytes"
    );
}
