//! Deciding what to download and downloading it: a cached file is checked (size, sha256) before
//! it is used; what is missing or damaged becomes a [`Pending`] download; [`Hub::run`] fetches
//! a list of them with progress over the whole list.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::progress::{FetchEvent, FetchObserver};
use super::records::{sha256_file, Known};
use super::repo::{sha256_of_etag, RepoCache};
use super::source::UrlSource;
use super::transfer::{self, FileLock, Transfer};
use super::{FetchError, Hub};

/// A snapshot entry to create once a hub blob is in place.
pub(crate) struct Link {
    pub cache: RepoCache,
    pub commit: String,
    pub file: String,
    pub etag: String,
}

/// One file to download.
pub(crate) struct Pending {
    pub target: String,
    pub url: String,
    /// Send the hub token (hub files only).
    pub token: bool,
    pub dest: PathBuf,
    pub part: PathBuf,
    pub lock: PathBuf,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub link: Option<Link>,
}

/// A file is either usable where it is, or has to be downloaded.
pub(crate) enum Need {
    Ready(PathBuf),
    Fetch(Box<Pending>),
}

/// The state of a cached file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cached {
    Missing,
    Good,
    Damaged(String),
}

impl Hub {
    /// Checks a cached file against the size and sha256 it must have. A file checked before
    /// and untouched since is trusted without reading it; any other is hashed (once: the
    /// result is recorded).
    pub(crate) fn check(
        &self,
        path: &Path,
        target: &str,
        sha256: Option<&str>,
        size: Option<u64>,
        observer: &dyn FetchObserver,
    ) -> Cached {
        let Ok(meta) = std::fs::metadata(path) else {
            return Cached::Missing;
        };
        if let Some(size) = size.filter(|&s| s != meta.len()) {
            return Cached::Damaged(format!("{} bytes, {size} expected", meta.len()));
        }
        let expected = match (self.records.known(path), sha256) {
            (Known::Unchanged(recorded), Some(expected)) if recorded == expected => {
                return Cached::Good
            }
            (Known::Unchanged(_), None) => return Cached::Good,
            (Known::Changed(recorded), None) => Some(recorded),
            (_, expected) => expected.map(str::to_owned),
        };
        if meta.len() > 64 << 20 {
            observer.event(&FetchEvent::Note(&format!(
                "{target}: checking the cached copy ({})",
                super::human_bytes(meta.len())
            )));
        }
        let actual = match sha256_file(path) {
            Ok(actual) => actual,
            Err(e) => return Cached::Damaged(format!("unreadable: {e}")),
        };
        match expected {
            Some(expected) if expected != actual => {
                self.records.forget(path);
                Cached::Damaged(format!("sha256 {actual}, {expected} expected"))
            }
            _ => {
                self.records.remember(path, &actual);
                Cached::Good
            }
        }
    }

