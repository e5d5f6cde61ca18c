//! What a fetch tells its caller while it runs: the element turns it into `progress` messages,
//! the command-line tools into a progress bar.

/// One step of a fetch. `file` names the repository and file (`owner/name: path`) or the URL.
#[derive(Debug, Clone, Copy)]
pub enum FetchEvent<'a> {
    /// Files missing from the cache are about to be downloaded: how many, and their bytes
    /// (files whose size the server did not announce count as 0).
    Plan { files: usize, bytes: u64 },
    /// Bytes of `file` are on disk: `done` of `total` for the file (a resumed download starts
    /// at what was already there), `overall_done` of `overall_total` for the whole plan.
    Bytes {
        file: &'a str,
        done: u64,
        total: Option<u64>,
        overall_done: u64,
        overall_total: u64,
    },
    /// `file` is complete and checked.
    Done { file: &'a str, bytes: u64 },
    /// Something worth telling a person: waiting for another process, retrying, checking a
    /// cached copy, using a cached revision because the hub could not be reached.
    Note(&'a str),
}

/// Receives [`FetchEvent`]s; called from the thread that fetches.
pub trait FetchObserver: Sync {
    fn event(&self, event: &FetchEvent<'_>);
}

/// No progress display.
impl FetchObserver for () {
    fn event(&self, _event: &FetchEvent<'_>) {}
}

impl<F: Fn(&FetchEvent<'_>) + Sync> FetchObserver for F {
    fn event(&self, event: &FetchEvent<'_>) {
        self(event)
    }
}
