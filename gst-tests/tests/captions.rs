//! What a caption looks like on each of its three outputs: the `text_src` stream (events,
//! caps, timestamps, GAPs), the `llamavid-caption` bus message and the `LlamaVidCaptionMeta`
//! on the video; and when captions are made (interval, window, EOS).

use std::sync::{Arc, Mutex};

use gst::prelude::*;
use gst_video::VideoFormat;
use llamavid_gst_tests::*;

fn rgbx() -> gst_video::VideoInfo {
    video_info(VideoFormat::Rgbx, 64, 48)
}

fn ms(t: gst::ClockTime) -> u64 {
    t.mseconds()
}

/// The timed items of a text stream as (kind, start ms, duration ms), kind "caption" or "gap".
fn timeline(items: &[TextItem]) -> Vec<(&'static str, u64, u64)> {
    items
        .iter()
        .filter_map(|item| match item {
            TextItem::Buffer { pts, duration, .. } => Some((
                "caption",
                ms(pts.expect("caption PTS")),
                ms(duration.expect("caption duration")),
            )),
            TextItem::Event(e) => match e.view() {
                gst::EventView::Gap(gap) => {
                    let (pts, duration) = gap.get();
                    Some(("gap", ms(pts), ms(duration.expect("GAP duration"))))
                }
                _ => None,
            },
        })
        .collect()
}

/// Captions and GAPs never overlap and never go backwards.
fn assert_monotonic(items: &[TextItem]) {
    let mut end = 0;
    for (kind, start, duration) in timeline(items) {
        assert!(
            start >= end,
            "{kind} at {start} ms starts before the previous item ends at {end} ms: {:?}",
            timeline(items)
        );
        assert!(duration > 0, "{kind} at {start} ms has no duration");
        end = start + duration;
    }
}

fn event_types(items: &[TextItem]) -> Vec<gst::EventType> {
    text_events(items).iter().map(|e| e.type_()).collect()
}

#[test]
fn text_stream_starts_sparse_with_utf8_caps_and_a_time_segment() {
    let mut run = CaptionRun::new(caption_element(), rgbx());
    run.push_frames_until(600);
    let items = run.finish();

    let events = text_events(&items);
    let gst::EventView::StreamStart(start) = events[0].view() else {
        panic!(
            "the text stream starts with stream-start, not {:?}",
            events[0]
        );
    };
    assert!(
        start.stream_flags().contains(gst::StreamFlags::SPARSE),
        "text is a sparse stream: {:?}",
        start.stream_flags()
    );
    let gst::EventView::Caps(caps) = events[1].view() else {
        panic!("then caps, not {:?}", events[1]);
    };
    assert_eq!(caps.caps().to_owned(), utf8_caps());
    let gst::EventView::Segment(segment) = events[2].view() else {
        panic!("then a segment, not {:?}", events[2]);
    };
    assert_eq!(segment.segment().format(), gst::Format::Time);
    assert_eq!(
        event_types(&items).last(),
        Some(&gst::EventType::Eos),
        "EOS ends the text stream"
    );
}

#[test]
fn captions_are_stamped_with_their_newest_frame_and_last_one_interval() {
    // A caption every 500 ms of 100 ms-sampled frames: the first is due with the frame at
    // 500 ms. Before it, GAPs follow the sampled frames; captions then cover the stream.
    let mut run = CaptionRun::new(caption_element(), rgbx());
    run.push_frames_until(1500);
    let messages = [
        run.bus.next_caption(),
        run.bus.next_caption(),
        run.bus.next_caption(),
    ];
    let items = run.finish();

    assert_eq!(
        timeline(&items),
        [
            ("gap", 0, 100),
            ("gap", 100, 100),
            ("gap", 200, 100),
            ("gap", 300, 100),
            ("gap", 400, 100),
            ("caption", 500, 500),
            ("caption", 1000, 500),
            ("caption", 1500, 500),
        ]
    );
    assert_monotonic(&items);
    // The buffers say what the messages say.
    let texts: Vec<String> = text_captions(&items).into_iter().map(|c| c.2).collect();
    let said: Vec<String> = messages.iter().map(|m| m.text.clone()).collect();
    assert_eq!(texts, said);
    for m in &messages {
        assert_eq!(
            m.end, m.pts,
            "non-final captions are stamped with their newest frame: {m:?}"
        );
    }
}

