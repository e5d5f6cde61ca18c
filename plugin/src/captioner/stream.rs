//! One stream's captioning logic, whoever runs the model: what the window holds, when a caption
//! is due and what it describes, the prompt it asks. The scheduler (many streams, one model)
//! and the worker (one stream on its own thread, the benchmark's baseline) both drive it; the
//! state belongs to the stream's element.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::engine::CaptionEngine;
use super::window::{TokenWindow, WindowEntry};
use crate::model::error::panic_message;
use crate::model::{GenerationParams, ModelError, Result};

/// What a stream's model work reads before each job, so property changes apply while running.
#[derive(Debug, Clone)]
pub struct CaptionSettings {
    pub prompt: String,
    pub params: GenerationParams,
    pub window_duration: u64,
    pub caption_interval: u64,
}

/// A sampled frame's timing, as the window and the schedule need it.
#[derive(Debug, Clone, Copy)]
pub struct FrameTiming {
    pub running_time: u64,
    /// The running time before which no other frame will be sampled: the text stream may
    /// advance to it when this frame brings no caption.
    pub next_sample_due: u64,
    pub arrived: Instant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CaptionEvent {
    pub epoch: u64,
    pub text: String,
    /// Running time of the first and last frame in the captioned window.
    pub start: u64,
    pub end: u64,
    pub frames: u32,
    /// From the arrival of the window's last frame to the caption being ready.
    pub latency: Duration,
    /// Until the next caption is expected.
    pub duration: u64,
    pub prompt: String,
    pub is_final: bool,
    /// Captions decoded together (in one forward per step) when this one finished.
    pub batch: u32,
}

/// Something to tell the person running the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// One line a user can act on.
    pub message: String,
    /// Details for the message's debug field (one line, no backtrace).
    pub debug: String,
    /// For the debug log only: a backtrace captured with the error.
    pub log: Option<String>,
}

impl Problem {
    /// The model failed while doing `what`.
    pub fn model(what: &str, error: &ModelError) -> Self {
        let summary = error.summary();
        Self {
            message: format!("The captioning model failed while {what}: {summary}"),
            debug: format!("{what}: {summary}"),
            log: error.backtrace().map(|b| format!("{what}: {summary}\n{b}")),
        }
    }

    /// A panic caught while doing `what` (the scheduling code's own defect, reported as an
    /// element error instead of crossing the FFI boundary).
    pub fn panic(what: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        let message = panic_message(payload);
        Self {
            message: "Internal error in the captioning model's scheduling".to_owned(),
            debug: format!("panic while {what}: {message}"),
            log: None,
        }
    }
}

/// Where a stream's results go (its element, or a recorder in tests). Called from the thread
/// that runs the model; must not block on the pipeline.
pub trait CaptionOutput: Send + Sync {
    /// A frame became tokens, encoded in a batch of `batch` frames.
    fn frame_encoded(&self, epoch: u64, batch: usize);
    fn caption(&self, event: CaptionEvent);
    /// No caption will start before running time `until`.
    fn idle_until(&self, epoch: u64, until: u64);
    fn eos(&self, epoch: u64);
    /// Something the user should know; the stream goes on.
    fn warning(&self, problem: Problem);
    /// A failure the stream must stop for; its model work stops.
    fn error(&self, problem: Problem);
    /// News worth a line (a language-model server that answers again).
    fn info(&self, _message: String) {}
}

/// A caption due: the window as it was when it fell due, and how to ask.
pub struct CaptionRequest<P> {
    pub epoch: u64,
    /// (frames · tokens_per_frame, hidden).
    pub tokens: Tensor,
    pub prompt: Arc<P>,
    pub question: String,
    pub params: GenerationParams,
    pub start: u64,
    pub end: u64,
    pub last_arrived: Instant,
    pub frames: u32,
    pub duration: u64,
    pub is_final: bool,
}

impl<P> CaptionRequest<P> {
    /// The event for this caption once its text is known.
    pub fn event(&self, text: String, batch: usize) -> CaptionEvent {
        CaptionEvent {
            epoch: self.epoch,
            text,
            start: self.start,
            end: self.end,
            frames: self.frames,
            latency: self.last_arrived.elapsed(),
            duration: self.duration,
            prompt: self.question.clone(),
            is_final: self.is_final,
            batch: batch as u32,
        }
    }
}

/// What a frame's tokens lead to.
pub enum Encoded<P> {
    /// A caption of the window, due with this frame.
    Due(CaptionRequest<P>),
    /// No caption before running time `until`: the text stream may advance to it.
    Idle(u64),
}

/// The window, the caption schedule and the prepared prompt of one stream.
pub struct StreamLogic<P> {
    window: TokenWindow,
    prompt: Option<(String, Arc<P>)>,
    /// A question that could not be prepared (warned about once): the previous one stays.
    refused_prompt: Option<String>,
    /// The window was cut to the context's size at least once (warned about once).
    warned_cut: bool,
    next_caption: Option<u64>,
}

impl<P> StreamLogic<P> {
    pub fn new(window_duration: u64) -> Self {
        Self {
            window: TokenWindow::new(window_duration),
            prompt: None,
            refused_prompt: None,
            warned_cut: false,
            next_caption: None,
        }
    }

    /// Forgets the window and the schedule (after a flush); the prompt stays prepared.
    pub fn reset(&mut self) {
        self.window.clear();
        self.next_caption = None;
    }

