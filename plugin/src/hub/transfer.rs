//! Moving the bytes of one file from a URL to the cache, for hub files and plain URLs alike:
//! resumed from a partial file with a `Range` request, hashed while it arrives, checked against
//! the size and sha256 the server announced, renamed into place only when both match. Locks
//! make a file download once when several elements (threads) or processes ask at once.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::records::hash_into;
use super::FetchError;
use crate::sync::lock;

/// One file to download.
pub(crate) struct Transfer<'a> {
    /// `owner/name: path` or the URL, for messages.
    pub target: &'a str,
    pub url: &'a str,
    /// Sent as a bearer token (hub files only; redirects to other hosts drop it).
    pub token: Option<&'a str>,
    /// Where the file goes once complete and checked.
    pub dest: &'a Path,
    /// The partial download, kept between attempts and processes for resuming.
    pub part: &'a Path,
    pub size: Option<u64>,
    /// Lowercase hex.
    pub sha256: Option<&'a str>,
}

/// What arrived.
pub(crate) struct Downloaded {
    pub size: u64,
    pub sha256: String,
}

/// The HTTP client of every download: timeouts on connecting and on each read (a stalled
/// connection fails instead of hanging a state change), the token kept only on same-host
/// redirects, no compression (byte ranges must mean bytes of the file).
pub(crate) fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_per_read(Some(timeout))
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .user_agent(concat!("gst-llamavid/", env!("CARGO_PKG_VERSION")))
        .accept_encoding("identity")
        .build()
        .into()
}

/// Host part of a URL, for messages.
pub(crate) fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// A ureq failure in words: HTTP statuses by class, everything else a network problem.
pub(crate) fn request_error(target: &str, url: &str, error: ureq::Error) -> FetchError {
    match error {
        ureq::Error::StatusCode(404) => FetchError::NotFound {
            target: target.to_owned(),
            endpoint: host_of(url).to_owned(),
        },
        ureq::Error::StatusCode(status @ (401 | 403)) => FetchError::Denied {
            target: target.to_owned(),
            status,
        },
        ureq::Error::StatusCode(status) => FetchError::Http {
            target: target.to_owned(),
            url: url.to_owned(),
            status,
        },
        other => FetchError::Network {
            target: target.to_owned(),
            endpoint: host_of(url).to_owned(),
            detail: other.to_string(),
        },
    }
}

/// Free bytes for an unprivileged writer on the file system holding `path` (or its nearest
/// existing ancestor).
pub(crate) fn free_space(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid NUL-terminated path and a zeroed out-struct of the right type.
        let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
        (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = existing;
        None
    }
}

/// Room kept free beyond the download itself.
const SPACE_MARGIN: u64 = 64 << 20;

/// Parses `Content-Range: bytes START-END/TOTAL`.
fn content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let range = value.trim().strip_prefix("bytes")?.trim();
    let (span, total) = range.split_once('/')?;
    let start = span.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

fn header<'r>(response: &'r ureq::http::Response<ureq::Body>, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// One attempt at `t`. Bytes already in `t.part` are kept when the server resumes from there;
/// `on_bytes(done, total)` follows the file. A network failure leaves the partial file for the
/// next attempt; a size or hash mismatch deletes it.
pub(crate) fn download_once(
    agent: &ureq::Agent,
    t: &Transfer<'_>,
    on_bytes: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Downloaded, FetchError> {
    let io = |path: &Path, e| FetchError::io(t.target, path, e);
    if let Some(dir) = t.part.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(t.part)
        .map_err(|e| io(t.part, e))?;
    let mut hasher = Sha256::new();
    let mut start = hash_into(&mut file, &mut hasher).map_err(|e| io(t.part, e))?;
    if t.size.is_some_and(|size| start > size) {
        file.set_len(0).map_err(|e| io(t.part, e))?;
        hasher = Sha256::new();
        start = 0;
    }

    let complete_already = t.size.is_some_and(|size| size == start && start > 0);
    if !complete_already {
        let mut request = agent.get(t.url);
        if let Some(token) = t.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        if start > 0 {
            request = request.header("Range", &format!("bytes={start}-"));
        }
        let response = match request.call() {
            // The partial file is not a prefix of what the server has now: start over.
            Err(ureq::Error::StatusCode(416)) if start > 0 => {
                file.set_len(0).map_err(|e| io(t.part, e))?;
                return Err(FetchError::Protocol {
                    target: t.target.to_owned(),
                    url: t.url.to_owned(),
                    detail: "range not satisfiable for the partial download; starting over".into(),
                });
            }
            other => other.map_err(|e| request_error(t.target, t.url, e))?,
        };
        let status = response.status().as_u16();
        let announced = header(&response, "content-length").and_then(|v| v.parse::<u64>().ok());
        let mut total = t.size;
        if status == 206 {
            let (from, whole) = header(&response, "content-range")
                .and_then(content_range)
                .ok_or_else(|| FetchError::Protocol {
                    target: t.target.to_owned(),
                    url: t.url.to_owned(),
                    detail: "206 without a valid Content-Range".into(),
                })?;
            if from != start {
                file.set_len(0).map_err(|e| io(t.part, e))?;
                return Err(FetchError::Protocol {
                    target: t.target.to_owned(),
                    url: t.url.to_owned(),
                    detail: format!("asked for bytes from {start}, got bytes from {from}"),
                });
            }
            total = total.or(whole).or(announced.map(|n| n + start));
        } else {
            // 200: the whole file, whatever was asked.
            if start > 0 {
                file.set_len(0).map_err(|e| io(t.part, e))?;
                hasher = Sha256::new();
                start = 0;
            }
            total = total.or(announced);
        }
        if let (Some(total), Some(free)) = (total, free_space(t.part)) {
            let needed = total.saturating_sub(start);
            if free < needed + SPACE_MARGIN {
                return Err(FetchError::DiskFull {
                    target: t.target.to_owned(),
                    path: t.part.parent().unwrap_or(t.part).to_owned(),
                    needed: Some(needed),
                    available: free,
                });
            }
        }

        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut done = start;
        on_bytes(done, total);
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = file.flush();
                    return Err(FetchError::Network {
                        target: t.target.to_owned(),
                        endpoint: host_of(t.url).to_owned(),
                        detail: format!("connection lost after {done} bytes: {e}"),
                    });
                }
            };
            file.write_all(&buf[..n]).map_err(|e| io(t.part, e))?;
            hasher.update(&buf[..n]);
            done += n as u64;
            on_bytes(done, total);
        }
    }
    file.sync_data().map_err(|e| io(t.part, e))?;
    let size = file.metadata().map_err(|e| io(t.part, e))?.len();
    drop(file);

    let sha256 = format!("{:x}", hasher.finalize());
    let mismatch = match (t.size, t.sha256) {
        (Some(expected), _) if size != expected => Some(format!(
            "{size} bytes arrived, the server announced {expected}"
        )),
        (_, Some(expected)) if sha256 != expected => {
            Some(format!("sha256 {sha256}, the server announced {expected}"))
        }
        _ => None,
    };
    if let Some(detail) = mismatch {
        let _ = std::fs::remove_file(t.part);
        return Err(FetchError::Corrupt {
            target: t.target.to_owned(),
            detail,
        });
    }
    if let Some(dir) = t.dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(t.part, t.dest).map_err(|e| io(t.dest, e))?;
    Ok(Downloaded { size, sha256 })
}

