//! Streaming logic with no GStreamer types: which frames are sampled, each stream's window and
//! caption schedule, the scheduler that runs a shared model for every stream (batched encode,
//! continuous batching of captions), where captions are generated, the context's limits, the
//! shared models, and the event mode's test of whether a caption says something new.

pub mod backend;
pub mod change;
pub mod engine;
pub mod frame;
pub mod job;
pub mod limits;
pub mod models;
pub mod queue;
pub mod registry;
pub mod remote;
pub mod sampler;
pub mod scheduler;
pub mod stream;
pub mod window;
pub mod worker;

#[cfg(test)]
mod test_engine;

pub use engine::CaptionEngine;
pub use frame::OwnedFrame;
pub use job::{FrameJob, Job};
pub use queue::{Pushed, QueuePolicy};
pub use sampler::FrameSampler;
pub use scheduler::{BatchLimits, Scheduler, StreamHandle};
pub use stream::{CaptionEvent, CaptionOutput, CaptionSettings, Problem};
pub use worker::Worker;
