//! Why a model could not be fetched, in words a user can act on. Every variant names what was
//! being fetched (`target`: the repository and file, or the URL).

use std::path::PathBuf;

/// Bytes for people: `9.98 GB`, `1.3 MB` (decimal units, as the hub shows sizes).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A setting that names no usable source.
    #[error("{0}")]
    BadSource(String),
    /// HTTP 404.
    #[error(
        "{target}: not found on {endpoint} (HTTP 404: unknown repository, revision or file; \
         check the spelling, or that the path exists locally)"
    )]
    NotFound { target: String, endpoint: String },
    /// HTTP 401 / 403: gated or private repositories.
    #[error(
        "{target}: access denied (HTTP {status}): the repository is gated or private. Log in \
         with `huggingface-cli login` or set HF_TOKEN to a token with access (for a gated model, \
         accept its terms on the model's page first){}",
        if *.status == 403 { "; the token in use was refused" } else { "" }
    )]
    Denied { target: String, status: u16 },
    /// No connection, DNS failure, timeout, connection lost with retries exhausted.
    #[error(
        "{target}: cannot reach {endpoint}: {detail}. Check the network connection (or \
         HF_ENDPOINT); with the files already cached, HF_HUB_OFFLINE=1 uses the cache only"
    )]
    Network {
        target: String,
        endpoint: String,
        detail: String,
    },
    /// `HF_HUB_OFFLINE=1` and the file is not in the cache.
    #[error(
        "{target}: not in the cache ({}) and HF_HUB_OFFLINE=1 forbids downloading it: run once \
         with network access, or unset HF_HUB_OFFLINE",
        .cache.display()
    )]
    Offline { target: String, cache: PathBuf },
    /// Not enough space for a download, or the disk filled up during one.
    #[error(
        "{target}: not enough disk space in {}: {} (free some space, or point HF_HOME / \
         HF_HUB_CACHE at a larger disk)",
        .path.display(), space_detail(*.needed, *.available)
    )]
    DiskFull {
        target: String,
        path: PathBuf,
        /// Bytes still to download, when known before the disk filled up.
        needed: Option<u64>,
        available: u64,
    },
    /// What arrived twice did not match the size or sha256 the server announced.
    #[error("{target}: the download is damaged ({detail}), also when fetched again")]
    Corrupt { target: String, detail: String },
    /// A cached file is damaged and offline mode forbids fetching it again.
    #[error(
        "{target}: the cached copy {} is damaged ({detail}) and HF_HUB_OFFLINE=1 forbids \
         fetching it again: unset HF_HUB_OFFLINE, or delete the file",
        .path.display()
    )]
    DamagedOffline {
        target: String,
        path: PathBuf,
        detail: String,
    },
    /// Another HTTP status.
    #[error("{target}: HTTP {status} from {url}")]
    Http {
        target: String,
        url: String,
        status: u16,
    },
    /// The server answered something a hub does not.
    #[error("{target}: unexpected answer from {url}: {detail}")]
    Protocol {
        target: String,
        url: String,
        detail: String,
    },
    #[error("{target}: {}: {source}", .path.display())]
    Io {
        target: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FetchError {
    /// An I/O error on `path`; a full disk gets its own variant.
    pub(crate) fn io(target: &str, path: &std::path::Path, source: std::io::Error) -> Self {
        if is_disk_full(&source) {
            let available = super::transfer::free_space(path).unwrap_or(0);
            return FetchError::DiskFull {
                target: target.to_owned(),
                path: path.parent().unwrap_or(path).to_owned(),
                needed: None,
                available,
            };
        }
        FetchError::Io {
            target: target.to_owned(),
            path: path.to_owned(),
            source,
        }
    }

    /// Worth trying again (the connection dropped, the bytes were damaged in transit).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchError::Network { .. } | FetchError::Corrupt { .. } | FetchError::Protocol { .. }
        ) || matches!(self, FetchError::Http { status, .. } if *status >= 500 || *status == 429)
    }

    /// Whether the failure says the network or server is unreachable (a cached copy may then
    /// stand in for a branch that could not be checked).
    pub fn is_network(&self) -> bool {
        matches!(self, FetchError::Network { .. })
            || matches!(self, FetchError::Http { status, .. } if *status >= 500)
    }
}

fn space_detail(needed: Option<u64>, available: u64) -> String {
    match needed {
        Some(needed) => format!(
            "{} needed, {} free",
            human_bytes(needed),
            human_bytes(available)
        ),
        None => format!("the disk filled up ({} free)", human_bytes(available)),
    }
}

/// ENOSPC and EDQUOT.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28) | Some(122))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_hub_shows_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(9_976_576_278), "9.98 GB");
        assert_eq!(human_bytes(1_271_816), "1.27 MB");
    }

    #[test]
    fn a_full_disk_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let e = FetchError::io("o/n: f.bin", &path, std::io::Error::from_raw_os_error(28));
        assert!(matches!(e, FetchError::DiskFull { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("not enough disk space") && text.contains("o/n: f.bin"),
            "{text}"
        );
        let e = FetchError::io("t", &path, std::io::Error::other("x"));
        assert!(matches!(e, FetchError::Io { .. }));
    }

    #[test]
    fn messages_say_what_to_do() {
        let denied = FetchError::Denied {
            target: "o/gated: config.json".into(),
            status: 401,
        }
        .to_string();
        assert!(denied.contains("HF_TOKEN") && denied.contains("huggingface-cli login"));
        assert!(denied.contains("o/gated: config.json"));
        let offline = FetchError::Offline {
            target: "o/n: config.json".into(),
            cache: "/c".into(),
        }
        .to_string();
        assert!(offline.contains("HF_HUB_OFFLINE=1"), "{offline}");
    }
}
