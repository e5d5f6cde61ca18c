//! What the worker needs from a model, as a trait so that the scheduling can be tested on its
//! own. The one real implementation is `LlamaVid`.

use std::sync::atomic::AtomicBool;

use candle_core::Tensor;

use crate::model::preprocess::FrameView;
use crate::model::{CaptionPrompt, GenerationParams, LlamaVid, Result};

pub trait CaptionEngine: Send + Sync + 'static {
    /// A question prepared once for many frames and captions.
    type Prompt: Send;

    fn prepare(&self, question: &str) -> Result<Self::Prompt>;

    /// One frame to its tokens (tokens_per_frame, hidden), left on the compute device.
    fn encode(&self, frame: &FrameView, prompt: &Self::Prompt) -> Result<Tensor>;

    /// A window of tokens (frames · tokens_per_frame, hidden) to text.
    fn caption(
        &self,
        tokens: &Tensor,
        prompt: &Self::Prompt,
        params: &GenerationParams,
        cancel: &AtomicBool,
    ) -> Result<String>;
}

impl CaptionEngine for LlamaVid {
    type Prompt = CaptionPrompt;

    fn prepare(&self, question: &str) -> Result<CaptionPrompt> {
        self.prompt(question)
    }

    fn encode(&self, frame: &FrameView, prompt: &CaptionPrompt) -> Result<Tensor> {
        Ok(self
            .encode_frames(std::slice::from_ref(frame), prompt)?
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
}