#[test]
fn gaps_fill_the_text_stream_between_captions_sampled_less_often_than_due() {
    // Frames sampled every 300 ms, captions due every 500 ms: the first comes with the frame at
    // 600 ms, the second with the frame at 1200 ms. The text stream is covered without holes
    // from 0 to the end of the second caption: GAPs up to the first, captions, and a GAP
    // between them (the first caption lasts less than the 600 ms until the second).
    let element = caption_element();
    element.set_property("sample-interval", 300u64);
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(1400);
    let items = run.finish();
    let timeline = timeline(&items);

    let captions: Vec<u64> = timeline
        .iter()
        .filter(|t| t.0 == "caption")
        .map(|t| t.1)
        .collect();
    assert_eq!(captions, [600, 1200], "{timeline:?}");
    assert_eq!(timeline[..2], [("gap", 0, 300), ("gap", 300, 300)]);
    let mut end = 0;
    for &(kind, start, duration) in &timeline {
        assert_eq!(
            start, end,
            "{kind} at {start} ms leaves a hole: {timeline:?}"
        );
        end = start + duration;
    }
    let between = timeline
        .iter()
        .skip_while(|t| t.1 < 600)
        .take_while(|t| t.1 < 1200);
    assert!(
        between.clone().any(|t| t.0 == "gap"),
        "a GAP between the captions: {timeline:?}"
    );
    assert_eq!(
        run.bus.captions().len(),
        2,
        "no final caption: nothing was sampled after the last one"
    );
}

#[test]
fn captions_keep_the_time_of_their_newest_frame_when_intervals_do_not_divide() {
    // Frames sampled every 300 ms, captions due every 500 ms. Whatever frame a caption comes
    // with, it must be stamped with it: the message's `pts` equal to its `end`, the text buffer
    // at that time. (Today the frame at 1500 ms gets a caption stamped 1700 ms, where the one
    // before, from 1200 ms and 500 ms long, ends.)
    let element = caption_element();
    element.set_property("sample-interval", 300u64);
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(3000);
    let items = run.finish();
    let mut messages = run.bus.captions();
    messages.pop(); // may be the final caption, stamped where the stream stands

    assert!(messages.len() >= 3, "{messages:?}");
    for m in &messages {
        assert_eq!(
            m.pts, m.end,
            "caption stamped after its newest frame: {m:?}"
        );
    }
    let starts: Vec<u64> = text_captions(&items)
        .iter()
        .map(|c| c.0.nseconds())
        .collect();
    let ends: Vec<u64> = messages.iter().map(|m| m.end).collect();
    assert_eq!(starts[..ends.len()], ends[..]);
    assert_monotonic(&items);
}

#[test]
fn markup_only_consumers_get_escaped_captions() {
    // The tiny model's greedy captions hold no markup characters; sampled ones sometimes do.
    // Find a seed whose caption has one (deterministic for a seed), then caption the same video
    // for a consumer that takes only pango-markup: the text must come escaped, the bus message
    // unescaped.
    let caption = |seed: u64, accept: gst::Caps| {
        let element = caption_element();
        element.set_property("temperature", 1.5f64);
        element.set_property("max-new-tokens", 16u32);
        element.set_property("seed", seed);
        let mut run = CaptionRun::with_text_caps(element, rgbx(), accept);
        run.push_frames_until(500);
        let items = run.finish();
        // Every seed's run must succeed: a failing one is a bug, not a seed to skip.
        let errors = run.bus.errors();
        assert!(errors.is_empty(), "seed {seed}: {errors:?}");
        let caps = text_caps(&items);
        let message = run.bus.captions().pop().expect("a caption message").text;
        let buffer = text_captions(&items).pop().expect("a caption buffer").2;
        (caps.expect("caps on text_src"), message, buffer)
    };
    let markup = gst::Caps::builder("text/x-raw")
        .field("format", "pango-markup")
        .build();

    let (seed, plain) = (0..200u64)
        .find_map(|seed| {
            let (_, message, buffer) = caption(seed, utf8_caps());
            assert_eq!(message, buffer, "utf8 text is the caption as is");
            message.contains(['<', '>', '&']).then_some((seed, message))
        })
        .expect("no seed in 0..200 gives a caption with <, > or &: escaping cannot be observed");

    let (caps, message, buffer) = caption(seed, markup.clone());
    assert_eq!(caps, markup, "pango-markup negotiated");
    assert_eq!(message, plain, "same seed, same caption");
    assert_eq!(
        buffer,
        gst::glib::markup_escape_text(&plain).as_str(),
        "seed {seed}"
    );
    assert_ne!(buffer, plain);
}

