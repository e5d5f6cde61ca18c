//! A repository's revision resolved to a commit, and its files resolved to cached paths or
//! downloads. The network is asked only what the cache cannot answer: a pinned commit whose
//! files are cached needs no request at all; a branch costs one request (where does it point
//! now?) and falls back to the cached commit when the hub cannot be reached.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::plan::{Cached, Link, Need, Pending};
use super::progress::{FetchEvent, FetchObserver};
use super::repo::{sha256_of_etag, target, RepoCache};
use super::source::HubRepo;
use super::{FetchError, Hub};

/// How much to trust the cache for a branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BranchPolicy {
    /// Ask the hub where the branch points (the model: users expect updates).
    Check,
    /// Use the commit recorded for the branch when there is one (files that never change in
    /// practice, such as bert-base-uncased's vocabulary).
    Cached,
}

/// A repository at a known commit.
pub(crate) struct RepoState<'h> {
    hub: &'h Hub,
    /// The repository as asked for (its revision may be a branch).
    pub asked: HubRepo,
    /// The same repository pinned to the commit in use.
    pub pinned: HubRepo,
    pub commit: String,
    pub cache: RepoCache,
    /// The server's file list at `commit`, once asked for.
    pub listing: Option<BTreeSet<String>>,
}

impl Hub {
    pub(crate) fn open_repo(
        &self,
        repo: &HubRepo,
        policy: BranchPolicy,
        observer: &dyn FetchObserver,
    ) -> Result<RepoState<'_>, FetchError> {
        let cache = RepoCache::new(&self.config.hub_cache, &repo.id);
        let revision = repo.revision();
        let cached_commit = cache.commit_of(revision);
        let (commit, listing) = if repo.is_pinned() {
            (revision.to_owned(), None)
        } else if self.config.offline {
            let commit = cached_commit.ok_or_else(|| FetchError::Offline {
                target: format!("{repo}: revision {revision}"),
                cache: self.config.hub_cache.join(format!(
                    "models--{}/refs/{revision}",
                    repo.id.replace('/', "--")
                )),
            })?;
            (commit, None)
        } else if let (BranchPolicy::Cached, Some(commit)) = (policy, cached_commit.as_ref()) {
            (commit.clone(), None)
        } else {
            match self.remote.info(repo) {
                Ok((commit, files)) => {
                    cache.set_ref(revision, &commit).map_err(|e| {
                        FetchError::io(&repo.to_string(), &cache.snapshot(&commit), e)
                    })?;
                    (commit, Some(files))
                }
                Err(e) if e.is_network() => match cached_commit {
                    Some(commit) => {
                        observer.event(&FetchEvent::Note(&format!(
                            "{e}; using the cached commit {commit} of {repo}"
                        )));
                        (commit, None)
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        };
        Ok(RepoState {
            hub: self,
            pinned: repo.at(&commit),
            asked: repo.clone(),
            commit,
            cache,
            listing,
        })
    }
}

impl RepoState<'_> {
    /// Path of `file` in the snapshot (where the loader reads it).
    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.cache.snapshot(&self.commit).join(file)
    }

    pub(crate) fn snapshot(&self) -> PathBuf {
        self.cache.snapshot(&self.commit)
    }

    /// The files the cache holds for this commit.
    pub(crate) fn local_listing(&self) -> BTreeSet<String> {
        self.cache.listing(&self.commit)
    }

    /// The server's file list at this commit (asked once).
    pub(crate) fn remote_listing(&mut self) -> Result<&BTreeSet<String>, FetchError> {
        if self.listing.is_none() {
            if self.hub.config.offline {
                return Err(FetchError::Offline {
                    target: format!("{}: file list", self.asked),
                    cache: self.snapshot(),
                });
            }
            let (_, files) = self.hub.remote.info(&self.pinned)?;
            self.listing = Some(files);
        }
        Ok(self.listing.as_ref().expect("just filled"))
    }

    /// Whether the cache holds an intact copy of `file` (no network).
    pub(crate) fn is_cached(&self, file: &str, observer: &dyn FetchObserver) -> bool {
        self.cache
            .cached(&self.commit, file)
            .is_some_and(|(blob, etag)| {
                let target = target(&self.asked, file);
                let sha256 = sha256_of_etag(&etag);
                self.hub
                    .check(&blob, &target, sha256.as_deref(), None, observer)
                    == Cached::Good
            })
    }

    /// `file` as a cached path, or the download that brings it. Only a file that is missing
    /// or damaged costs a request (its size and ETag).
    pub(crate) fn need(
        &self,
        file: &str,
        observer: &dyn FetchObserver,
    ) -> Result<Need, FetchError> {
        let target = target(&self.asked, file);
        if let Some((blob, etag)) = self.cache.cached(&self.commit, file) {
            let sha256 = sha256_of_etag(&etag);
            match self
                .hub
                .check(&blob, &target, sha256.as_deref(), None, observer)
            {
                Cached::Good => return Ok(Need::Ready(self.path(file))),
                Cached::Missing => {}
                Cached::Damaged(detail) => {
                    observer.event(&FetchEvent::Note(&format!(
                        "{target}: the cached copy is damaged ({detail}); fetching it again"
                    )));
                    self.hub.discard(&blob, &target, &detail)?;
                }
            }
        }
        if self.hub.config.offline {
            return Err(FetchError::Offline {
                target,
                cache: self.path(file),
            });
        }
        if self
            .listing
            .as_ref()
            .is_some_and(|files| !files.contains(file))
        {
            return Err(FetchError::NotFound {
                target,
                endpoint: self.hub.config.endpoint.clone(),
            });
        }
        let meta = self.hub.remote.metadata(&self.pinned, file)?;
        let sha256 = sha256_of_etag(&meta.etag);
        let blob = self.cache.blob(&meta.etag);
        // The same content may be cached for another commit already.
        match self
            .hub
            .check(&blob, &target, sha256.as_deref(), Some(meta.size), observer)
        {
            Cached::Good => {
                self.cache
                    .link(&self.commit, file, &meta.etag)
                    .map_err(|e| FetchError::io(&target, &blob, e))?;
                return Ok(Need::Ready(self.path(file)));
            }
            Cached::Missing => {}
            Cached::Damaged(detail) => self.hub.discard(&blob, &target, &detail)?,
        }
        Ok(Need::Fetch(Box::new(Pending {
            url: self.hub.remote.url(&self.pinned, file),
            token: true,
            dest: blob,
            part: self.cache.incomplete(&meta.etag),
            lock: self.cache.lock(&meta.etag),
            size: Some(meta.size),
            sha256,
            link: Some(Link {
                cache: RepoCache::new(&self.hub.config.hub_cache, &self.asked.id),
                commit: self.commit.clone(),
                file: file.to_owned(),
                etag: meta.etag,
            }),
            target,
        })))
    }

    /// `file` on disk now (downloaded at once if need be, without announcing a plan): for the
    /// small files that decide what else to fetch.
    pub(crate) fn get_now(
        &self,
        file: &str,
        observer: &dyn FetchObserver,
    ) -> Result<PathBuf, FetchError> {
        match self.need(file, observer)? {
            Need::Ready(path) => Ok(path),
            Need::Fetch(pending) => {
                self.hub.run(vec![*pending], false, observer)?;
                Ok(self.path(file))
            }
        }
    }
}
