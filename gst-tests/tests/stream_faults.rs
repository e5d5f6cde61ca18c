//! Stream faults through the element (issue 13): what a real upstream or downstream throws at
//! it. The stream either goes on (captions keep coming, every video buffer passes) or ends with
//! a one-line error a user can act on; never a panic, a stall of the video or a hang.
//!
//! `cargo test -p llamavid-gst-tests --test stream_faults`

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst_video::VideoFormat;
use llamavid_gst_tests::alloc_meter::MeteredAllocator;
use llamavid_gst_tests::*;

// Any single allocation above 1 GiB aborts the test binary: frame sizes must not turn into
// unbounded allocations.
#[global_allocator]
static ALLOC: MeteredAllocator = MeteredAllocator;

/// The most a push may take with `frame-policy=drop`: the streaming thread copies a sampled
/// frame out and never waits for the model (generous for a debug build on a loaded machine).
const CHAIN_BOUND: Duration = Duration::from_secs(2);

fn ms(t: gst::ClockTime) -> u64 {
    t.mseconds()
}

/// Fails unless the caption buffers on `text_src` never go backwards in time.
fn assert_text_monotonic(items: &[TextItem]) {
    let captions = text_captions(items);
    for pair in captions.windows(2) {
        assert!(
            pair[1].0 >= pair[0].0 + pair[0].1,
            "text went backwards: {:?} after {:?}",
            (ms(pair[1].0), ms(pair[1].1)),
            (ms(pair[0].0), ms(pair[0].1))
        );
    }
}

/// Pushes `buffer` and returns how long the push took.
fn timed_push(run: &mut CaptionRun, buffer: gst::Buffer) -> Duration {
    let t0 = Instant::now();
    run.push(buffer);
    t0.elapsed()
}

#[test]
fn one_pixel_8k_and_extreme_aspect_frames_are_captioned() {
    for info in [
        video_info(VideoFormat::Rgbx, 1, 1),
        video_info(VideoFormat::I420, 1, 1),
        video_info(VideoFormat::Nv12, 7680, 4320),
        // Extreme aspect ratios: resized to the model's shortest edge, a 8192x1 frame is
        // 1.8 million pixels wide (1.2 GB as RGB) before the centre crop keeps 224 of them.
        video_info(VideoFormat::Rgb, 8192, 1),
        video_info(VideoFormat::I420, 2, 8192),
    ] {
        let element = caption_element();
        // One frame each: an 8K frame is ~50 MB, and preprocessing runs unoptimised in tests.
        element.set_property("sample-interval", 1000u64);
        element.set_property("caption-interval", 1000u64);
        let mut run = CaptionRun::new(element, info.clone());
        run.push_frame(0);
        run.push_frame(1000);
        run.finish();
        assert!(
            run.bus.errors().is_empty(),
            "{}x{}: {:?}",
            info.width(),
            info.height(),
            run.bus.errors()
        );
        let captions = run.bus.captions();
        assert!(
            !captions.is_empty(),
            "{}x{} {:?}: no caption",
            info.width(),
            info.height(),
            info.format()
        );
        assert_eq!(run.pull_all().len(), 2);
    }
}

#[test]
fn timestamps_that_go_backwards_or_jump_by_hours_keep_the_stream_going() {
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    let mut run = CaptionRun::new(caption_element(), info.clone());
    const HOUR: u64 = 3_600_000;
    let mut times: Vec<u64> = (0..=1000).step_by(100).collect();
    // Backwards by most of a second, on past the start, then an hour ahead, then back to 0.
    times.extend((300..=1500).step_by(100));
    times.extend((HOUR..=HOUR + 1000).step_by(100));
    times.extend((0..=500).step_by(100));
    times.extend((5 * HOUR..=5 * HOUR + 600).step_by(100));
    for (i, &pts) in times.iter().enumerate() {
        run.push(timed(video_frame(&info, i as u32), pts, 100));
    }
    let items = run.finish();

    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    let captions = run.bus.captions();
    assert!(
        captions.len() >= 4,
        "captions before and after each jump: {captions:?}"
    );
    assert!(
        captions.iter().any(|c| c.end >= 5 * HOUR * MS),
        "captions go on after the jump to 5 h: {captions:?}"
    );
    assert_text_monotonic(&items);
    assert_eq!(run.pull_all().len(), times.len(), "every frame passed");
}

