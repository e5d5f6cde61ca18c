//! The kernels' only effects on the host process. A plugin lives in someone else's process,
//! so each is documented in the README ("Effects on the host process"), called only by a CPU
//! model load that asks for it (every one can be turned off through the model's load options),
//! and never by a CUDA load.

use std::sync::atomic::{AtomicBool, Ordering};

static ALLOCATOR_TUNED: AtomicBool = AtomicBool::new(false);
static AMX_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The process-wide effects applied so far in this process (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostEffects {
    /// `tune_allocator` ran.
    pub allocator_tuned: bool,
    /// AMX tile permission was asked of the OS.
    pub amx_requested: bool,
}

pub fn effects() -> HostEffects {
    HostEffects {
        allocator_tuned: ALLOCATOR_TUNED.load(Ordering::Relaxed),
        amx_requested: AMX_REQUESTED.load(Ordering::Relaxed),
    }
}

/// Keeps freed activation buffers in the heap instead of returning them to the kernel after
/// every operation: glibc unmaps blocks above 128 KiB by default, so each fresh activation paid
/// page faults and zeroing (10 to 20% of an encode). Process-wide (glibc's thresholds), applied
/// once; no effect outside glibc.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        ALLOCATOR_TUNED.store(true, Ordering::Relaxed);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's allocation thresholds.
        unsafe {
            // The largest threshold glibc accepts (32 MiB on 64-bit): activations below it
            // come from the heap; weights (larger) are still mapped on their own.
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            // Keep up to 1 GiB of freed memory at the top of the heap for reuse.
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

/// Linux (5.16+) makes each process ask for the AMX tile state before using it. Asking grants
/// it for the whole process; there is no way to give it back. Returns whether it is granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) fn request_amx_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    AMX_REQUESTED.store(true, Ordering::Relaxed);
    // SAFETY: arch_prctl with these arguments only changes this process's permitted
    // extended-state components; it has no memory effects.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(crate) fn request_amx_permission() -> bool {
    // Other systems either grant the tile state to every process or do not support AMX.
    cfg!(target_arch = "x86_64")
}

/// Raises the calling thread's nice value by `by` (Linux: niceness is per thread), so that
/// the pipeline's own threads win the CPU when the machine is busy. Only ever lowers the
/// priority (an unprivileged thread cannot raise it back). Returns whether it changed.
pub fn lower_current_thread_priority(by: i32) -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and get/setpriority on the calling thread only.
    unsafe {
        if by <= 0 {
            return false;
        }
        let tid = libc::gettid() as libc::id_t;
        // getpriority may legitimately return -1: clear errno to tell it from an error.
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now == -1 && *libc::__errno_location() != 0 {
            return false;
        }
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + by).min(19)) == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = by;
        false
    }
}

/// The calling thread's nice value (Linux), for tests and logs.
pub fn current_thread_nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    // SAFETY: as in `lower_current_thread_priority`.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        (now != -1 || *libc::__errno_location() == 0).then_some(now)
    }
    #[cfg(not(target_os = "linux"))]
    None
}
