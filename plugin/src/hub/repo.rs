//! One hub repository: its files in the local cache (the layout of `huggingface_hub`, through
//! `hf-hub`'s cache types) and on the server (`hf-hub`'s blocking client).
//!
//! ```text
//! {hub_cache}/models--owner--name/
//!   refs/main                       the commit the branch pointed to when last checked
//!   blobs/{etag}                    file contents, named by ETag (sha256 for LFS files)
//!   blobs/{etag}.incomplete         a download in progress or interrupted (resumed from here)
//!   snapshots/{commit}/{path}       relative symlinks into blobs/
//! {hub_cache}/.locks/models--owner--name/{etag}.lock
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::source::{is_commit_hash, HubRepo};
use super::transfer::{host_of, request_error};
use super::{FetchError, HubConfig};

fn hf_repo(id: &str, revision: &str) -> Repo {
    Repo::with_revision(id.to_owned(), RepoType::Model, revision.to_owned())
}

/// `owner/name: path`, how messages name a file of a repository.
pub(crate) fn target(repo: &HubRepo, file: &str) -> String {
    format!("{repo}: {file}")
}

/// The local side of one repository.
pub(crate) struct RepoCache {
    id: String,
    cache: Cache,
    dir: PathBuf,
    locks: PathBuf,
}

impl RepoCache {
    pub(crate) fn new(hub_cache: &Path, id: &str) -> Self {
        let folder = hf_repo(id, "main").folder_name();
        Self {
            id: id.to_owned(),
            cache: Cache::new(hub_cache.to_owned()),
            dir: hub_cache.join(&folder),
            locks: hub_cache.join(".locks").join(folder),
        }
    }

    /// The commit `revision` means locally: itself when it is a commit hash, else what
    /// `refs/{revision}` recorded.
    pub(crate) fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_owned());
        }
        let commit = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let commit = commit.trim();
        is_commit_hash(commit).then(|| commit.to_owned())
    }

    /// Records that `revision` (a branch or tag) points to `commit`.
    pub(crate) fn set_ref(&self, revision: &str, commit: &str) -> std::io::Result<()> {
        if revision == commit {
            return Ok(());
        }
        self.cache
            .repo(hf_repo(&self.id, revision))
            .create_ref(commit)
    }

    pub(crate) fn snapshot(&self, commit: &str) -> PathBuf {
        self.cache
            .repo(hf_repo(&self.id, commit))
            .pointer_path(commit)
    }

    /// Every file of the cached snapshot, as repository paths.
    pub(crate) fn listing(&self, commit: &str) -> BTreeSet<String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else if path.is_file() {
                    if let Ok(relative) = path.strip_prefix(root) {
                        out.insert(relative.to_string_lossy().replace('\\', "/"));
                    }
                }
            }
        }
        let root = self.snapshot(commit);
        let mut out = BTreeSet::new();
        walk(&root, &root, &mut out);
        out
    }

    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.cache.repo(hf_repo(&self.id, "main")).blob_path(etag)
    }

    /// `huggingface_hub`'s name for a partial download, so either tool resumes the other's.
    pub(crate) fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub(crate) fn lock(&self, etag: &str) -> PathBuf {
        self.locks.join(format!("{etag}.lock"))
    }

    /// The blob a cached snapshot file points to, and its ETag (the blob's name), when the
    /// snapshot has the file.
    pub(crate) fn cached(&self, commit: &str, file: &str) -> Option<(PathBuf, String)> {
        let pointer = self.snapshot(commit).join(file);
        let blob = pointer.canonicalize().ok()?;
        if !blob.is_file() {
            return None;
        }
        let etag = blob.file_name()?.to_string_lossy().into_owned();
        Some((blob, etag))
    }

    /// Makes `snapshots/{commit}/{file}` point at the blob `etag` (a relative symlink, as
    /// `huggingface_hub` makes them; a copy where links are impossible).
    pub(crate) fn link(&self, commit: &str, file: &str, etag: &str) -> std::io::Result<PathBuf> {
        let pointer = self.snapshot(commit).join(file);
        let blob = self.blob(etag);
        if let Some(dir) = pointer.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let target = blob.canonicalize()?;
        if pointer.canonicalize().ok().as_deref() == Some(target.as_path()) {
            return Ok(pointer);
        }
        // snapshots/{commit}/{a/b/file} -> ../../(../ per folder)blobs/{etag}
        let depth = file.matches('/').count() + 2;
        let relative: PathBuf = std::iter::repeat_n(Path::new(".."), depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(etag);
        // Made under a name of its own and renamed over the pointer: another thread linking
        // the same file at once never sees a missing or half-made entry.
        static UNIQUE: AtomicU64 = AtomicU64::new(0);
        let mut temporary = pointer.as_os_str().to_owned();
        temporary.push(format!(
            ".{}-{}.link",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let temporary = PathBuf::from(temporary);
        #[cfg(unix)]
        let made = std::os::unix::fs::symlink(&relative, &temporary);
        #[cfg(not(unix))]
        let made = std::fs::copy(&blob, &temporary).map(|_| ());
        if made.is_err() {
            // No symlinks on this file system: a copy.
            std::fs::copy(&blob, &temporary)?;
        }
        std::fs::rename(&temporary, &pointer).inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })?;
        Ok(pointer)
    }
}

/// What the server says about one file.
#[derive(Debug, Clone)]
pub(crate) struct FileMeta {
    pub etag: String,
    pub size: u64,
}

/// The server side: `hf-hub`'s client, every call bounded by the configured timeout (its own
/// HTTP agent has none, and a state change must not hang on a silent server).
pub(crate) struct Remote {
    api: Api,
    endpoint: String,
    timeout: Duration,
}

