//! LLaMA-VID inference with candle: raw frames in, two tokens per frame, captions out.
//! Knows nothing of GStreamer.
//!
//! ```text
//! frame ─preprocess─► pixels ─eva─► features ─tokens(question)─► [context, content] per frame
//! window of frame tokens ─► prompt embeddings spliced at <image> ─llama─► caption
//! ```

pub mod cancel;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eva;
pub mod files;
pub mod generation;
pub mod gguf;
pub mod llama;
pub mod nn;
pub mod options;
pub mod pool;
pub mod prefix_cache;
pub mod preprocess;
pub mod prompt;
pub mod qformer;
pub mod remote;
pub mod sampling;
pub mod tokenizer;
pub mod tokens;
pub mod torch_load;
pub mod torch_save;

mod llamavid;

pub use cancel::Cancel;
pub use checkpoint::WeightFormat;
pub use error::{ModelError, Result};
pub use generation::{CaptionSequence, FinishReason};
pub use llamavid::{Caption, CaptionPrompt, FrameToEncode, Generation, LlamaVid};
pub use llamavid_kernels::cpu::IsaLimit;
pub use nn::Precision;
pub use options::{CpuLayers, LanguageModelWeights, LoadOptions};
pub use sampling::GenerationParams;
