//! What the language model's context allows: a prompt must leave room for video, and a window
//! cannot hold more frames than fit beside the prompt and the caption. Checked when a prompt is
//! set and when the element goes to READY, so that ordinary settings never kill a stream.

use super::engine::CaptionEngine;
use super::worker::CaptionSettings;

/// Whether `question` can be asked: it must be prepared without error and leave room in the
/// context for one frame and one token of caption. The error says why not.
pub fn check_prompt<E: CaptionEngine>(engine: &E, question: &str) -> Result<E::Prompt, String> {
    check_prompt_text(question)?;
    let prompt = engine.prepare(question).map_err(|e| e.summary())?;
    if engine.frames_that_fit(&prompt, 1) == 0 {
        return Err(
            "the prompt is too long: it leaves no room for the video in the language model's \
             context"
                .into(),
        );
    }
    Ok(prompt)
}

/// What can be said of a prompt without the model: it must ask something.
pub fn check_prompt_text(question: &str) -> Result<(), String> {
    if question.trim().is_empty() {
        return Err("an empty prompt asks nothing".into());
    }
    Ok(())
}

/// The settings against the model: an error when the prompt cannot be used, else warnings for
/// what the context will cut (the oldest frames of a long window, long captions).
pub fn check_settings<E: CaptionEngine>(
    engine: &E,
    settings: &CaptionSettings,
    sample_interval_ns: u64,
) -> Result<Vec<String>, String> {
    let prompt = check_prompt(engine, &settings.prompt).map_err(|e| format!("`prompt`: {e}"))?;
    let max_new = settings.params.max_new_tokens;
    let fit = engine.frames_that_fit(&prompt, max_new);
    let mut warnings = Vec::new();
    if fit == 0 {
        warnings.push(format!(
            "max-new-tokens={max_new} leaves no room for the video in the language model's \
             context beside the prompt: captions see only the newest frame and are cut short"
        ));
        return Ok(warnings);
    }
    let frames = frames_in_window(settings.window_duration, sample_interval_ns);
    if frames > fit as u64 {
        warnings.push(format!(
            "window-duration={} ms at sample-interval={} ms holds up to {frames} frames, but \
             the language model's context has room for {fit} beside the prompt and \
             max-new-tokens={max_new}: only the newest {fit} frames are captioned",
            settings.window_duration / 1_000_000,
            sample_interval_ns / 1_000_000,
        ));
    }
    Ok(warnings)
}

/// Most frames a window of `duration` holds at one frame per `interval` (both ends included).
pub fn frames_in_window(duration_ns: u64, interval_ns: u64) -> u64 {
    duration_ns / interval_ns.max(1) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::preprocess::FrameView;
    use crate::model::{GenerationParams, ModelError, Result};
    use candle_core::Tensor;
    use std::sync::atomic::AtomicBool;

    /// Test double: a context of `positions`, prompts one position per character, frames of
    /// two positions; a question containing "!" cannot be prepared.
    struct Context {
        positions: usize,
    }

    impl CaptionEngine for Context {
        type Prompt = usize;

        fn prepare(&self, question: &str) -> Result<usize> {
            if question.contains('!') {
                return Err(ModelError::InvalidInput("no shouting".into()));
            }
            Ok(question.len())
        }

        fn frames_that_fit(&self, prompt: &usize, max_new_tokens: usize) -> usize {
            self.positions.saturating_sub(prompt + max_new_tokens) / 2
        }

        fn encode(&self, _: &FrameView, _: &usize, _: &AtomicBool) -> Result<Tensor> {
            unreachable!("not encoded in these tests")
        }

        fn caption(
            &self,
            _: &Tensor,
            _: &usize,
            _: &GenerationParams,
            _: &AtomicBool,
        ) -> Result<String> {
            unreachable!("not captioned in these tests")
        }
    }

    const MS: u64 = 1_000_000;

    fn settings(prompt: &str, window_ms: u64, max_new_tokens: usize) -> CaptionSettings {
        CaptionSettings {
            prompt: prompt.into(),
            params: GenerationParams {
                max_new_tokens,
                ..GenerationParams::default()
            },
            window_duration: window_ms * MS,
            caption_interval: 1000 * MS,
        }
    }

    #[test]
    fn prompts_that_leave_no_room_or_fail_are_refused() {
        let engine = Context { positions: 20 };
        assert_eq!(check_prompt(&engine, "what?"), Ok(5));
        assert!(check_prompt(&engine, "  ").unwrap_err().contains("empty"));
        assert!(check_prompt(&engine, "what!")
            .unwrap_err()
            .contains("shouting"));
        // 18 positions + 1 token leave less than a frame.
        let long = "x".repeat(18);
        assert!(check_prompt(&engine, &long)
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn a_window_longer_than_the_context_is_reported_not_refused() {
        let engine = Context { positions: 100 };
        // Prompt 4 + 16 new tokens leave 80 positions: 40 frames.
        let fits = check_settings(&engine, &settings("what", 39_000, 16), 1000 * MS).unwrap();
        assert!(fits.is_empty(), "{fits:?}");
        let cut = check_settings(&engine, &settings("what", 40_000, 16), 1000 * MS).unwrap();
        assert_eq!(cut.len(), 1);
        assert!(
            cut[0].contains("41 frames") && cut[0].contains("room for 40"),
            "{cut:?}"
        );
        let no_room = check_settings(&engine, &settings("what", 1000, 200), 1000 * MS).unwrap();
        assert!(no_room[0].contains("max-new-tokens=200"), "{no_room:?}");
        let bad = check_settings(&engine, &settings("what!", 1000, 16), 1000 * MS);
        assert!(bad.unwrap_err().starts_with("`prompt`"));
    }
}