#[test]
fn buffers_with_and_without_timestamps_mixed_keep_the_stream_going() {
    let info = video_info(VideoFormat::I420, 64, 48);
    let mut run = CaptionRun::new(caption_element(), info.clone());
    for i in 0..30u32 {
        let mut buffer = video_frame(&info, i);
        if i % 3 != 0 {
            let b = buffer.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_mseconds(u64::from(i) * 100));
            // Durations that lie: zero, and absurdly long.
            b.set_duration(gst::ClockTime::from_mseconds(
                [0, 100, 10_000_000][i as usize % 3],
            ));
        }
        run.push(buffer);
    }
    let items = run.finish();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    assert!(!run.bus.captions().is_empty(), "no caption");
    assert_text_monotonic(&items);
    assert_eq!(run.pull_all().len(), 30, "every frame passed");
}

/// Pushes frames at stream times `pts_ms` in `segment`; returns the captions and text items.
fn run_in_segment(
    segment: gst::FormattedSegment<gst::ClockTime>,
    pts_ms: impl IntoIterator<Item = u64>,
) -> (Vec<Caption>, Vec<TextItem>, usize) {
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    let mut run = CaptionRun::new(caption_element(), info.clone());
    // The harness sends its own default segment with the first buffer; replace it.
    run.push_frame(0);
    assert!(run.push_event(gst::event::Segment::new(&segment)));
    let mut pushed = 1;
    for pts in pts_ms {
        run.push(timed(video_frame(&info, pts as u32 / 100), pts, 100));
        pushed += 1;
    }
    let items = run.finish();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    assert_eq!(run.pull_all().len(), pushed, "every frame passed");
    let captions = run.bus.captions();
    (captions, items, pushed)
}

#[test]
fn buffers_before_the_segment_start_are_passed_but_not_sampled() {
    // "Negative" running time: buffers before the segment's start (a decoder's preroll after
    // a seek) have none; they pass on and are not captioned.
    init();
    let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
    segment.set_start(gst::ClockTime::from_seconds(10));
    segment.set_time(gst::ClockTime::from_seconds(10));
    let (captions, items, _) = run_in_segment(segment, (8000..=11_000).step_by(100));
    assert!(!captions.is_empty(), "no caption");
    assert!(
        captions.iter().all(|c| c.end <= 1000 * MS),
        "only the frames from the segment's start are sampled: {captions:?}"
    );
    assert_text_monotonic(&items);
}

#[test]
fn gap_events_on_the_video_pass_and_captions_go_on() {
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    let mut run = CaptionRun::new(caption_element(), info);
    run.push_frames_until(500);
    // Two seconds without pictures, announced as gaps (a live source that lost its signal).
    for s in [600u64, 1600] {
        assert!(run.push_event(
            gst::event::Gap::builder(gst::ClockTime::from_mseconds(s))
                .duration(gst::ClockTime::from_seconds(1))
                .build()
        ));
    }
    for pts in (2600..=3600).step_by(100) {
        run.push_frame(pts);
    }
    run.finish();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    let captions = run.bus.captions();
    assert!(
        captions.iter().any(|c| c.end >= 3000 * MS),
        "captions after the gap: {captions:?}"
    );
    let gaps = run
        .pull_events()
        .iter()
        .filter(|e| e.type_() == gst::EventType::Gap)
        .count();
    assert_eq!(gaps, 2, "the gaps went on downstream");
}

