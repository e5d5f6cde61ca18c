//! What the `model` and `vision-tower` settings name: a local path, a repository or a file on
//! the hub, or a URL. A value that exists on disk is always a path; only a value that does not
//! and has the hub's shape is looked up on the hub.

use std::fmt;
use std::path::{Path, PathBuf};

use super::FetchError;

/// The revision a hub id without `@revision` means.
pub const DEFAULT_REVISION: &str = "main";

/// A model repository on the hub at a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubRepo {
    /// `owner/name`.
    pub id: String,
    /// `None` is the default branch, `main`.
    pub revision: Option<String>,
}

impl HubRepo {
    pub fn new(id: impl Into<String>, revision: Option<String>) -> Self {
        Self {
            id: id.into(),
            revision,
        }
    }

    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }

    /// Pinned to a full commit hash: the files it names can never change, so a complete cached
    /// copy is used without asking the hub anything.
    pub fn is_pinned(&self) -> bool {
        is_commit_hash(self.revision())
    }

    /// The same repository pinned to `commit`.
    pub fn at(&self, commit: &str) -> Self {
        Self::new(self.id.clone(), Some(commit.to_owned()))
    }
}

impl fmt::Display for HubRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(revision) => write!(f, "{}@{revision}", self.id),
            None => f.write_str(&self.id),
        }
    }
}

/// Where the LLaMA-VID checkpoint comes from (`model` property, `--model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(HubRepo),
}

/// A URL to download, with the sha256 its content must have when the user gave one
/// (`https://host/file.pth#sha256=<64 hex digits>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlSource {
    pub url: String,
    pub sha256: Option<String>,
}

/// Where the EVA-ViT-G weights come from (`vision-tower` property, `--vision-tower`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisionTowerSource {
    Local(PathBuf),
    Url(UrlSource),
    /// A file in a hub repository: `owner/name/path/in/repo[@revision]`.
    HubFile {
        repo: HubRepo,
        path: String,
    },
}

/// Where the reference implementation itself downloads EVA-ViT-G (LAVIS, BLIP-2). The default
/// for hub models whose repository does not ship the file.
pub const LAVIS_EVA_URL: &str =
    "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth";

/// The Q-Former's tokenizer for hub models (`config.json` and `vocab.txt` only).
pub const BERT_REPO: &str = "google-bert/bert-base-uncased";

/// A full git commit hash (40 hex digits).
pub fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One `owner` or `name` part of a hub id: letters, digits, `-`, `_`, `.`; not starting with a
/// separator and without the `--` / `..` the hub forbids.
fn is_id_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 96
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && part.as_bytes()[0].is_ascii_alphanumeric()
        && !part.contains("--")
        && !part.contains("..")
}

fn valid_revision(revision: &str) -> bool {
    !revision.is_empty()
        && !revision.contains("..")
        && !revision.starts_with('/')
        && revision.bytes().all(|b| b.is_ascii_graphic())
}

/// Values that are paths by their look, whether or not they exist.
fn looks_like_path(value: &str) -> bool {
    value.starts_with('/')
        || value.starts_with('.')
        || value.starts_with('~')
        || value.contains('\\')
        || value.ends_with('/')
}

/// `owner/name` and an optional revision, or `None` when `value` has another shape.
fn split_repo(id: &str, revision: Option<&str>) -> Option<HubRepo> {
    let (owner, name) = id.split_once('/')?;
    if !is_id_part(owner) || !is_id_part(name) {
        return None;
    }
    if revision.is_some_and(|r| !valid_revision(r)) {
        return None;
    }
    Some(HubRepo::new(id, revision.map(str::to_owned)))
}

impl ModelSource {
    /// Reads a `model` value: an existing path, else `owner/name[@revision]`, else a path (that
    /// the loader then reports as missing).
    pub fn parse(value: &str) -> Result<Self, FetchError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(FetchError::BadSource(
                "empty model: give a model directory or a hub id owner/name[@revision]".into(),
            ));
        }
        if Path::new(value).exists() || looks_like_path(value) {
            return Ok(Self::Local(PathBuf::from(value)));
        }
        let (id, revision) = match value.split_once('@') {
            Some((id, revision)) => (id, Some(revision)),
            None => (value, None),
        };
        if id.matches('/').count() == 1 {
            if let Some(repo) = split_repo(id, revision) {
                return Ok(Self::Hub(repo));
            }
        }
        Ok(Self::Local(PathBuf::from(value)))
    }
}

impl VisionTowerSource {
    /// Reads a `vision-tower` value: an existing path, an `https://` (or `http://`) URL, a hub
    /// file `owner/name/path/in/repo[@revision]`, else a path.
    pub fn parse(value: &str) -> Result<Self, FetchError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(FetchError::BadSource("empty vision-tower".into()));
        }
        if Path::new(value).exists() {
            return Ok(Self::Local(PathBuf::from(value)));
        }
        if value.starts_with("https://") || value.starts_with("http://") {
            return parse_url(value).map(Self::Url);
        }
        if looks_like_path(value) {
            return Ok(Self::Local(PathBuf::from(value)));
        }
        // Revisions may hold a `/` (refs/pr/1), so the revision is after the last `@`.
        let (rest, revision) = match value.rsplit_once('@') {
            Some((rest, revision)) => (rest, Some(revision)),
            None => (value, None),
        };
        let mut parts = rest.splitn(3, '/');
        if let (Some(owner), Some(name), Some(path)) = (parts.next(), parts.next(), parts.next()) {
            let path_ok = !path.is_empty()
                && !path.ends_with('/')
                && path
                    .split('/')
                    .all(|p| !p.is_empty() && p != "." && p != "..");
            if path_ok {
                if let Some(repo) = split_repo(&format!("{owner}/{name}"), revision) {
                    return Ok(Self::HubFile {
                        repo,
                        path: path.to_owned(),
                    });
                }
            }
        }
        Ok(Self::Local(PathBuf::from(value)))
    }

    /// The default for hub models whose repository has no EVA file.
    pub fn lavis() -> Self {
        Self::Url(UrlSource {
            url: LAVIS_EVA_URL.to_owned(),
            sha256: None,
        })
    }
}

