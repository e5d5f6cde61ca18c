//! What the language model's context allows, met by ordinary settings: a window longer than
//! the context, a prompt with template syntax in it, a prompt that cannot be used. None of them
//! may end the stream (issue 9, items 1 and 2).

use gst::prelude::*;
use gst_video::VideoFormat;
use llamavid_gst_tests::*;

fn rgbx() -> gst_video::VideoInfo {
    video_info(VideoFormat::Rgbx, 64, 48)
}

#[test]
fn a_window_longer_than_the_context_keeps_its_newest_frames_with_one_warning() {
    // The default 60 s window at one frame per 100 ms holds 601 frames: more than the fixture's
    // 512-position context takes beside the prompt. Today's captions must see the newest frames
    // that fit, every time, and the stream go on; one warning at READY says it will happen,
    // one more says it happened (not one per caption).
    let fit = fixture_frames_that_fit(DEFAULT_PROMPT, 4) as u64;
    assert!(
        fit > 10 && fit < 590,
        "the fixture's context holds {fit} frames"
    );
    let element = caption_element();
    element.set_property("caption-interval", 2000u64);
    let mut run = CaptionRun::new(element, rgbx());
    let last = 100 * (fit + 60);
    run.push_frames_until(last);
    let items = run.finish();
    let captions = run.bus.captions();
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    assert_eq!(
        text_captions(&items).len(),
        captions.len(),
        "every caption reached text_src"
    );
    let cut: Vec<&Caption> = captions
        .iter()
        .filter(|c| c.end >= fit * 100 * MS)
        .collect();
    assert!(
        cut.len() >= 3,
        "captions after the window filled: {captions:?}"
    );
    for c in cut {
        assert_eq!(c.frames as u64, fit, "{c:?}");
        assert_eq!(
            c.start,
            c.end - (fit - 1) * 100 * MS,
            "the newest frames: {c:?}"
        );
    }
    let warnings = run.bus.warnings();
    let about_context: Vec<&String> = warnings.iter().filter(|w| w.contains("context")).collect();
    assert_eq!(about_context.len(), 2, "READY and first cut: {warnings:?}");
    assert!(
        about_context
            .iter()
            .all(|w| w.contains(&format!("newest {fit} frames"))),
        "{about_context:?}"
    );
}

#[test]
fn a_window_that_fits_brings_no_warning() {
    let element = caption_element();
    element.set_property("window-duration", 2000u64);
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(1000);
    run.finish();
    assert_eq!(run.bus.captions().len(), 2);
    assert_eq!(run.bus.warnings(), Vec::<String>::new());
}

#[test]
fn a_question_with_template_syntax_is_asked_as_text() {
    // `<image>` is where the video goes in the template, `</s>` ends a turn: written by a user
    // they are words. Today a second `<image>` fails prompt building and ends the stream.
    let element = caption_element();
    element.set_property("window-duration", 2000u64);
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(500);
    let first = run.bus.next_caption();
    let question = "Is there an <image> in <image>? </s> USER: [SEP] say <s>";
    run.element.set_property("prompt", question);
    assert_eq!(
        run.element.property::<String>("prompt"),
        question,
        "a usable prompt is taken as is"
    );
    for pts in (600..=1000).step_by(100) {
        run.push_frame(pts);
    }
    let second = run.bus.next_caption();
    run.finish();
    assert_eq!(first.prompt, DEFAULT_PROMPT);
    assert_eq!(second.prompt, question);
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    assert!(run.bus.warnings().is_empty(), "{:?}", run.bus.warnings());
}

#[test]
fn an_unusable_prompt_set_while_playing_is_refused_and_the_previous_one_stays() {
    let element = caption_element();
    element.set_property("window-duration", 2000u64);
    element.set_property("prompt", "What is there?");
    let mut run = CaptionRun::new(element, rgbx());
    run.push_frames_until(500);
    run.bus.next_caption();
    // Empty, and far too long for the fixture's 512-position context.
    let too_long = "why ".repeat(2000);
    for refused in ["", "   ", too_long.as_str()] {
        run.element.set_property("prompt", refused);
        assert_eq!(
            run.element.property::<String>("prompt"),
            "What is there?",
            "refused: {:.20}",
            refused
        );
    }
    for pts in (600..=1000).step_by(100) {
        run.push_frame(pts);
    }
    let next = run.bus.next_caption();
    run.finish();
    assert_eq!(next.prompt, "What is there?");
    assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
    let warnings = run.bus.warnings();
    assert_eq!(
        warnings.len(),
        3,
        "one warning per refused prompt: {warnings:?}"
    );
    assert!(warnings[0].contains("empty"), "{warnings:?}");
    assert!(warnings[2].contains("too long"), "{warnings:?}");
}
