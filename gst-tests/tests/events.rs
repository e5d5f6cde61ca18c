//! Event mode (`emit=on-change`) on the fixture with a scripted change of scene: a red scene,
//! then a blue one. The fixture's weights are random, so what its captions say is not known in
//! advance; what is known is that greedy decoding of identical windows gives identical captions,
//! and that `on-change` must emit exactly the captions the distance rule picks from the captions
//! `always` emits for the same video. Each test runs `always` first and derives from its
//! captions what `on-change` must do.

use gst::prelude::*;
use gst_video::VideoFormat;
use gstllamavid::captioner::change::caption_distance;
use llamavid_gst_tests::*;

const SCENE_CHANGE_MS: u64 = 1500;
const LAST_FRAME_MS: u64 = 2900;

fn rgbx() -> gst_video::VideoInfo {
    video_info(VideoFormat::Rgbx, 64, 48)
}

/// A 64x48 RGBx frame of one colour.
fn solid(rgb: [u8; 3]) -> gst::Buffer {
    let pixels: Vec<u8> = std::iter::repeat_n([rgb[0], rgb[1], rgb[2], 0], 64 * 48)
        .flatten()
        .collect();
    gst::Buffer::from_mut_slice(pixels)
}

/// What one run of the script left: the captions on the bus, the timed items of the text
/// stream, and the statistics.
struct Outcome {
    messages: Vec<Caption>,
    /// ("caption" | "gap", PTS ms, duration ms, text) in order.
    timeline: Vec<(&'static str, u64, u64, String)>,
    captions: u64,
    suppressed: u64,
}

fn timeline(items: &[TextItem]) -> Vec<(&'static str, u64, u64, String)> {
    items
        .iter()
        .filter_map(|item| match item {
            TextItem::Buffer {
                pts,
                duration,
                text,
            } => Some((
                "caption",
                pts.expect("caption PTS").mseconds(),
                duration.expect("caption duration").mseconds(),
                text.clone(),
            )),
            TextItem::Event(e) => match e.view() {
                gst::EventView::Gap(gap) => {
                    let (pts, duration) = gap.get();
                    Some((
                        "gap",
                        pts.mseconds(),
                        duration.expect("GAP duration").mseconds(),
                        String::new(),
                    ))
                }
                _ => None,
            },
        })
        .collect()
}

/// Red frames until the scene change, blue ones after, every 100 ms; captions every 500 ms of
/// the last 300 ms (so a caption sees one scene, except the one at the change).
fn run_script(configure: impl FnOnce(&gst::Element)) -> Outcome {
    let element = caption_element();
    element.set_property("window-duration", 300u64);
    configure(&element);
    let mut run = CaptionRun::new(element, rgbx());
    for pts in (0..=LAST_FRAME_MS).step_by(100) {
        let colour = if pts < SCENE_CHANGE_MS {
            [200, 30, 30]
        } else {
            [30, 30, 200]
        };
        run.push(timed(solid(colour), pts, 100));
    }
    let items = run.finish();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    Outcome {
        messages: run.bus.captions(),
        timeline: timeline(&items),
        captions: run.element.property::<u64>("captions"),
        suppressed: run.element.property::<u64>("captions-suppressed"),
    }
}

/// Which of `texts` the on-change rule emits at `threshold`: the first, then each one at least
/// `threshold` away from the last one emitted.
fn predicted(texts: &[String], threshold: f64) -> Vec<bool> {
    let mut last: Option<&str> = None;
    texts
        .iter()
        .map(|text| {
            let emit = last.is_none_or(|l| caption_distance(l, text) >= threshold);
            if emit {
                last = Some(text);
            }
            emit
        })
        .collect()
}

#[test]
fn on_change_emits_exactly_the_captions_that_differ_from_the_last_emitted_one() {
    let always = run_script(|_| {});
    let texts: Vec<String> = always.messages.iter().map(|c| c.text.clone()).collect();
    assert!(texts.len() >= 5, "captions of the always run: {texts:?}");
    assert_eq!(always.captions, texts.len() as u64);
    assert_eq!(always.suppressed, 0);
    // The windows at 500 and 1000 ms hold the same red frames: greedy decoding says the same.
    assert_eq!(
        texts[0], texts[1],
        "identical windows gave different captions: {texts:?}"
    );

    let on_change = run_script(|e| e.set_property_from_str("emit", "on-change"));
    let threshold: f64 = 0.5;
    let emits = predicted(&texts, threshold);
    let distances: Vec<f64> = texts
        .windows(2)
        .map(|w| caption_distance(&w[0], &w[1]))
        .collect();
    println!("always: {texts:?}\nneighbour distances: {distances:?}\nemitted: {emits:?}");

    // Statistics count every caption; the suppressed ones are those the rule holds back.
    let suppressed = emits.iter().filter(|e| !**e).count() as u64;
    assert!(suppressed >= 1, "the repeated red caption is suppressed");
    assert_eq!(on_change.captions, always.captions);
    assert_eq!(on_change.suppressed, suppressed);

    // The bus carries exactly the predicted subsequence, with the always run's timing.
    let expected: Vec<&Caption> = always
        .messages
        .iter()
        .zip(&emits)
        .filter(|(_, e)| **e)
        .map(|(c, _)| c)
        .collect();
    let said: Vec<(&str, u64, u64)> = on_change
        .messages
        .iter()
        .map(|c| (c.text.as_str(), c.pts, c.end))
        .collect();
    let want: Vec<(&str, u64, u64)> = expected
        .iter()
        .map(|c| (c.text.as_str(), c.pts, c.end))
        .collect();
    assert_eq!(said, want);

    // The text stream: each suppressed caption becomes a GAP over the same span; nothing else
    // changes (the GAPs before the first caption are the same in both runs).
    let mut caption_index = 0;
    let expected_timeline: Vec<_> = always
        .timeline
        .iter()
        .map(|item| {
            if item.0 != "caption" {
                return item.clone();
            }
            let emitted = emits[caption_index];
            caption_index += 1;
            if emitted {
                item.clone()
            } else {
                ("gap", item.1, item.2, String::new())
            }
        })
        .collect();
    assert_eq!(caption_index, texts.len(), "text buffers = bus captions");
    assert_eq!(on_change.timeline, expected_timeline);
}

#[test]
fn on_change_with_threshold_zero_is_always() {
    let element = caption_element();
    assert_eq!(
        element.property_value("emit").serialize().unwrap(),
        "always"
    );
    assert_eq!(element.property::<f64>("change-threshold"), 0.5);

    let always = run_script(|_| {});
    let zero = run_script(|e| {
        e.set_property_from_str("emit", "on-change");
        e.set_property("change-threshold", 0.0f64);
    });
    assert_eq!(zero.messages.len(), always.messages.len());
    for (a, b) in always.messages.iter().zip(&zero.messages) {
        assert_eq!((&a.text, a.pts, a.end), (&b.text, b.pts, b.end));
    }
    assert_eq!(zero.timeline, always.timeline);
    assert_eq!(zero.suppressed, 0);
}

#[test]
fn threshold_one_keeps_only_captions_with_no_word_in_common() {
    // The strictest rule: the predicted subsequence follows the same distance function.
    let always = run_script(|_| {});
    let texts: Vec<String> = always.messages.iter().map(|c| c.text.clone()).collect();
    let strict = run_script(|e| {
        e.set_property_from_str("emit", "on-change");
        e.set_property("change-threshold", 1.0f64);
    });
    let emits = predicted(&texts, 1.0);
    let want: Vec<&String> = texts
        .iter()
        .zip(&emits)
        .filter(|(_, e)| **e)
        .map(|(t, _)| t)
        .collect();
    let said: Vec<&String> = strict.messages.iter().map(|c| &c.text).collect();
    assert_eq!(said, want);
    assert_eq!(
        strict.suppressed,
        emits.iter().filter(|e| !**e).count() as u64
    );
}