impl Remote {
    pub(crate) fn new(config: &HubConfig) -> Result<Self, FetchError> {
        let api = ApiBuilder::from_cache(Cache::new(config.hub_cache.clone()))
            .with_endpoint(config.endpoint.clone())
            .with_token(config.token.clone())
            .with_progress(false)
            .with_user_agent("gst-llamavid", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| FetchError::BadSource(format!("cannot set up the hub client: {e}")))?;
        Ok(Self {
            api,
            endpoint: config.endpoint.clone(),
            timeout: config.timeout,
        })
    }

    /// Where `file` of `repo` is downloaded from.
    pub(crate) fn url(&self, repo: &HubRepo, file: &str) -> String {
        self.api.repo(hf_repo(&repo.id, repo.revision())).url(file)
    }

    fn call<T: Send + 'static>(
        &self,
        target: &str,
        url: &str,
        call: impl FnOnce(Api) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, FetchError> {
        let (tx, rx) = mpsc::channel();
        let api = self.api.clone();
        std::thread::Builder::new()
            .name("llamavid-hub".into())
            .spawn(move || {
                let _ = tx.send(call(api));
            })
            .map_err(|e| FetchError::Network {
                target: target.to_owned(),
                endpoint: self.endpoint.clone(),
                detail: format!("cannot start a thread: {e}"),
            })?;
        match rx.recv_timeout(self.timeout) {
            Ok(result) => result.map_err(|e| self.api_error(target, url, e)),
            Err(_) => Err(FetchError::Network {
                target: target.to_owned(),
                endpoint: host_of(&self.endpoint).to_owned(),
                detail: format!("no answer within {} s", self.timeout.as_secs()),
            }),
        }
    }

    fn api_error(&self, target: &str, url: &str, error: ApiError) -> FetchError {
        match error {
            ApiError::RequestError(e) => request_error(target, url, *e),
            ApiError::MissingHeader(name) | ApiError::InvalidHeader(name) => FetchError::Protocol {
                target: target.to_owned(),
                url: url.to_owned(),
                detail: format!(
                    "header {name} missing or invalid (is {} a Hugging Face hub?)",
                    self.endpoint
                ),
            },
            other => FetchError::Protocol {
                target: target.to_owned(),
                url: url.to_owned(),
                detail: other.to_string(),
            },
        }
    }

    /// The commit `repo`'s revision points to and the files it holds
    /// (`GET {endpoint}/api/models/{repo}/revision/{revision}`).
    pub(crate) fn info(&self, repo: &HubRepo) -> Result<(String, BTreeSet<String>), FetchError> {
        let target = format!("{repo}: revision {}", repo.revision());
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            repo.id,
            repo.revision()
        );
        let hf = hf_repo(&repo.id, repo.revision());
        let info = self.call(&target, &url, move |api| api.repo(hf).info())?;
        if !is_commit_hash(&info.sha) {
            return Err(FetchError::Protocol {
                target,
                url,
                detail: format!("`sha` is not a commit hash: {:?}", info.sha),
            });
        }
        let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok((info.sha, files))
    }

    /// ETag and size of one file (a one-byte range request, redirects followed as the hub
    /// client does).
    pub(crate) fn metadata(&self, repo: &HubRepo, file: &str) -> Result<FileMeta, FetchError> {
        let target = target(repo, file);
        let url = self.url(repo, file);
        let call_url = url.clone();
        let meta = self.call(&target, &url, move |api| api.metadata(&call_url))?;
        Ok(FileMeta {
            etag: meta.etag().to_owned(),
            size: meta.size() as u64,
        })
    }
}

/// The sha256 an ETag promises: LFS files (weights) carry their sha256 as ETag; other files
/// carry a git object id, which is no sha256 of the content.
pub(crate) fn sha256_of_etag(etag: &str) -> Option<String> {
    (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| etag.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_huggingface_hubs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(dir.path(), "owner/name");
        let commit = "a".repeat(40);
        assert_eq!(cache.commit_of("main"), None);
        cache.set_ref("main", &commit).unwrap();
        assert_eq!(cache.commit_of("main").as_deref(), Some(commit.as_str()));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("models--owner--name/refs/main")).unwrap(),
            commit
        );
        let etag = "b".repeat(64);
        assert_eq!(
            cache.blob(&etag),
            dir.path().join("models--owner--name/blobs").join(&etag)
        );
        assert_eq!(
            cache.lock(&etag),
            dir.path()
                .join(".locks/models--owner--name")
                .join(format!("{etag}.lock"))
        );
        std::fs::create_dir_all(cache.blob(&etag).parent().unwrap()).unwrap();
        std::fs::write(cache.blob(&etag), b"x").unwrap();
        let pointer = cache.link(&commit, "sub/dir/file.bin", &etag).unwrap();
        assert_eq!(
            std::fs::read_link(&pointer).unwrap(),
            PathBuf::from("../../../../blobs").join(&etag)
        );
        assert_eq!(std::fs::read(&pointer).unwrap(), b"x");
        assert_eq!(cache.cached(&commit, "sub/dir/file.bin").unwrap().1, etag);
        assert_eq!(
            cache.listing(&commit).into_iter().collect::<Vec<_>>(),
            vec!["sub/dir/file.bin".to_owned()]
        );
        // Linking again is a no-op.
        cache.link(&commit, "sub/dir/file.bin", &etag).unwrap();
    }

    #[test]
    fn only_64_hex_etags_are_sha256() {
        assert_eq!(sha256_of_etag(&"A".repeat(64)), Some("a".repeat(64)));
        assert_eq!(sha256_of_etag(&"a".repeat(40)), None);
    }
}
