//! Streaming logic with no GStreamer types: which frames are sampled, the hand-off to the
//! worker, the window of tokens, the caption schedule, and the shared-model registry.

pub mod engine;
pub mod frame;
pub mod limits;
pub mod models;
pub mod queue;
pub mod registry;
pub mod remote;
pub mod sampler;
pub mod window;
pub mod worker;

pub use engine::CaptionEngine;
pub use frame::OwnedFrame;
pub use queue::{Pushed, QueuePolicy};
pub use sampler::FrameSampler;
pub use worker::{CaptionEvent, CaptionOutput, CaptionSettings, FrameJob, Job, Problem, Worker};
