//! One loaded model per (files, device, dtype) per process, shared by every element naming it,
//! freed when the last user lets go.

use crate::sync::lock;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

/// A process-wide map from a model's identity to the model, holding it weakly.
pub struct Registry<K, M> {
    slots: Mutex<HashMap<K, Arc<Mutex<Weak<M>>>>>,
}

impl<K: Eq + Hash + Clone, M> Default for Registry<K, M> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, M> Registry<K, M> {
    /// The model for `key`, loading it with `load` unless another user holds it already; the
    /// flag says whether this call loaded it. Two callers asking for the same key at once load
    /// it once; other keys load in parallel.
    pub fn get_or_load<E>(
        &self,
        key: &K,
        load: impl FnOnce() -> Result<M, E>,
    ) -> Result<(Arc<M>, bool), E> {
        let slot = {
            let mut slots = lock(&self.slots);
            slots.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot.lock().map(|w| w.strong_count() > 0).unwrap_or(false)
            });
            slots.entry(key.clone()).or_default().clone()
        };
        let mut weak = lock(&slot);
        if let Some(model) = weak.upgrade() {
            return Ok((model, false));
        }
        let model = Arc::new(load()?);
        *weak = Arc::downgrade(&model);
        Ok((model, true))
    }

    /// Models currently alive (for tests and statistics).
    pub fn live(&self) -> usize {
        let slots = lock(&self.slots);
        slots
            .values()
            .filter(|s| s.lock().map(|w| w.strong_count() > 0).unwrap_or(false))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn shares_one_copy_and_frees_it_with_the_last_user() {
        let registry: Registry<&str, String> = Registry::default();
        let loads = AtomicUsize::new(0);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>("model".to_owned())
        };
        let (a, loaded_a) = registry.get_or_load(&"m", load).unwrap();
        let (b, loaded_b) = registry.get_or_load(&"m", load).unwrap();
        assert!(
            loaded_a && !loaded_b,
            "the second user shares the first one's copy"
        );
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        drop(a);
        drop(b);
        assert_eq!(registry.live(), 0);
        let _c = registry.get_or_load(&"m", load).unwrap();
        assert_eq!(
            loads.load(Ordering::SeqCst),
            2,
            "reloaded after the last user went"
        );
    }

    #[test]
    fn a_failed_load_is_not_cached() {
        let registry: Registry<u8, u8> = Registry::default();
        assert!(registry.get_or_load(&1, || Err::<u8, _>("broken")).is_err());
        assert_eq!(*registry.get_or_load(&1, || Ok::<_, &str>(7)).unwrap().0, 7);
    }

    #[test]
    fn concurrent_requests_load_once() {
        let registry: Arc<Registry<u8, u8>> = Arc::new(Registry::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (registry, loads) = (registry.clone(), loads.clone());
                std::thread::spawn(move || {
                    registry
                        .get_or_load(&0, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(30));
                            Ok::<_, ()>(1)
                        })
                        .unwrap()
                        .0
                })
            })
            .collect();
        let models: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(models.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    }
}
