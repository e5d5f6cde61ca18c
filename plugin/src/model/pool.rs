//! The model's own thread pool. All of a model's CPU compute, our kernels and candle's own CPU
//! ops alike, runs inside it (`LlamaVid` installs it around every entry point), so that the
//! application's rayon pool and the pipeline's threads are left alone and a user can say how
//! many cores the model takes.

use llamavid_kernels::cpu::host;

use super::{ModelError, Result};

/// How much the pool's threads are deprioritised (nice value added, Linux): enough for the
/// video decoder and the streaming threads to win a busy CPU (a nice-5 thread gets about a
/// third of a nice-0 thread's share), not so much that the model starves on a machine that is
/// busy with other work.
pub const NICE_INCREMENT: i32 = 5;

/// The default thread count: one per core, leaving one core to the pipeline when there are
/// more than two.
pub fn default_threads() -> usize {
    default_threads_for(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn default_threads_for(cores: usize) -> usize {
    if cores > 2 {
        cores - 1
    } else {
        cores.max(1)
    }
}

/// A rayon pool owned by one loaded model (shared by every element that shares the model).
pub struct ComputePool {
    pool: rayon::ThreadPool,
    lowered_priority: bool,
}

impl ComputePool {
    /// `threads` threads (`None`: [`default_threads`]), named `llamavid-model-N`; with
    /// `lower_priority`, each raises its nice value by [`NICE_INCREMENT`] when it starts
    /// (Linux; elsewhere nothing changes).
    pub fn new(threads: Option<usize>, lower_priority: bool) -> Result<Self> {
        let threads = threads.unwrap_or_else(default_threads);
        if threads == 0 {
            return Err(ModelError::InvalidInput(
                "the model's thread pool needs at least one thread".into(),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("llamavid-model-{i}"))
            .start_handler(move |_| {
                if lower_priority {
                    host::lower_current_thread_priority(NICE_INCREMENT);
                }
            })
            .build()
            .map_err(|e| {
                ModelError::InvalidInput(format!("cannot start {threads} model threads: {e}"))
            })?;
        Ok(Self {
            pool,
            lowered_priority: lower_priority && cfg!(target_os = "linux"),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Whether the threads run at a lowered priority.
    pub fn lowered_priority(&self) -> bool {
        self.lowered_priority
    }

    /// Runs `f` on a pool thread (or directly when already on one): every parallel loop inside
    /// it, ours or candle's, splits over this pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Runs `f` once on every thread of the pool, returning their results (tests, logs).
    pub fn broadcast<R: Send>(&self, f: impl Fn() -> R + Sync) -> Vec<R> {
        self.pool.broadcast(|_| f())
    }
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool")
            .field("threads", &self.threads())
            .field("lowered_priority", &self.lowered_priority)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_a_core_to_the_pipeline_above_two() {
        assert_eq!(default_threads_for(1), 1);
        assert_eq!(default_threads_for(2), 2);
        assert_eq!(default_threads_for(3), 2);
        assert_eq!(default_threads_for(16), 15);
        assert!(ComputePool::new(Some(0), false).is_err());
    }
}
