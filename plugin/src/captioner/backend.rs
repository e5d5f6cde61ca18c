//! Where captions are generated, behind one small interface: the scheduler hands a backend the
//! window of tokens, the prompt and the sampling of a caption, and collects finished texts.
//! [`LocalCaptions`] runs the loaded language model with continuous batching (every running
//! caption advances one token per forward; captions join and leave between steps). A remote
//! backend (a vLLM server taking the window's input embeddings) implements the same trait and
//! completes captions on its own threads, calling the [`Waker`] so that the scheduler collects
//! them.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use candle_core::Tensor;

use super::engine::CaptionEngine;
use super::stream::Problem;
use super::worker::panic_problem;
use crate::model::{Cancel, GenerationParams, ModelError, Result};

/// Names one caption between the scheduler and a backend.
pub type CaptionId = u64;

/// Wakes the scheduler (a backend's own threads call it when a caption completed).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// How a caption ended.
#[derive(Debug)]
pub enum Outcome {
    Text(String),
    /// Interrupted (its stream flushed or left, or the scheduler stopped).
    Cancelled,
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

pub trait CaptionBackend<P>: Send {
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

    /// Whether `advance` has something to do now.
    fn ready(&self) -> bool;

    /// Does one round of work: for the local model, one decode step of the running captions
    /// (newcomers prefill in it). Returns the captions that finished.
    fn advance(&mut self, cancel: Cancel) -> Vec<Finished>;

    /// For backends that complete captions on their own threads.
    fn set_waker(&mut self, _waker: Waker) {}
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
    fn fail_running(&mut self, outcome: impl Fn() -> Outcome, batch: usize) -> Vec<Finished> {
        self.running
            .drain(..)
            .map(|(id, _)| Finished {
                id,
                outcome: outcome(),
                batch,
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

    fn advance(&mut self, cancel: Cancel) -> Vec<Finished> {
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
                let problem = panic_problem("captioning", &*panic);
                return self.fail_running(|| Outcome::Failed(problem.clone()), batch);
            }
        };
        let mut finished = Vec::new();
        let mut kept = Vec::with_capacity(batch);
        for ((id, sequence), text) in self.running.drain(..).zip(texts) {
            match text {
                Some(text) => finished.push(Finished {
                    id,
                    outcome: Outcome::Text(text),
                    batch,
                }),
                None => kept.push((id, sequence)),
            }
        }
        self.running = kept;
        finished
    }
}