#[test]
fn a_consumer_taking_both_text_formats_gets_utf8() {
    init();
    let both = gst::Caps::builder("text/x-raw")
        .field("format", gst::List::new(["pango-markup", "utf8"]))
        .build();
    let mut run = CaptionRun::with_text_caps(caption_element(), rgbx(), both);
    run.push_frames_until(500);
    let items = run.finish();
    let caps = text_caps(&items).expect("caps");
    assert_eq!(caps, utf8_caps());
}

#[test]
fn caption_message_carries_every_field() {
    let element = caption_element();
    element.set_property("prompt", "What moves in this clip?");
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(500);
    let caption = run.bus.next_caption();
    run.finish();

    // Fields and their types are checked by `Caption::from_message`; here their values.
    assert!(!caption.text.is_empty());
    assert_eq!(caption.start, 0, "the first frame of the window");
    assert_eq!(caption.end, 500 * MS, "the newest frame of the window");
    assert_eq!(caption.pts, 500 * MS);
    assert_eq!(caption.frames, 6, "frames at 0, 100, ..., 500 ms");
    assert!(
        caption.latency > 0 && caption.latency < TIMEOUT.as_nanos() as u64,
        "latency {} ns",
        caption.latency
    );
    assert_eq!(caption.prompt, "What moves in this clip?");
    assert_eq!(
        run.element
            .property::<Option<String>>("last-caption")
            .as_deref(),
        Some(caption.text.as_str())
    );
}

#[test]
fn the_next_video_buffer_after_a_caption_carries_it_as_meta() {
    let mut run = CaptionRun::new(caption_element(), rgbx());
    run.push_frames_until(500);
    let caption = run.bus.next_caption();
    // The element posts the message, then readies the meta, then queues the text: once the
    // text is out the meta is certainly pending.
    run.text
        .wait_for("caption buffer", |items| !text_captions(items).is_empty());
    let before = run.pull_all();
    assert_eq!(before.len(), 6);
    for (i, b) in before.iter().enumerate() {
        // The caption is made after the frame at 500 ms was handed to the worker.
        assert_eq!(
            Caption::from_meta(b),
            None,
            "buffer {i} left before the caption"
        );
    }

    run.push_frame(600);
    run.push_frame(700);
    let after = run.pull_all();
    let carried =
        Caption::from_meta(&after[0]).expect("the first buffer after the caption carries it");
    assert_eq!(carried, caption, "the meta says what the message says");
    assert_eq!(
        Caption::from_meta(&after[1]),
        None,
        "the caption is attached once"
    );
    run.finish();
}

#[test]
fn frames_counts_the_window_and_window_duration_bounds_it() {
    // Without a bound the window grows: 6, 11, 16 frames.
    let mut run = CaptionRun::new(caption_element(), rgbx());
    run.push_frames_until(1500);
    let unbounded: Vec<(u64, u32)> = (0..3)
        .map(|_| run.bus.next_caption())
        .map(|c| (c.start / MS, c.frames))
        .collect();
    run.finish();
    assert_eq!(unbounded, [(0, 6), (0, 11), (0, 16)]);

    // A 300 ms window holds the newest frame and those up to 300 ms before it: 4 frames, and
    // the window's start moves along.
    let element = caption_element();
    element.set_property("window-duration", 300u64);
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(1500);
    let bounded: Vec<(u64, u64, u32)> = (0..3)
        .map(|_| run.bus.next_caption())
        .map(|c| (c.start / MS, c.end / MS, c.frames))
        .collect();
    run.finish();
    assert_eq!(bounded, [(200, 500, 4), (700, 1000, 4), (1200, 1500, 4)]);
}

