//! Where captions are generated, behind one small interface: the scheduler hands a backend the
//! window of tokens, the prompt and the sampling of a caption, and collects what it reports.
//!
//! - [`LocalCaptions`]: the loaded language model, shared by every stream on the scheduler,
//!   with continuous batching (every running caption advances one token per forward; captions
//!   join and leave between steps). A stream waits for its caption (its later results would
//!   overtake it).
//! - `captioner::remote::RemoteCaptions`: one stream's language model on a server. It takes
//!   the window's input embeddings and completes on its own thread; the scheduler polls it
//!   ([`CaptionBackend::poll_every`]) and the stream's frames go on being encoded meanwhile.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;

use super::engine::CaptionEngine;
use super::stream::Problem;

use crate::model::{Cancel, GenerationParams, ModelError, Result};

/// Names one caption between the scheduler and a backend.
pub type CaptionId = u64;

/// How a caption ended.
#[derive(Debug)]
pub enum Outcome {
    Text(String),
    /// Interrupted (its stream flushed or left, or the scheduler stopped).
    Cancelled,
    /// Not generated, and the stream goes on without it (a server that is away: the backend
    /// said so in a [`Report::Warning`]).
    Lost,
    Failed(Problem),
}

/// A caption that left the backend, with how many captions were decoded together in the step
/// it finished in.
#[derive(Debug)]
pub struct Finished {
    pub id: CaptionId,
    pub outcome: Outcome,
    pub batch: usize,
}

/// What one round of a backend brought.
#[derive(Debug)]
pub enum Report {
    Finished(Finished),
    /// For the stream that owns the backend: something to know, the stream goes on.
    Warning(Problem),
    /// For the stream that owns the backend: news worth a line.
    Info(String),
    /// The stream that owns the backend cannot go on (its caption, if any, ends with it).
    Failed(Problem),
}

pub trait CaptionBackend<P>: Send {
    /// Whether a caption falling due now can start. When not (a server busy with the previous
    /// one, or backed off from), the caption is skipped and its frames stay in the window.
    fn accepts(&mut self) -> bool {
        true
    }

    /// Whether a stream's later frames wait for its caption (their results would overtake
    /// it), or go on being encoded while it runs.
    fn stream_waits(&self) -> bool {
        true
    }

    /// Takes a caption; it starts at the next `advance` (or as soon as there is room).
    fn start(
        &mut self,
        id: CaptionId,
        tokens: &Tensor,
        prompt: &P,
        params: &GenerationParams,
    ) -> Result<()>;

    /// Drops a caption that has not finished (no `Finished` comes for it).
    fn abandon(&mut self, id: CaptionId);

    /// Captions taken and not finished.
    fn captions(&self) -> Vec<CaptionId>;

    /// Whether `advance` has model work to do now.
    fn ready(&self) -> bool;

    /// Does one round of work: for the local model, one decode step of the running captions
    /// (newcomers prefill in it); for a server, collecting a reply that came.
    fn advance(&mut self, cancel: Cancel) -> Vec<Report>;

    /// How often to call `advance` while nothing else wakes the scheduler (a server's reply
    /// is polled); `None`: only when [`ready`](Self::ready).
    fn poll_every(&self) -> Option<Duration> {
        None
    }
}

/// The loaded model's language model, decoding up to `max_batch` captions per forward.
pub struct LocalCaptions<E: CaptionEngine> {
    engine: Arc<E>,
    max_batch: usize,
    /// Stepping together, oldest first.
    running: Vec<(CaptionId, E::Sequence)>,
    /// Taken, waiting for room in the batch (oldest first: fair across streams).
    waiting: VecDeque<(CaptionId, E::Sequence)>,
}

impl<E: CaptionEngine> LocalCaptions<E> {
    pub fn new(engine: Arc<E>, max_batch: usize) -> Self {
        Self {
            engine,
            max_batch: max_batch.max(1),
            running: Vec::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Every running caption ends with the same problem (a failed step leaves every cache in
    /// the batch in an unknown state).
    fn fail_running(&mut self, outcome: impl Fn() -> Outcome, batch: usize) -> Vec<Report> {
        self.running
            .drain(..)
            .map(|(id, _)| {
                Report::Finished(Finished {
                    id,
                    outcome: outcome(),
                    batch,
                })
            })
            .collect()
    }
}

impl<E: CaptionEngine> CaptionBackend<E::Prompt> for LocalCaptions<E> {
    fn start(
        &mut self,
        id: CaptionId,
        tokens: &Tensor,
        prompt: &E::Prompt,
        params: &GenerationParams,
    ) -> Result<()> {
        let sequence = self.engine.start_sequence(tokens, prompt, params)?;
        self.waiting.push_back((id, sequence));
        Ok(())
    }

    fn abandon(&mut self, id: CaptionId) {
        self.running.retain(|(i, _)| *i != id);
        self.waiting.retain(|(i, _)| *i != id);
    }

    fn captions(&self) -> Vec<CaptionId> {
        self.running
            .iter()
            .chain(&self.waiting)
            .map(|(id, _)| *id)
            .collect()
    }

    fn ready(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    fn advance(&mut self, cancel: Cancel) -> Vec<Report> {
        while self.running.len() < self.max_batch {
            match self.waiting.pop_front() {
                Some(caption) => self.running.push(caption),
                None => break,
            }
        }
        let batch = self.running.len();
        if batch == 0 {
            return Vec::new();
        }
        let engine = self.engine.clone();
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut sequences: Vec<&mut E::Sequence> =
                self.running.iter_mut().map(|(_, s)| s).collect();
            engine.step(&mut sequences, cancel)
        }));
        let texts = match stepped {
            Ok(Ok(texts)) => texts,
            Ok(Err(ModelError::Cancelled)) => {
                return self.fail_running(|| Outcome::Cancelled, batch)
            }
            Ok(Err(e)) => {
                let problem = Problem::model("captioning", &e);
                return self.fail_running(|| Outcome::Failed(problem.clone()), batch);
            }
            Err(panic) => {
                let problem = Problem::panic("captioning", &*panic);
                return self.fail_running(|| Outcome::Failed(problem.clone()), batch);
            }
        };
        let mut finished = Vec::new();
        let mut kept = Vec::with_capacity(batch);
        for ((id, sequence), text) in self.running.drain(..).zip(texts) {
            match text {
                Some(text) => finished.push(Report::Finished(Finished {
                    id,
                    outcome: Outcome::Text(text),
                    batch,
                })),
                None => kept.push((id, sequence)),
            }
        }
        self.running = kept;
        finished
    }
}
