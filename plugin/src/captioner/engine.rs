//! What the worker needs from a model, as a trait so that the scheduling can be tested on its
//! own. The one real implementation is `LlamaVid`.

use std::sync::atomic::AtomicBool;

use candle_core::Tensor;

use crate::model::preprocess::FrameView;
use crate::model::remote::{Completion, RemoteCaptionInput};
use crate::model::{Cancel, CaptionPrompt, GenerationParams, LlamaVid, ModelError, Result};

pub trait CaptionEngine: Send + Sync + 'static {
    /// A question prepared once for many frames and captions.
    type Prompt: Send;

    fn prepare(&self, question: &str) -> Result<Self::Prompt>;

    /// Frames of video the language model's context holds beside `prompt` and a caption of
    /// `max_new_tokens` (0 when not even one does).
    fn frames_that_fit(&self, prompt: &Self::Prompt, max_new_tokens: usize) -> usize;

    /// One frame to its tokens (tokens_per_frame, hidden), left on the compute device.
    /// `cancel` is checked between layers (`ModelError::Cancelled`).
    fn encode(
        &self,
        frame: &FrameView,
        prompt: &Self::Prompt,
        cancel: &AtomicBool,
    ) -> Result<Tensor>;

    /// A window of tokens (frames · tokens_per_frame, hidden) to text.
    fn caption(
        &self,
        tokens: &Tensor,
        prompt: &Self::Prompt,
        params: &GenerationParams,
        cancel: &AtomicBool,
    ) -> Result<String>;

    /// For a language model on a server: what it needs to caption the window (the input
    /// embeddings `caption` would generate from, and the sampling settings).
    fn remote_input(
        &self,
        _tokens: &Tensor,
        _prompt: &Self::Prompt,
        _params: &GenerationParams,
    ) -> Result<RemoteCaptionInput> {
        Err(ModelError::InvalidInput(
            "this engine cannot hand its language model to a server".into(),
        ))
    }

    /// A server's completion to the caption's text.
    fn remote_text(&self, _completion: Completion) -> Result<String> {
        Err(ModelError::InvalidInput(
            "this engine cannot hand its language model to a server".into(),
        ))
    }
}

impl CaptionEngine for LlamaVid {
    type Prompt = CaptionPrompt;

    fn prepare(&self, question: &str) -> Result<CaptionPrompt> {
        self.prompt(question)
    }

    fn frames_that_fit(&self, prompt: &CaptionPrompt, max_new_tokens: usize) -> usize {
        LlamaVid::frames_that_fit(self, prompt, max_new_tokens)
    }

    fn encode(
        &self,
        frame: &FrameView,
        prompt: &CaptionPrompt,
        cancel: &AtomicBool,
    ) -> Result<Tensor> {
        let frames = std::slice::from_ref(frame);
        Ok(self
            .encode_frames_cancellable(frames, prompt, Cancel::on_flag(cancel))?
            .squeeze(0)?)
    }

    fn caption(
        &self,
        tokens: &Tensor,
        prompt: &CaptionPrompt,
        params: &GenerationParams,
        cancel: &AtomicBool,
    ) -> Result<String> {
        Ok(LlamaVid::caption(self, tokens, prompt, params, Some(cancel))?.text)
    }

    fn remote_input(
        &self,
        tokens: &Tensor,
        prompt: &CaptionPrompt,
        params: &GenerationParams,
    ) -> Result<RemoteCaptionInput> {
        self.remote_caption_input(tokens, prompt, params)
    }

    fn remote_text(&self, completion: Completion) -> Result<String> {
        Ok(self.caption_from_completion(completion)?.text)
    }
}