    /// The prepared prompt for `question`, prepared again when the question changed. A new
    /// question that cannot be prepared is refused with a warning and the previous one stays
    /// (the element validates prompts before they get here; this is the safety net).
    pub fn prompt<E: CaptionEngine<Prompt = P>>(
        &mut self,
        engine: &E,
        question: &str,
        output: &dyn CaptionOutput,
    ) -> Result<Arc<P>> {
        let current = self.prompt.as_ref().is_some_and(|(q, _)| q == question);
        let refused = self.refused_prompt.as_deref() == Some(question);
        if !(current || refused && self.prompt.is_some()) {
            match engine.prepare(question) {
                Ok(prepared) => {
                    self.prompt = Some((question.to_owned(), Arc::new(prepared)));
                    self.refused_prompt = None;
                }
                Err(e @ ModelError::Cancelled) => return Err(e),
                Err(e) if self.prompt.is_some() => {
                    self.refused_prompt = Some(question.to_owned());
                    output.warning(Problem {
                        message: format!(
                            "The new prompt cannot be used, the previous one stays: {}",
                            e.summary()
                        ),
                        debug: format!("refused prompt: {question:?}"),
                        log: None,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.prompt.as_ref().expect("prepared").1.clone())
    }

    /// Bounds the window by what the language model's context holds beside the prompt and
    /// the caption, saying so once when that cuts frames the duration would have kept.
    fn fit_window<E: CaptionEngine<Prompt = P>>(
        &mut self,
        engine: &E,
        max_new_tokens: usize,
        output: &dyn CaptionOutput,
    ) {
        let Some((_, prompt)) = &self.prompt else {
            return;
        };
        let fit = engine.frames_that_fit(prompt, max_new_tokens);
        self.window.set_max_frames(fit);
        if self.window.cut_to_fit() > 0 && !self.warned_cut {
            self.warned_cut = true;
            output.warning(Problem {
                message: format!(
                    "The caption window holds more frames than the language model's context: \
                     only the newest {} frames are captioned (lower `window-duration`, raise \
                     `sample-interval`, or lower `max-new-tokens`)",
                    fit.max(1)
                ),
                debug: format!(
                    "{fit} frames fit beside the prompt and max-new-tokens={max_new_tokens}; \
                     older frames leave the window early"
                ),
                log: None,
            });
        }
    }

    /// A frame's tokens enter the window; a caption falls due with it every
    /// `caption_interval` of running time. `can_caption` is asked when one falls due: when it
    /// says no (a server still busy with the previous one), the caption is skipped and the
    /// window's frames stay fresh.
    #[allow(clippy::too_many_arguments)]
    pub fn encoded<E: CaptionEngine<Prompt = P>>(
        &mut self,
        engine: &E,
        settings: &CaptionSettings,
        epoch: u64,
        frame: FrameTiming,
        tokens: Tensor,
        output: &dyn CaptionOutput,
        can_caption: impl FnOnce() -> bool,
    ) -> Result<Encoded<P>> {
        self.window.set_duration(settings.window_duration);
        self.window.push(WindowEntry {
            running_time: frame.running_time,
            arrived: frame.arrived,
            tokens,
        });
        self.fit_window(engine, settings.params.max_new_tokens, output);
        let interval = settings.caption_interval.max(1);
        let due = *self
            .next_caption
            .get_or_insert(frame.running_time + interval);
        if frame.running_time < due {
            return Ok(Encoded::Idle(frame.next_sample_due));
        }
        // Due times stay on their grid; the caption lasts until the next one is due.
        let mut next = due + interval;
        if next <= frame.running_time {
            next = frame.running_time + interval;
        }
        self.next_caption = Some(next);
        if !can_caption() {
            return Ok(Encoded::Idle(frame.next_sample_due));
        }
        let request = self.request(
            engine,
            settings,
            epoch,
            next - frame.running_time,
            false,
            output,
        )?;
        Ok(request.map_or(Encoded::Idle(frame.next_sample_due), Encoded::Due))
    }

    /// At EOS: a caption of the window when frames came since the last one (and
    /// `can_caption` agrees, see [`encoded`](Self::encoded)).
    pub fn final_caption<E: CaptionEngine<Prompt = P>>(
        &mut self,
        engine: &E,
        settings: &CaptionSettings,
        epoch: u64,
        output: &dyn CaptionOutput,
        can_caption: impl FnOnce() -> bool,
    ) -> Result<Option<CaptionRequest<P>>> {
        if self.window.fresh() == 0 || !can_caption() {
            return Ok(None);
        }
        self.request(
            engine,
            settings,
            epoch,
            settings.caption_interval,
            true,
            output,
        )
    }

    fn request<E: CaptionEngine<Prompt = P>>(
        &mut self,
        engine: &E,
        settings: &CaptionSettings,
        epoch: u64,
        duration: u64,
        is_final: bool,
        output: &dyn CaptionOutput,
    ) -> Result<Option<CaptionRequest<P>>> {
        let prompt = self.prompt(engine, &settings.prompt, output)?;
        self.fit_window(engine, settings.params.max_new_tokens, output);
        let (Some(first), Some(last), Some(tokens)) = (
            self.window.first(),
            self.window.last(),
            self.window.tokens()?,
        ) else {
            return Ok(None);
        };
        let request = CaptionRequest {
            epoch,
            tokens,
            prompt,
            question: self.prompt.as_ref().expect("prepared").0.clone(),
            params: settings.params.clone(),
            start: first.running_time,
            end: last.running_time,
            last_arrived: last.arrived,
            frames: self.window.len() as u32,
            duration,
            is_final,
        };
        self.window.mark_captioned();
        Ok(Some(request))
    }
}
