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
fn caps_that_change_every_three_frames_keep_the_captions_coming() {
    let layouts = [
        video_info(VideoFormat::Rgbx, 64, 48),
        video_info(VideoFormat::I420, 33, 17),
        video_info(VideoFormat::Nv12, 2, 2),
        video_info(VideoFormat::Bgra, 1, 1),
        video_info(VideoFormat::Rgb, 97, 13),
        padded_info(&video_info(VideoFormat::I420, 50, 30), 7, 13),
    ];
    let mut run = CaptionRun::new(caption_element(), layouts[0].clone());
    let mut pushed = 0;
    for (i, pts) in (0..=3000).step_by(100).enumerate() {
        if i > 0 && i % 3 == 0 {
            let info = layouts[(i / 3) % layouts.len()].clone();
            run.harness().set_src_caps(info.to_caps().unwrap());
            run.info = info;
        }
        run.push_frame(pts);
        pushed += 1;
    }
    let items = run.finish();

    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    let captions = run.bus.captions();
    // No final caption at EOS: the last frame (3000 ms) falls due itself, and nothing was
    // sampled after it.
    assert_eq!(captions.len(), 6, "a caption each 500 ms: {captions:?}");
    assert_eq!(captions.last().unwrap().end, 3000 * MS);
    assert_text_monotonic(&items);
    assert_eq!(run.pull_all().len(), pushed, "every frame passed");
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
fn a_segment_at_double_rate_samples_by_running_time() {
    init();
    let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
    segment.set_rate(2.0);
    // 4 s of stream at rate 2 is 2 s of running time: captions at 0.5, 1, 1.5 and 2 s.
    let (captions, items, _) = run_in_segment(segment, (100..=4000).step_by(100));
    let ends: Vec<u64> = captions.iter().map(|c| c.end / MS).collect();
    assert!(
        ends.windows(2).all(|w| w[1] > w[0]) && *ends.last().unwrap() <= 2000,
        "caption ends are running times: {ends:?}"
    );
    assert!(ends.len() >= 3, "{ends:?}");
    assert_text_monotonic(&items);
}

#[test]
fn a_reverse_segment_keeps_the_stream_going() {
    init();
    let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
    segment.set_rate(-1.0);
    segment.set_start(gst::ClockTime::ZERO);
    segment.set_stop(gst::ClockTime::from_seconds(3));
    // Reverse playback: stream time runs down, running time up.
    let (captions, items, _) = run_in_segment(segment.clone(), (0..=2900).rev().step_by(100));
    assert!(captions.len() >= 3, "{captions:?}");
    // The text's running time goes up as GStreamer reckons it in reverse (from each buffer's
    // end, PTS + duration): each caption starts where the previous one ended or later. The
    // final caption at EOS lasts past the segment's end and is stamped at its edge (start).
    let mut captions = text_captions(&items);
    let last = captions.pop().expect("captions on text_src");
    let running: Vec<(u64, u64)> = captions
        .iter()
        .map(|&(pts, duration, _)| {
            let start = segment
                .to_running_time(pts + duration)
                .expect("inside the segment");
            (ms(start), ms(duration))
        })
        .collect();
    assert!(
        running.windows(2).all(|w| w[1].0 >= w[0].0 + w[0].1),
        "running time went backwards: {running:?}"
    );
    assert!(
        last.0 == gst::ClockTime::ZERO || segment.to_running_time(last.0 + last.1).is_some(),
        "the last caption lies outside the segment: {last:?}"
    );
}

#[test]
fn buffers_before_the_segment_start_are_passed_but_not_sampled() {
    // "Negative" running time: buffers before the segment's start (a decoder's preroll after
    // a seek) have none; they pass on and are not captioned.
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
fn a_text_consumer_that_fails_every_caption_does_not_stop_the_video() {
    for answer in [
        Err(gst::FlowError::Error),
        Err(gst::FlowError::NotNegotiated),
        Err(gst::FlowError::Flushing),
        Err(gst::FlowError::Eos),
    ] {
        let element = caption_element();
        let (_pad, received) = link_text_consumer(&element, answer, None);
        let (mut harness, mut bus, info) = harness_with_text_consumer(&element);
        for pts in (0..=2000).step_by(100) {
            let buffer = timed(video_frame(&info, pts as u32 / 100), pts, 100);
            assert_eq!(harness.push(buffer), Ok(gst::FlowSuccess::Ok), "{answer:?}");
        }
        assert!(harness.push_event(gst::event::Eos::new()));
        assert!(bus.errors().is_empty(), "{answer:?}: {:?}", bus.errors());
        // At 500, 1000, 1500 and 2000 ms; nothing sampled after the last, so no final one.
        assert_eq!(
            bus.captions().len(),
            4,
            "{answer:?}: captions still reach the bus"
        );
        assert!(received.load(Ordering::SeqCst) >= 1, "{answer:?}");
        let video = std::iter::from_fn(|| harness.try_pull()).count();
        assert_eq!(video, 21, "{answer:?}: every frame passed");
    }
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
fn text_src_unlinked_still_posts_captions_and_passes_the_video() {
    let element = caption_element();
    let mut bus = BusLog::attach(&element);
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    let mut harness = gst_check::Harness::with_element(&element, Some("sink"), Some("src"));
    harness.set_src_caps(info.to_caps().unwrap());
    for pts in (0..=1000).step_by(100) {
        let buffer = timed(video_frame(&info, pts as u32 / 100), pts, 100);
        assert_eq!(harness.push(buffer), Ok(gst::FlowSuccess::Ok));
    }
    assert!(harness.push_event(gst::event::Eos::new()));
    assert!(bus.errors().is_empty(), "{:?}", bus.errors());
    // Unlinked is a normal way to use the element (captions from the bus or the meta only):
    // nothing may warn about it. (The fixture's small context warns about the window at load.)
    let about_text: Vec<_> = bus
        .warnings()
        .into_iter()
        .filter(|w| w.contains("link") || w.contains("text_src"))
        .collect();
    assert!(about_text.is_empty(), "{about_text:?}");
    assert_eq!(bus.captions().len(), 2);
    assert_eq!(std::iter::from_fn(|| harness.try_pull()).count(), 11);
}

#[test]
fn a_text_consumer_taking_no_text_format_leaves_the_video_and_bus_captions_going() {
    // Downstream of text_src takes only something the element cannot produce: linked without
    // the caps check, as a bin's ghost pad or a late relink would be, and refusing every caps.
    let element = caption_element();
    let sink = gst::Pad::builder(gst::PadDirection::Sink)
        .name("subtitle_only_sink")
        .query_function(|_pad, _parent, query| match query.view_mut() {
            gst::QueryViewMut::Caps(q) => {
                q.set_result(&gst::Caps::builder("application/x-subtitle").build());
                true
            }
            gst::QueryViewMut::AcceptCaps(q) => {
                q.set_result(false);
                true
            }
            _ => false,
        })
        .event_function(|_pad, _parent, event| event.type_() != gst::EventType::Caps)
        .chain_function(|_pad, _parent, _buffer| Err(gst::FlowError::NotNegotiated))
        .build();
    sink.set_active(true).unwrap();
    element
        .static_pad("text_src")
        .unwrap()
        .link_full(&sink, gst::PadLinkCheck::empty())
        .expect("link text_src");
    let (mut harness, mut bus, info) = harness_with_text_consumer(&element);
    for pts in (0..=1000).step_by(100) {
        let buffer = timed(video_frame(&info, pts as u32 / 100), pts, 100);
        assert_eq!(harness.push(buffer), Ok(gst::FlowSuccess::Ok));
    }
    assert!(harness.push_event(gst::event::Eos::new()));
    assert!(bus.errors().is_empty(), "{:?}", bus.errors());
    assert_eq!(bus.captions().len(), 2, "captions still reach the bus");
    assert_eq!(std::iter::from_fn(|| harness.try_pull()).count(), 11);
    drop(sink);
}

#[test]
fn video_downstream_not_negotiated_is_a_negotiation_error_not_a_hang() {
    // A video consumer that takes only I420 behind an RGBx source: the element returns the
    // flow upstream (the source posts the error) and stops cleanly.
    init();
    let pipeline = gst::parse::launch(
        "videotestsrc num-buffers=30 ! video/x-raw,format=RGBx,width=64,height=48,framerate=10/1 \
         ! llamavidcaption name=c",
    )
    .expect("pipeline")
    .downcast::<gst::Pipeline>()
    .unwrap();
    // Linked without the caps check (parse-launch would refuse the link up front), as a late
    // relink or a sink whose caps change would be.
    let sink = gst::ElementFactory::make("appsink")
        .property(
            "caps",
            gst::Caps::builder("video/x-raw")
                .field("format", "I420")
                .build(),
        )
        .property("sync", false)
        .build()
        .unwrap();
    pipeline.add(&sink).unwrap();
    pipeline
        .by_name("c")
        .unwrap()
        .link_pads_full(Some("src"), &sink, Some("sink"), gst::PadLinkCheck::empty())
        .expect("link without checks");
    configure_caption(&pipeline.by_name("c").unwrap());
    let bus = pipeline.bus().unwrap();
    let stop = StopOnDrop(pipeline.clone());
    let _ = set_state_within(&pipeline, gst::State::Playing);
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(TIMEOUT.as_secs()),
            &[gst::MessageType::Error, gst::MessageType::Eos],
        )
        .expect("an error within the timeout, not a hang");
    match msg.view() {
        gst::MessageView::Error(e) => {
            let text = format!(
                "{} {}",
                e.error(),
                e.debug().map(|d| d.to_string()).unwrap_or_default()
            );
            assert!(text.contains("negotiat"), "{text}");
        }
        _ => panic!("EOS: the appsink should have refused RGBx"),
    }
    drop(stop);
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
