//! Figures of this test process from the kernel (`/proc/self/status`), for the soak and
//! lifecycle tests: what the metered allocator cannot see (GLib's and GStreamer's C
//! allocations, threads).

/// A numeric field of `/proc/self/status`, such as `VmRSS` (kB) or `Threads`.
fn status_field(name: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name}: line in /proc/self/status"))
}

/// Resident memory of this process, in bytes.
pub fn resident_bytes() -> usize {
    status_field("VmRSS") * 1024
}

/// Threads of this process.
pub fn thread_count() -> usize {
    status_field("Threads")
}
