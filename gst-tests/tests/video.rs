//! The video path: buffers pass through untouched, every accepted format and memory layout is
//! captioned (and read correctly), other caps are refused, and the stream may change size or
//! come without timestamps.

use gst::prelude::*;
use gst_video::VideoFormat;
use llamavid_gst_tests::*;

/// What must survive the element: everything of a buffer but its metas.
#[derive(Debug, PartialEq, Eq)]
struct BufferFacts {
    data: Vec<u8>,
    pts: Option<gst::ClockTime>,
    dts: Option<gst::ClockTime>,
    duration: Option<gst::ClockTime>,
    offset: u64,
    offset_end: u64,
    flags: gst::BufferFlags,
}

impl BufferFacts {
    fn of(buffer: &gst::BufferRef) -> Self {
        Self {
            data: buffer.map_readable().expect("readable").to_vec(),
            pts: buffer.pts(),
            dts: buffer.dts(),
            duration: buffer.duration(),
            offset: buffer.offset(),
            offset_end: buffer.offset_end(),
            flags: buffer.flags(),
        }
    }
}

#[test]
fn video_buffers_leave_src_unchanged_but_for_the_caption_meta() {
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    let mut run = CaptionRun::new(caption_element(), info.clone());
    let mut sent = Vec::new();
    for i in 0..12u64 {
        let mut buffer = timed(video_frame(&info, i as u32), i * 100, 100);
        {
            let b = buffer.get_mut().unwrap();
            b.set_dts(
                gst::ClockTime::from_mseconds(i * 100)
                    .checked_sub(gst::ClockTime::from_mseconds(5)),
            );
            b.set_offset(i);
            b.set_offset_end(i + 1);
            let mut flags = if i == 0 {
                gst::BufferFlags::DISCONT
            } else {
                gst::BufferFlags::DELTA_UNIT
            };
            if i == 7 {
                flags |= gst::BufferFlags::MARKER | gst::BufferFlags::DROPPABLE;
            }
            b.set_flags(flags);
        }
        sent.push(BufferFacts::of(&buffer));
        run.push(buffer);
    }
    run.finish();

    let received: Vec<BufferFacts> = run.pull_all().iter().map(|b| BufferFacts::of(b)).collect();
    assert_eq!(received.len(), sent.len(), "one buffer out per buffer in");
    for (i, (got, want)) in received.iter().zip(&sent).enumerate() {
        assert_eq!(got, want, "buffer {i} changed on its way through");
    }

    // The caps downstream are the caps upstream, and the stream ends with EOS.
    let caps = run
        .harness()
        .sinkpad()
        .unwrap()
        .current_caps()
        .expect("caps downstream");
    assert_eq!(caps, info.to_caps().unwrap());
    let events = run.pull_events();
    assert!(
        events.iter().any(|e| e.type_() == gst::EventType::Eos),
        "EOS leaves src: {events:?}"
    );
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
}

/// Pushes 6 frames laid out as `layout` (under caps from `caps_info`) at 100 ms steps, frame
/// `i` showing `picture(i)`, and returns the caption due at 500 ms. 8 tokens, so that
/// different pictures rarely give the same text.
fn caption_of(
    caps_info: &gst_video::VideoInfo,
    layout: &gst_video::VideoInfo,
    picture: impl Fn(u32) -> u32,
) -> String {
    let element = caption_element();
    element.set_property("max-new-tokens", 8u32);
    let mut run = CaptionRun::new(element, caps_info.clone());
    for i in 0..6u64 {
        run.push(timed(video_frame(layout, picture(i as u32)), i * 100, 100));
    }
    let caption = run.bus.next_caption();
    assert_eq!(caption.frames, 6, "every frame sampled: {caption:?}");
    assert!(
        !caption.text.is_empty(),
        "a caption for {:?}",
        caps_info.format()
    );
    caption.text
}

/// A picture that changes every frame.
fn moving(i: u32) -> u32 {
    i
}

#[test]
fn every_accepted_format_is_captioned_at_even_and_odd_sizes() {
    use VideoFormat::*;
    for format in [Rgb, Rgbx, Bgrx, Rgba, Bgra, I420, Nv12] {
        for (width, height) in [(64, 48), (63, 47), (161, 121)] {
            let info = video_info(format, width, height);
            let text = caption_of(&info, &info, moving);
            println!("{format:?} {width}x{height}: {text:?}");
        }
    }
}

#[test]
fn captions_depend_on_the_picture() {
    // Without this, the equalities in the tests below would prove nothing.
    let info = video_info(VideoFormat::Rgbx, 64, 48);
    assert_ne!(
        caption_of(&info, &info, moving),
        caption_of(&info, &info, |_| 7),
        "the fixture model gives the same caption to different pictures"
    );
}

