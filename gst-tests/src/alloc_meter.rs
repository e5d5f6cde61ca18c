//! A global allocator for test binaries that proves "no unbounded allocation": it refuses (the
//! process aborts with "memory allocation of N bytes failed") any single allocation above
//! [`CEILING`], and measures, per thread, the largest single allocation and the bytes
//! allocated while a closure runs ([`measure`]), and the Rust heap in use ([`live_bytes`]; what
//! GLib and GStreamer allocate in C is not seen: watch the RSS for that).
//!
//! A test binary opts in with
//! `#[global_allocator] static ALLOC: MeteredAllocator = MeteredAllocator;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// No input in these tests may make the process ask for more than this in one allocation.
/// The fixture model's largest tensor is far below; a file claiming 2^40 bytes is far above.
pub const CEILING: usize = 1 << 30;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

pub struct MeteredAllocator;

/// Bytes allocated and not yet freed, process-wide: the heap a soak watches for growth.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The heap in use now (allocations not yet freed), when [`MeteredAllocator`] is installed.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn note(size: usize) {
    LIVE.fetch_add(size, Ordering::Relaxed);
    // `try_with`: the thread-local may be gone while a thread ends.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = TOTAL.try_with(|t| t.set(t.get().saturating_add(size)));
}

unsafe impl GlobalAlloc for MeteredAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CEILING {
            return std::ptr::null_mut();
        }
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            note(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CEILING {
            return std::ptr::null_mut();
        }
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            note(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CEILING {
            return std::ptr::null_mut();
        }
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            // The old block is gone; `note` counts the new one.
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            note(new_size);
        }
        moved
    }
}

/// What a closure allocated on this thread.
#[derive(Debug, Clone, Copy)]
pub struct Allocated {
    /// The largest single allocation, in bytes.
    pub largest: usize,
    /// All bytes allocated (not net of frees).
    pub total: usize,
}

/// Runs `f` and reports what it allocated on the calling thread (only meaningful in a binary
/// that installs [`MeteredAllocator`]).
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Allocated) {
    let before_largest = LARGEST.with(|l| l.replace(0));
    let before_total = TOTAL.with(|t| t.get());
    let value = f();
    let largest = LARGEST.with(|l| l.replace(before_largest.max(l.get())));
    let total = TOTAL.with(|t| t.get()) - before_total;
    (value, Allocated { largest, total })
}
