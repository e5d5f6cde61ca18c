//! Locks that outlive a panic: a panic on one streaming or model thread is reported as an
//! element error (never across the FFI boundary), and the state it leaves behind stays usable
//! for the flush, stop or disposal that follows, so a poisoned mutex is taken as it is.

use std::sync::{Mutex, MutexGuard};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