    /// Removes a damaged cached file so that it is fetched again (never loaded).
    pub(crate) fn discard(
        &self,
        path: &Path,
        target: &str,
        detail: &str,
    ) -> Result<(), FetchError> {
        if self.config.offline {
            return Err(FetchError::DamagedOffline {
                target: target.to_owned(),
                path: path.to_owned(),
                detail: detail.to_owned(),
            });
        }
        self.records.forget(path);
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FetchError::io(target, path, e)),
        }
    }

    /// Where a URL's file is cached: `{assets}/urls/{hash of the URL}/{file name}`.
    pub(crate) fn url_path(&self, url: &str) -> PathBuf {
        let digest = format!("{:x}", Sha256::digest(url.as_bytes()));
        let name = url
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .unwrap_or("download");
        self.config
            .assets
            .join("urls")
            .join(&digest[..16])
            .join(name)
    }

    /// A URL's file: cached (and intact), or a download. The size (and an ETag that is a
    /// sha256) come from a HEAD request; the sha256 given in the URL, when there is one, is
    /// what the file must hash to.
    pub(crate) fn need_url(
        &self,
        source: &UrlSource,
        observer: &dyn FetchObserver,
    ) -> Result<Need, FetchError> {
        let url = source.url.as_str();
        let dest = self.url_path(url);
        match self.check(&dest, url, source.sha256.as_deref(), None, observer) {
            Cached::Good => return Ok(Need::Ready(dest)),
            Cached::Missing => {}
            Cached::Damaged(detail) => {
                observer.event(&FetchEvent::Note(&format!(
                    "{url}: the cached copy is damaged ({detail}); fetching it again"
                )));
                self.discard(&dest, url, &detail)?;
            }
        }
        if self.config.offline {
            return Err(FetchError::Offline {
                target: url.to_owned(),
                cache: dest,
            });
        }
        let (size, etag) = match self.agent.head(url).call() {
            Ok(response) => {
                let get = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| {
                            v.trim()
                                .trim_start_matches("W/")
                                .trim_matches('"')
                                .to_owned()
                        })
                };
                (
                    get("content-length").and_then(|v| v.parse::<u64>().ok()),
                    get("etag"),
                )
            }
            // Servers that refuse HEAD still serve GET; the size then comes with the body.
            Err(ureq::Error::StatusCode(405 | 501)) => (None, None),
            Err(e) => return Err(transfer::request_error(url, url, e)),
        };
        let sha256 = source
            .sha256
            .clone()
            .or_else(|| etag.as_deref().and_then(sha256_of_etag));
        let with_suffix = |suffix: &str| {
            let mut name = dest.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        Ok(Need::Fetch(Box::new(Pending {
            target: url.to_owned(),
            url: url.to_owned(),
            token: false,
            part: with_suffix(".incomplete"),
            lock: with_suffix(".lock"),
            dest,
            size,
            sha256,
            link: None,
        })))
    }

    /// Downloads `pending`, one file after the other. With `announce`, observers hear the plan
    /// and the bytes; without, only each finished file (small files needed to plan the rest).
    pub(crate) fn run(
        &self,
        pending: Vec<Pending>,
        announce: bool,
        observer: &dyn FetchObserver,
    ) -> Result<(), FetchError> {
        if pending.is_empty() {
            return Ok(());
        }
        let overall_total: u64 = pending.iter().filter_map(|p| p.size).sum();
        if announce {
            observer.event(&FetchEvent::Plan {
                files: pending.len(),
                bytes: overall_total,
            });
        }
        let note = |message: &str| observer.event(&FetchEvent::Note(message));
        let mut overall_done = 0u64;
        for p in pending {
            let _lock = FileLock::acquire(&p.dest, &p.lock, &p.target, &note)?;
            // Another element or process may have fetched it while this one waited.
            let size = match self.check(&p.dest, &p.target, p.sha256.as_deref(), p.size, observer) {
                Cached::Good => std::fs::metadata(&p.dest).map(|m| m.len()).unwrap_or(0),
                Cached::Missing => {
                    self.download(&p, announce, overall_done, overall_total, observer)?
                }
                Cached::Damaged(detail) => {
                    self.discard(&p.dest, &p.target, &detail)?;
                    self.download(&p, announce, overall_done, overall_total, observer)?
                }
            };
            if let Some(link) = &p.link {
                link.cache
                    .link(&link.commit, &link.file, &link.etag)
                    .map_err(|e| FetchError::io(&p.target, &p.dest, e))?;
            }
            overall_done += size;
            observer.event(&FetchEvent::Done {
                file: &p.target,
                bytes: size,
            });
        }
        Ok(())
    }

    fn download(
        &self,
        p: &Pending,
        announce: bool,
        overall_done: u64,
        overall_total: u64,
        observer: &dyn FetchObserver,
    ) -> Result<u64, FetchError> {
        let token = if p.token {
            self.config.token.as_deref()
        } else {
            None
        };
        let transfer = Transfer {
            target: &p.target,
            url: &p.url,
            token,
            dest: &p.dest,
            part: &p.part,
            size: p.size,
            sha256: p.sha256.as_deref(),
        };
        let mut on_bytes = |done: u64, total: Option<u64>| {
            if announce {
                observer.event(&FetchEvent::Bytes {
                    file: &p.target,
                    done,
                    total,
                    overall_done: overall_done + done,
                    overall_total,
                });
            }
        };
        let note = |message: &str| observer.event(&FetchEvent::Note(message));
        let downloaded = transfer::download(&self.agent, &transfer, &mut on_bytes, &note)?;
        self.records.remember(&p.dest, &downloaded.sha256);
        Ok(downloaded.size)
    }
}