#[test]
fn eos_brings_a_final_caption_of_the_frames_since_the_last_one_then_eos_on_both_pads() {
    // 1.7 s of video (frames 0..1600 ms), a caption every second: one at 1 s, and at EOS a final
    // one that covers the frames after it (1100..1600 ms).
    let element = caption_element();
    element.set_property("caption-interval", 1000u64);
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(1600);
    let first = run.bus.next_caption();
    assert_eq!(first.end, 1000 * MS);

    // EOS is let through only after the final caption was posted.
    assert!(run.push_event(gst::event::Eos::new()));
    let captions = run.bus.captions();
    assert_eq!(
        captions.len(),
        2,
        "final caption posted before EOS returned: {captions:?}"
    );
    let last = &captions[1];
    assert_eq!(
        last.end,
        1600 * MS,
        "the final caption ends with the last frame"
    );
    assert!(
        last.start <= 1100 * MS,
        "it covers the frames since the previous caption"
    );
    assert_eq!(last.frames, 17, "the whole window: frames 0..1600 ms");
    assert!(
        last.pts >= first.pts + 1000 * MS,
        "after the previous caption ended"
    );

    let items = run.text.wait_eos();
    let texts: Vec<String> = text_captions(&items).into_iter().map(|c| c.2).collect();
    assert_eq!(texts, [first.text.clone(), last.text.clone()]);
    assert_eq!(event_types(&items).last(), Some(&gst::EventType::Eos));
    assert_monotonic(&items);
    let video_events: Vec<gst::EventType> = run.pull_events().iter().map(|e| e.type_()).collect();
    assert_eq!(
        video_events.last(),
        Some(&gst::EventType::Eos),
        "EOS on src"
    );
    assert_eq!(run.pull_all().len(), 17);
}

#[test]
fn eos_right_after_a_caption_adds_no_final_caption() {
    let mut run = CaptionRun::new(caption_element(), rgbx());
    run.push_frames_until(500);
    let items = run.finish();
    assert_eq!(text_captions(&items).len(), 1);
    assert_eq!(run.bus.captions().len(), 1);
}

/// What the element makes of a caption: NUL and other control characters removed (tabs and
/// newlines kept).
fn printable(text: &str) -> String {
    text.chars()
        .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
        .collect()
}

/// The fixture model's own captions of `frames` (RGBx, 64x48, 100 ms apart from 0) for windows
/// ending at each of `ends` (ms), with the default prompt and greedy decoding of up to
/// `max_new_tokens`, before any clean-up by the element.
fn raw_captions(frames: &[gst::Buffer], ends: &[u64], max_new_tokens: usize) -> Vec<String> {
    use gstllamavid::model::preprocess::{FrameView, PixelFormat};
    use gstllamavid::model::{GenerationParams, LlamaVid, LoadOptions};
    let model = LlamaVid::load(&LoadOptions::new(model_dir())).expect("the fixture loads");
    let prompt = model.prompt(DEFAULT_PROMPT).unwrap();
    let tokens: Vec<candle_core::Tensor> = frames
        .iter()
        .map(|buffer| {
            let map = buffer.map_readable().unwrap();
            let view = FrameView::new(PixelFormat::Rgbx, 64, 48, vec![map.as_slice()], vec![256]);
            model
                .encode_frames(&[view], &prompt)
                .unwrap()
                .squeeze(0)
                .unwrap()
        })
        .collect();
    let fit = model.frames_that_fit(&prompt, max_new_tokens).max(1);
    let params = GenerationParams {
        max_new_tokens,
        ..GenerationParams::default()
    };
    ends.iter()
        .map(|&end| {
            let last = (end / 100) as usize;
            let first = (last + 1).saturating_sub(fit);
            let window = candle_core::Tensor::cat(&tokens[first..=last], 0).unwrap();
            model.caption(&window, &prompt, &params, None).unwrap().text
        })
        .collect()
}