#[test]
fn packed_rgb_formats_with_the_same_pixels_give_the_same_caption() {
    // The channel order and the unused or alpha byte are read correctly, or the model would
    // see other colours.
    let rgb = video_info(VideoFormat::Rgb, 64, 48);
    let reference = caption_of(&rgb, &rgb, moving);
    for format in [
        VideoFormat::Rgbx,
        VideoFormat::Bgrx,
        VideoFormat::Rgba,
        VideoFormat::Bgra,
    ] {
        let info = video_info(format, 64, 48);
        assert_eq!(
            caption_of(&info, &info, moving),
            reference,
            "{format:?} differs from RGB"
        );
    }
}

#[test]
fn padded_strides_and_plane_offsets_give_the_same_caption_as_the_default_layout() {
    // Buffers with a VideoMeta describing longer lines and planes further apart (padding
    // filled with 0xAB): the element must read the meta's layout, not the caps' default one.
    for (format, width, height) in [
        (VideoFormat::Rgbx, 64, 48),
        (VideoFormat::Rgb, 63, 47),
        (VideoFormat::I420, 64, 48),
        (VideoFormat::I420, 63, 47),
        (VideoFormat::Nv12, 62, 46),
    ] {
        let info = video_info(format, width, height);
        let padded = padded_info(&info, 128, 96);
        assert_eq!(
            caption_of(&info, &padded, moving),
            caption_of(&info, &info, moving),
            "{format:?} {width}x{height} with padded strides"
        );
    }
}

/// Starts the element and offers it `caps` as a source would: they must not get through, and
/// a buffer after them must be refused as not negotiated.
fn assert_caps_refused(caps: gst::Caps) {
    let element = caption_element();
    let mut bus = BusLog::attach(&element);
    let sinkpad = element.static_pad("sink").unwrap();
    assert!(
        !sinkpad.query_accept_caps(&caps),
        "{caps} accepted by query"
    );

    let mut harness = gst_check::Harness::with_element(&element, Some("sink"), Some("src"));
    harness.push_event(gst::event::StreamStart::new("refused"));
    // A sticky event counts as handled once stored on the harness' pad, whatever the element
    // said; what matters is that it got no further.
    harness.push_event(gst::event::Caps::new(&caps));
    assert_eq!(sinkpad.current_caps(), None, "{caps} reached the element");
    let downstream = harness.sinkpad().unwrap().current_caps();
    assert_eq!(downstream, None, "{caps} went downstream");
    harness.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
        gst::ClockTime,
    >::new()));
    let buffer = gst::Buffer::with_size(64 * 48).unwrap();
    assert_eq!(harness.push(buffer), Err(gst::FlowError::NotNegotiated));
    assert!(bus.captions().is_empty());
}

#[test]
fn unsupported_caps_are_refused() {
    init();
    assert_caps_refused(video_info(VideoFormat::Gray8, 64, 48).to_caps().unwrap());
    assert_caps_refused(video_info(VideoFormat::Yuy2, 64, 48).to_caps().unwrap());
    assert_caps_refused(
        gst::Caps::builder("audio/x-raw")
            .field("format", "S16LE")
            .field("rate", 48_000i32)
            .field("channels", 2i32)
            .field("layout", "interleaved")
            .build(),
    );
}

#[test]
fn a_source_that_only_offers_unsupported_caps_fails_with_a_negotiation_error() {
    init();
    let make = |name: &str| gst::ElementFactory::make(name).build().unwrap();
    let source = gst::ElementFactory::make("videotestsrc")
        .property("num-buffers", 5i32)
        .build()
        .unwrap();
    let filter = gst::ElementFactory::make("capsfilter")
        .property(
            "caps",
            video_info(VideoFormat::Gray8, 64, 48).to_caps().unwrap(),
        )
        .build()
        .unwrap();
    let caption = caption_element();
    let sink = make("fakesink");
    let pipeline = gst::Pipeline::new();
    pipeline
        .add_many([&source, &filter, &caption, &sink])
        .unwrap();
    source.link(&filter).unwrap();
    // Linking checks caps and would refuse at once; link anyway so that negotiation fails
    // while playing, as it does when the source's caps are only known then.
    filter
        .static_pad("src")
        .unwrap()
        .link_full(
            &caption.static_pad("sink").unwrap(),
            gst::PadLinkCheck::empty(),
        )
        .unwrap();
    caption.link(&sink).unwrap();

    let bus = pipeline.bus().unwrap();
    let _ = set_state_within(&pipeline, gst::State::Playing);
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(TIMEOUT.as_secs()),
            &[gst::MessageType::Error, gst::MessageType::Eos],
        )
        .expect("an error within the timeout");
    let error = errors(std::slice::from_ref(&msg));
    set_state_within(&pipeline, gst::State::Null).unwrap();
    assert_eq!(error.len(), 1, "an error, not {msg:?}");
    assert!(
        error[0].contains("not-negotiated"),
        "a negotiation error: {}",
        error[0]
    );
}

