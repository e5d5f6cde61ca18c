//! Prompt prefixes whose keys and values are computed once (vLLM's automatic prefix caching,
//! for the one prefix LLaMA-VID captions share). A caption's context opens with the prompt's
//! text before the video: the system prompt and `USER:`, 35 of the cpu-bench caption's 115
//! positions, the same for every caption of every stream with the same conversation template.
//! Attention is causal, so those positions' keys and values depend on those ids alone: a
//! caption can start from a copy of them and prefill only the rest.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Tensor;

use super::llama::{Llama, LlamaCache, LogitsFor};
use super::Result;

/// The keys and values of every layer at the positions of `ids`.
pub struct PrefixKv {
    ids: Vec<u32>,
    layers: Vec<(Tensor, Tensor)>,
}

impl PrefixKv {
    /// Positions it fills.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Makes an empty `cache` hold these positions.
    pub fn start(&self, cache: &mut LlamaCache) -> Result<()> {
        Ok(cache.start_with(&self.layers)?)
    }
}

/// The most prefixes kept (distinct conversation templates in use at once): each is small
/// beside a caption's cache (35 positions: 12.6 MB for the cpu-bench model in f32).
const KEPT_PREFIXES: usize = 4;

/// The prefixes of recent captions, the most recently used last.
#[derive(Default)]
pub struct PrefixCache {
    kept: Mutex<Vec<Arc<PrefixKv>>>,
}

impl PrefixCache {
    /// The keys and values of `ids` as the opening of a context: kept ones, or computed now
    /// (one forward of those rows alone) and kept.
    pub fn get_or_compute(&self, llm: &Llama, ids: &[u32]) -> Result<Arc<PrefixKv>> {
        if let Some(found) = self.find(ids) {
            return Ok(found);
        }
        let mut cache = llm.new_cache(ids.len());
        llm.forward(&llm.embed(ids)?, &mut cache, LogitsFor::LastPosition, None)?;
        let computed = Arc::new(PrefixKv {
            ids: ids.to_vec(),
            layers: cache.copy_positions(ids.len())?,
        });
        let mut kept = self.lock();
        // Another thread may have computed the same prefix meanwhile: keep one.
        kept.retain(|p| p.ids != ids);
        if kept.len() >= KEPT_PREFIXES {
            kept.remove(0);
        }
        kept.push(computed.clone());
        Ok(computed)
    }

    fn find(&self, ids: &[u32]) -> Option<Arc<PrefixKv>> {
        let mut kept = self.lock();
        let at = kept.iter().position(|p| p.ids == ids)?;
        let found = kept.remove(at);
        kept.push(found.clone());
        Some(found)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<PrefixKv>>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