#[test]
fn captions_with_control_characters_do_not_fail_the_stream() {
    // The model can emit any byte (LLaMA byte-fallback tokens), NUL included. This video's
    // final greedy caption does on the fixture: the test asks the model itself, on the frames
    // the element received, and fails when the raw caption has no control character (the case
    // is then not reached: change the video or the length, never let it pass). Bus message and
    // text buffer must both carry the caption without them, and agree.
    let max_new_tokens = 400;
    let (pipeline, caption, text) = test_pipeline("num-buffers=7", "RGBx");
    caption.set_property("max-new-tokens", max_new_tokens as u32);
    caption.set_property("window-duration", 2000u64);
    let received = Arc::new(Mutex::new(Vec::new()));
    let recorder = received.clone();
    caption
        .static_pad("sink")
        .unwrap()
        .add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(gst::PadProbeData::Buffer(b)) = &info.data {
                recorder.lock().unwrap().push(b.clone());
            }
            gst::PadProbeReturn::Ok
        });
    let messages = run_to_eos(&pipeline, TIMEOUT); // fails on an error message
    let posted = captions(&messages);
    let frames = received.lock().unwrap().clone();
    assert_eq!(frames.len(), 7);
    let ends: Vec<u64> = posted.iter().map(|c| c.end / MS).collect();
    let raw = raw_captions(&frames, &ends, max_new_tokens);
    assert!(
        raw.iter()
            .any(|r| r.chars().any(|c| c.is_control() && c != '\n' && c != '\t')),
        "no raw caption holds a control character: the case is not reached: {raw:?}"
    );
    let texts: Vec<String> = posted.iter().map(|c| c.text.clone()).collect();
    let cleaned: Vec<String> = raw.iter().map(|r| printable(r)).collect();
    assert_eq!(
        texts, cleaned,
        "the messages carry the model's captions, cleaned"
    );
    let buffers: Vec<String> = text.captions().into_iter().map(|c| c.2).collect();
    assert_eq!(buffers, texts, "text_src says what the messages say");
}

#[test]
fn caption_timestamps_follow_the_segment_while_start_and_end_are_running_times() {
    // Video whose segment starts at 5 s: the frame with PTS 5.5 s has running time 0.5 s.
    let mut run = CaptionRun::new(caption_element(), rgbx());
    let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
    segment.set_start(gst::ClockTime::from_seconds(5));
    segment.set_time(gst::ClockTime::from_seconds(5));
    assert!(run.push_event(gst::event::Segment::new(&segment)));
    for i in 0..=5u64 {
        run.push(timed(video_frame(&run.info, i as u32), 5000 + i * 100, 100));
    }
    let caption = run.bus.next_caption();
    let items = run.finish();

    assert_eq!((caption.start, caption.end), (0, 500 * MS), "running times");
    assert_eq!(
        caption.pts,
        5500 * MS,
        "the caption buffer's PTS, in the segment"
    );
    let text_segment = text_segments(&items).pop().expect("a segment on text_src");
    assert_eq!(text_segment.start(), segment.start());
    let (pts, duration, _) = text_captions(&items)[0].clone();
    assert_eq!(pts, gst::ClockTime::from_mseconds(5500));
    assert_eq!(duration, gst::ClockTime::from_mseconds(500));
    assert_eq!(
        text_segment.to_running_time(pts),
        Some(gst::ClockTime::from_nseconds(caption.end)),
        "the caption is at the running time of its newest frame"
    );
    let first_gap = timeline(&items)[0];
    assert_eq!(
        first_gap,
        ("gap", 5000, 100),
        "the text stream starts with the video"
    );
}

#[test]
fn a_prompt_change_applies_to_the_next_caption() {
    let element = caption_element();
    element.set_property("prompt", "What is there?");
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(500);
    let first = run.bus.next_caption();
    run.element.set_property("prompt", "Who is there?");
    for pts in (600..=1000).step_by(100) {
        run.push_frame(pts);
    }
    let second = run.bus.next_caption();
    run.finish();
    assert_eq!(first.prompt, "What is there?");
    assert_eq!(second.prompt, "Who is there?");
}

#[test]
fn eos_without_any_frame_ends_the_text_stream_without_a_caption() {
    let mut run = CaptionRun::new(caption_element(), rgbx());
    let items = run.finish();
    assert!(text_captions(&items).is_empty());
    assert!(run.bus.captions().is_empty());
    let types = event_types(&items);
    assert_eq!(
        types.first(),
        Some(&gst::EventType::StreamStart),
        "{types:?}"
    );
    assert_eq!(types.last(), Some(&gst::EventType::Eos), "{types:?}");
}