#[test]
fn a_resolution_change_mid_stream_keeps_the_captions_coming() {
    let small = video_info(VideoFormat::I420, 64, 48);
    let large = video_info(VideoFormat::I420, 96, 72);
    let mut run = CaptionRun::new(caption_element(), small.clone());
    run.push_frames_until(400);

    // Renegotiate as a source would, then go on with larger frames.
    run.harness().set_src_caps(large.to_caps().unwrap());
    run.info = large.clone();
    for pts in (500..=1000).step_by(100) {
        run.push_frame(pts);
    }
    let first = run.bus.next_caption();
    let second = run.bus.next_caption();
    run.finish();

    assert_eq!((first.end, second.end), (500 * MS, 1000 * MS));
    assert_eq!(second.frames, 11, "the window spans both sizes");
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    let caps = run.harness().sinkpad().unwrap().current_caps().unwrap();
    assert_eq!(
        caps,
        large.to_caps().unwrap(),
        "the new caps went downstream"
    );
    assert_eq!(run.pull_all().len(), 11, "every frame passed");
}

/// Pushes 11 frames with neither PTS nor DTS, each with `duration_ms` (or none), and returns
/// the captions.
fn captions_without_timestamps(
    info: gst_video::VideoInfo,
    duration_ms: Option<u64>,
) -> Vec<Caption> {
    let mut run = CaptionRun::new(caption_element(), info.clone());
    for i in 0..11u32 {
        let mut buffer = video_frame(&info, i);
        buffer
            .get_mut()
            .unwrap()
            .set_duration(duration_ms.map(gst::ClockTime::from_mseconds));
        run.push(buffer);
    }
    let captions = vec![run.bus.next_caption(), run.bus.next_caption()];
    run.finish();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    assert_eq!(run.pull_all().len(), 11, "every frame passed");
    captions
}

#[test]
fn buffers_without_timestamps_are_sampled_by_frame_rate() {
    // 10 fps caps: the element counts 100 ms per frame, so captions fall due at 500 and 1000 ms.
    let captions = captions_without_timestamps(video_info(VideoFormat::Rgbx, 64, 48), None);
    let ends: Vec<u64> = captions.iter().map(|c| c.end / MS).collect();
    assert_eq!(ends, [500, 1000]);
    assert_eq!(captions[1].frames, 11);
}

#[test]
fn buffers_without_timestamps_are_sampled_by_duration_without_a_frame_rate() {
    let info = gst_video::VideoInfo::builder(VideoFormat::Rgbx, 64, 48)
        .fps(gst::Fraction::new(0, 1))
        .build()
        .unwrap();
    let captions = captions_without_timestamps(info, Some(100));
    let ends: Vec<u64> = captions.iter().map(|c| c.end / MS).collect();
    assert_eq!(ends, [500, 1000]);
}

#[test]
fn drop_policy_never_blocks_the_video_and_counts_the_dropped_frames() {
    // 40 frames pushed at once, every one sampled: the worker cannot keep up, so waiting frames
    // are dropped (oldest first) rather than holding the video back, and each drop is counted
    // and reported with a QoS message.
    let element = caption_element();
    element.set_property_from_str("frame-policy", "drop");
    let mut run = CaptionRun::new(element, video_info(VideoFormat::Rgbx, 64, 48));
    run.push_frames_until(3900);
    let sampled = run.element.property::<u64>("frames-sampled");
    let dropped = run.element.property::<u64>("frames-dropped");
    run.finish();
    let encoded = run.element.property::<u64>("frames-encoded");

    assert_eq!(sampled, 40);
    assert!(
        dropped > 0,
        "nothing dropped: the worker kept up with 40 frames at once?"
    );
    assert_eq!(
        encoded + dropped,
        sampled,
        "each sampled frame is encoded or dropped"
    );
    let qos = run
        .bus
        .drain()
        .iter()
        .filter(|m| m.type_() == gst::MessageType::Qos)
        .count();
    assert_eq!(qos as u64, dropped, "one QoS message per dropped frame");
    assert_eq!(run.pull_all().len(), 40, "every frame passed");
}