fn parse_url(value: &str) -> Result<UrlSource, FetchError> {
    let (url, fragment) = match value.split_once('#') {
        Some((url, fragment)) => (url, Some(fragment)),
        None => (value, None),
    };
    let sha256 = match fragment {
        None => None,
        Some(fragment) => match fragment.strip_prefix("sha256=") {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(hex.to_ascii_lowercase())
            }
            _ => {
                return Err(FetchError::BadSource(format!(
                    "{value}: the only URL fragment understood is #sha256=<64 hex digits>"
                )))
            }
        },
    };
    let host_and_path = url.split_once("://").map(|(_, rest)| rest).unwrap_or("");
    let Some((host, path)) = host_and_path.split_once('/') else {
        return Err(FetchError::BadSource(format!(
            "{value}: a URL must name a file (https://host/path/file)"
        )));
    };
    if host.is_empty() || path.is_empty() || path.ends_with('/') {
        return Err(FetchError::BadSource(format!(
            "{value}: a URL must name a file (https://host/path/file)"
        )));
    }
    Ok(UrlSource {
        url: url.to_owned(),
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(id: &str, revision: Option<&str>) -> ModelSource {
        ModelSource::Hub(HubRepo::new(id, revision.map(str::to_owned)))
    }

    #[test]
    fn model_values_that_are_hub_ids() {
        assert_eq!(
            ModelSource::parse("YanweiLi/llama-vid-7b-full-224-video-fps-1").unwrap(),
            hub("YanweiLi/llama-vid-7b-full-224-video-fps-1", None)
        );
        assert_eq!(
            ModelSource::parse("owner/name@v1.0").unwrap(),
            hub("owner/name", Some("v1.0"))
        );
        assert_eq!(
            ModelSource::parse("owner/name@refs/pr/3").unwrap(),
            hub("owner/name", Some("refs/pr/3"))
        );
    }

    #[test]
    fn model_values_that_are_paths() {
        let dir = tempfile::tempdir().unwrap();
        // An existing directory wins even when it has the shape of a hub id.
        let shaped = dir.path().join("owner");
        std::fs::create_dir_all(shaped.join("name")).unwrap();
        let cwd_relative = format!("{}/name", shaped.display());
        assert_eq!(
            ModelSource::parse(&cwd_relative).unwrap(),
            ModelSource::Local(PathBuf::from(&cwd_relative))
        );
        for path in [
            "/models/llama-vid",
            "./owner/name",
            "../owner/name",
            "~/owner/name",
            "models",
            "a/b/c",
            "owner/na me",
            "owner/-name",
            "owner/name--x",
            "owner/name@",
        ] {
            assert_eq!(
                ModelSource::parse(path).unwrap(),
                ModelSource::Local(PathBuf::from(path)),
                "{path}"
            );
        }
        assert!(ModelSource::parse("  ").is_err());
    }

    #[test]
    fn pinned_means_a_full_commit_hash() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert!(HubRepo::new("a/b", Some(commit.into())).is_pinned());
        assert!(!HubRepo::new("a/b", None).is_pinned());
        assert!(!HubRepo::new("a/b", Some("0123456".into())).is_pinned());
        assert!(!HubRepo::new("a/b", Some("main".into())).is_pinned());
        assert_eq!(HubRepo::new("a/b", None).revision(), "main");
        assert_eq!(
            HubRepo::new("a/b", None).at(commit).to_string(),
            format!("a/b@{commit}")
        );
    }

    #[test]
    fn vision_tower_values() {
        assert_eq!(
            VisionTowerSource::parse(LAVIS_EVA_URL).unwrap(),
            VisionTowerSource::lavis()
        );
        let sha = "ab".repeat(32);
        assert_eq!(
            VisionTowerSource::parse(&format!(
                "https://host/x/eva.pth#sha256={}",
                sha.to_uppercase()
            ))
            .unwrap(),
            VisionTowerSource::Url(UrlSource {
                url: "https://host/x/eva.pth".into(),
                sha256: Some(sha)
            })
        );
        assert!(VisionTowerSource::parse("https://host/eva.pth#md5=00").is_err());
        assert!(VisionTowerSource::parse("https://host/").is_err());
        assert_eq!(
            VisionTowerSource::parse("someone/eva-copy/weights/eva_vit_g.pth@main").unwrap(),
            VisionTowerSource::HubFile {
                repo: HubRepo::new("someone/eva-copy", Some("main".into())),
                path: "weights/eva_vit_g.pth".into()
            }
        );
        assert_eq!(
            VisionTowerSource::parse("someone/eva-copy/eva_vit_g.pth").unwrap(),
            VisionTowerSource::HubFile {
                repo: HubRepo::new("someone/eva-copy", None),
                path: "eva_vit_g.pth".into()
            }
        );
        for path in ["/x/eva.pth", "./a/b/c.pth", "eva.pth", "a/b", "a/b/../c"] {
            assert_eq!(
                VisionTowerSource::parse(path).unwrap(),
                VisionTowerSource::Local(PathBuf::from(path)),
                "{path}"
            );
        }
    }
}