/// A text consumer that answers every caption buffer with `answer`, optionally after
/// blocking until `release` is set.
fn link_text_consumer(
    element: &gst::Element,
    answer: Result<gst::FlowSuccess, gst::FlowError>,
    release: Option<Arc<AtomicBool>>,
) -> (gst::Pad, Arc<AtomicUsize>) {
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let pad = gst::Pad::builder(gst::PadDirection::Sink)
        .name("refusing_text_sink")
        .chain_function(move |_pad, _parent, _buffer| {
            counter.fetch_add(1, Ordering::SeqCst);
            if let Some(release) = &release {
                let until = Instant::now() + TIMEOUT;
                while !release.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            answer
        })
        .event_function(|_pad, _parent, _event| true)
        .build();
    pad.set_active(true).unwrap();
    element
        .static_pad("text_src")
        .unwrap()
        .link(&pad)
        .expect("link text_src");
    (pad, received)
}

/// The element in a harness with a custom text consumer (not [`CaptionRun`]'s).
fn harness_with_text_consumer(
    element: &gst::Element,
) -> (gst_check::Harness, BusLog, gst_video::VideoInfo) {
    let bus = BusLog::attach(element);
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    let mut harness = gst_check::Harness::with_element(element, Some("sink"), Some("src"));
    harness.set_src_caps(info.to_caps().unwrap());
    (harness, bus, info)
}

#[test]
fn a_text_consumer_that_blocks_never_stalls_the_video() {
    let element = caption_element();
    element.set_property_from_str("frame-policy", "drop");
    let release = Arc::new(AtomicBool::new(false));
    let (_pad, received) =
        link_text_consumer(&element, Ok(gst::FlowSuccess::Ok), Some(release.clone()));
    let (harness, _bus, info) = harness_with_text_consumer(&element);
    let harness = Arc::new(Mutex::new(harness));
    // Push until the consumer is stuck on a caption, then 3 s more of frames.
    let mut slowest = Duration::ZERO;
    let mut stuck_at = None;
    let started = Instant::now();
    let mut pts = 0u64;
    loop {
        let buffer = timed(video_frame(&info, (pts / 100) as u32), pts, 100);
        let h = harness.clone();
        let t0 = Instant::now();
        let flow = within("a video push", TIMEOUT, move || {
            h.lock().unwrap().push(buffer)
        });
        slowest = slowest.max(t0.elapsed());
        assert_eq!(flow, Ok(gst::FlowSuccess::Ok));
        pts += 100;
        if stuck_at.is_none() && received.load(Ordering::SeqCst) > 0 {
            stuck_at = Some(Instant::now());
        }
        if stuck_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "no caption reached the text consumer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        slowest < CHAIN_BOUND,
        "a push took {slowest:?} while the text consumer was blocked"
    );
    let pulled = std::iter::from_fn(|| harness.lock().unwrap().try_pull()).count();
    assert_eq!(pulled as u64, pts / 100, "every frame passed");
    release.store(true, Ordering::SeqCst);
    let h = harness.clone();
    assert!(within("EOS", TIMEOUT, move || h
        .lock()
        .unwrap()
        .push_event(gst::event::Eos::new())));
    let h = harness.clone();
    within("stopping", TIMEOUT, move || drop(h.lock().unwrap()));
}

#[test]
fn eos_while_a_caption_decodes_ends_both_streams_promptly() {
    let element = caption_element();
    // Long captions: EOS arrives while one is being decoded.
    element.set_property("max-new-tokens", 48u32);
    let mut run = CaptionRun::new(element, video_info(VideoFormat::Rgbx, 64, 48));
    run.push_frames_until(500);
    // The first caption is now due and decoding.
    let t0 = Instant::now();
    let items = run.finish();
    let took = t0.elapsed();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    let eos = run
        .pull_events()
        .iter()
        .any(|e| e.type_() == gst::EventType::Eos);
    assert!(eos, "EOS on the video pad");
    assert!(
        !text_captions(&items).is_empty(),
        "the caption in flight is delivered before EOS"
    );
    assert!(took < TIMEOUT, "EOS took {took:?}");
}

#[test]
fn flushes_while_a_caption_decodes_restart_cleanly_and_never_stall_the_video() {
    let element = caption_element();
    element.set_property("max-new-tokens", 48u32);
    element.set_property_from_str("frame-policy", "drop");
    let mut run = CaptionRun::new(element, video_info(VideoFormat::Rgbx, 64, 48));
    let mut slowest = Duration::ZERO;
    for round in 0..5u64 {
        let base = round * 10_000;
        for pts in (0..=600).step_by(100) {
            let frame = timed(video_frame(&run.info, pts as u32 / 100), base + pts, 100);
            slowest = slowest.max(timed_push(&mut run, frame));
        }
        // A flushing seek's events, mid-caption.
        assert!(run.push_event(gst::event::FlushStart::new()));
        assert!(run.push_event(gst::event::FlushStop::new(true)));
        let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
        segment.set_start(gst::ClockTime::from_mseconds(base + 10_000));
        segment.set_time(gst::ClockTime::from_mseconds(base + 10_000));
        assert!(run.push_event(gst::event::Segment::new(&segment)));
    }
    for pts in (50_000..=51_000).step_by(100) {
        let frame = timed(video_frame(&run.info, pts as u32 / 100), pts, 100);
        slowest = slowest.max(timed_push(&mut run, frame));
    }
    let items = run.finish();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    assert!(
        slowest < CHAIN_BOUND,
        "a push took {slowest:?} around flushes"
    );
    let last_flush = items
        .iter()
        .rposition(|i| matches!(i, TextItem::Event(e) if e.type_() == gst::EventType::FlushStop))
        .expect("the flushes reached text_src");
    assert!(
        !text_captions(&items[last_flush..]).is_empty(),
        "captions resume after the flushes"
    );
}