/// Attempts per file: a dropped connection resumes, damaged bytes start over.
const ATTEMPTS: u32 = 3;

/// [`download_once`] until it succeeds, at most [`ATTEMPTS`] times for failures worth
/// retrying; `note` hears about each retry.
pub(crate) fn download(
    agent: &ureq::Agent,
    t: &Transfer<'_>,
    on_bytes: &mut dyn FnMut(u64, Option<u64>),
    note: &dyn Fn(&str),
) -> Result<Downloaded, FetchError> {
    let mut attempt = 1;
    loop {
        match download_once(agent, t, on_bytes) {
            Ok(done) => return Ok(done),
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                note(&format!("{e}; trying again ({}/{ATTEMPTS})", attempt + 1));
                std::thread::sleep(Duration::from_millis(300 * attempt as u64));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Files some thread of this process is downloading.
static IN_PROCESS: LazyLock<(Mutex<HashSet<PathBuf>>, Condvar)> =
    LazyLock::new(|| (Mutex::new(HashSet::new()), Condvar::new()));

/// Exclusive right to download one file: within this process (other elements wait) and across
/// processes (an advisory lock on `lock_path`, the file `huggingface_hub` locks too).
pub(crate) struct FileLock {
    key: PathBuf,
    _file: File,
}

impl FileLock {
    /// Waits for the file `key` to be free; `note` is told once when someone else holds it.
    pub(crate) fn acquire(
        key: &Path,
        lock_path: &Path,
        target: &str,
        note: &dyn Fn(&str),
    ) -> Result<Self, FetchError> {
        let (busy, freed) = &*IN_PROCESS;
        let mut told = false;
        {
            let mut busy = lock(busy);
            while busy.contains(key) {
                if !told {
                    note(&format!(
                        "{target}: waiting for another element downloading it"
                    ));
                    told = true;
                }
                busy = freed.wait(busy).unwrap_or_else(|e| e.into_inner());
            }
            busy.insert(key.to_owned());
        }
        // From here on the key is ours; release it on every exit.
        let release = || {
            let mut busy = lock(busy);
            busy.remove(key);
            freed.notify_all();
        };
        let file = match open_locked(lock_path, target, note) {
            Ok(file) => file,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        Ok(Self {
            key: key.to_owned(),
            _file: file,
        })
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let (busy, freed) = &*IN_PROCESS;
        let mut busy = lock(busy);
        busy.remove(&self.key);
        freed.notify_all();
    }
}

fn open_locked(lock_path: &Path, target: &str, note: &dyn Fn(&str)) -> Result<File, FetchError> {
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| FetchError::io(target, dir, e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .map_err(|e| FetchError::io(target, lock_path, e))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let mut told = false;
        loop {
            // SAFETY: flock on a descriptor we own; released when the file closes.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(FetchError::io(target, lock_path, err));
            }
            if !told {
                note(&format!(
                    "{target}: waiting for another process downloading it ({})",
                    lock_path.display()
                ));
                told = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 0-0/1234"), Some((0, Some(1234))));
        assert_eq!(
            content_range("bytes 100-1233/1234"),
            Some((100, Some(1234)))
        );
        assert_eq!(content_range("bytes 100-1233/*"), Some((100, None)));
        assert_eq!(content_range("items 1-2/3"), None);
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("https://huggingface.co/a/b"), "huggingface.co");
        assert_eq!(host_of("http://127.0.0.1:8080"), "127.0.0.1:8080");
    }

    #[test]
    fn threads_take_the_file_lock_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("blob");
        let lock = dir.path().join("blob.lock");
        let inside = std::sync::atomic::AtomicUsize::new(0);
        let waited = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let note = |_: &str| {
                        waited.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    };
                    let _guard = FileLock::acquire(&key, &lock, "t", &note).unwrap();
                    let now = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(now, 0, "two holders at once");
                    std::thread::sleep(Duration::from_millis(20));
                    inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        assert!(waited.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }
}
