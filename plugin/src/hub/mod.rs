//! Models from the Hugging Face hub: `owner/name[@revision]` turned into local files, with the
//! two pieces a LLaMA-VID checkpoint points to elsewhere (the EVA-ViT-G weights and the
//! Q-Former's bert-base-uncased tokenizer). Knows no GStreamer and no candle: it hands the
//! loader paths.
//!
//! ```text
//! ModelRequest ─parse──► ModelSource / VisionTowerSource
//!      │ Hub::fetch_model
//!      ├─ model repo:  revision → commit (resolve) → which files (model_files) → cached? (plan)
//!      ├─ bert-base-uncased: config.json, vocab.txt
//!      ├─ EVA: as asked (path, URL, hub file), else from the repo, else the LAVIS URL
//!      ▼
//!  downloads (transfer: resume, size and sha256 checked, locked once per file) ─► FetchedModel
//! ```
//!
//! The hub protocol and cache layout come from the `hf-hub` crate (its blocking client for
//! revision info and file metadata, its cache types for the layout `huggingface_hub` uses, so
//! Python tools share the cache). The bytes are moved by [`transfer`], for hub files and URLs
//! alike, because the hub client neither checks what arrived nor bounds a stalled read.

mod config;
mod error;
mod model_files;
mod plan;
mod progress;
mod records;
mod repo;
mod resolve;
mod source;
mod transfer;

use std::path::PathBuf;

pub use config::{HubConfig, ASSETS_FOLDER, DEFAULT_ENDPOINT};
pub use error::{human_bytes, FetchError};
pub use progress::{FetchEvent, FetchObserver};
pub use source::{
    is_commit_hash, HubRepo, ModelSource, UrlSource, VisionTowerSource, BERT_REPO,
    DEFAULT_REVISION, LAVIS_EVA_URL,
};

use crate::model::WeightFormat;
use plan::{Need, Pending};
use records::Records;
use repo::Remote;
use resolve::BranchPolicy;

/// The Q-Former tokenizer's files in [`BERT_REPO`].
const BERT_FILES: [&str; 2] = ["config.json", "vocab.txt"];

/// What to fetch: the `model` and `vision-tower` settings, and which copy of the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRequest {
    pub model: ModelSource,
    /// `None`: for a local model, the loader looks beside it; for a hub model, the repository's
    /// own copy if it has one, else [`LAVIS_EVA_URL`].
    pub vision_tower: Option<VisionTowerSource>,
    pub weights: WeightFormat,
}

impl ModelRequest {
    pub fn parse(model: &str, vision_tower: Option<&str>) -> Result<Self, FetchError> {
        Ok(Self {
            model: ModelSource::parse(model)?,
            vision_tower: vision_tower
                .filter(|v| !v.trim().is_empty())
                .map(VisionTowerSource::parse)
                .transpose()?,
            weights: WeightFormat::Auto,
        })
    }

    /// Only local files: nothing to fetch, no network.
    pub fn is_local(&self) -> bool {
        matches!(self.model, ModelSource::Local(_))
            && matches!(self.vision_tower, None | Some(VisionTowerSource::Local(_)))
    }
}

/// Local paths of everything the loader reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedModel {
    /// The checkpoint directory (for a hub model, its snapshot in the cache).
    pub model_dir: PathBuf,
    /// The EVA weights; `None`: resolve `mm_vision_tower` beside the model directory.
    pub vision_tower: Option<PathBuf>,
    /// The folder with bert-base-uncased's `config.json` and `vocab.txt`; `None`: beside the
    /// model directory.
    pub bert_dir: Option<PathBuf>,
    /// A hub model's id pinned to the commit in use (`owner/name@<commit>`): naming that id
    /// makes later loads ask the network nothing.
    pub pinned: Option<HubRepo>,
}

/// The hub client and cache of one configuration.
pub struct Hub {
    config: HubConfig,
    remote: Remote,
    agent: ureq::Agent,
    records: Records,
}

impl Hub {
    pub fn new(config: HubConfig) -> Result<Self, FetchError> {
        Ok(Self {
            remote: Remote::new(&config)?,
            agent: transfer::agent(config.timeout),
            records: Records::new(&config.assets),
            config,
        })
    }

    /// The hub the environment describes (see [`HubConfig::from_env`]).
    pub fn from_env() -> Result<Self, FetchError> {
        Self::new(HubConfig::from_env())
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Brings every file of `request` into the cache (or finds it there) and says where each
    /// is. Downloads are announced to `observer` as one plan.
    pub fn fetch_model(
        &self,
        request: &ModelRequest,
        observer: &dyn FetchObserver,
    ) -> Result<FetchedModel, FetchError> {
        let mut pending = Vec::new();
        let mut fetched = match &request.model {
            ModelSource::Local(dir) => FetchedModel {
                model_dir: dir.clone(),
                vision_tower: None,
                bert_dir: None,
                pinned: None,
            },
            ModelSource::Hub(repo) => {
                let (state, selection, model_pending) =
                    model_files::model_repo(self, repo, request.weights, observer)?;
                pending.extend(model_pending);
                let bert = self.open_repo(
                    &HubRepo::new(BERT_REPO, None),
                    BranchPolicy::Cached,
                    observer,
                )?;
                for file in BERT_FILES {
                    if let Need::Fetch(p) = bert.need(file, observer)? {
                        pending.push(*p);
                    }
                }
                FetchedModel {
                    model_dir: state.snapshot(),
                    vision_tower: selection.eva.map(|file| state.path(&file)),
                    bert_dir: Some(bert.snapshot()),
                    pinned: Some(state.pinned.clone()),
                }
            }
        };
        let vision = match (&request.vision_tower, &request.model) {
            (Some(source), _) => Some(source.clone()),
            (None, ModelSource::Hub(_)) if fetched.vision_tower.is_none() => {
                Some(VisionTowerSource::lavis())
            }
            _ => None,
        };
        if let Some(source) = vision {
            let (path, download) = self.vision_tower(&source, observer)?;
            fetched.vision_tower = Some(path);
            pending.extend(download);
        }
        self.run(pending, true, observer)?;
        Ok(fetched)
    }

    /// One file named by a `vision-tower` value, fetched if need be.
    pub fn fetch_vision_tower(
        &self,
        source: &VisionTowerSource,
        observer: &dyn FetchObserver,
    ) -> Result<PathBuf, FetchError> {
        let (path, download) = self.vision_tower(source, observer)?;
        self.run(download.into_iter().collect(), true, observer)?;
        Ok(path)
    }

    /// Where the vision tower will be, and the download that puts it there if it is not yet.
    fn vision_tower(
        &self,
        source: &VisionTowerSource,
        observer: &dyn FetchObserver,
    ) -> Result<(PathBuf, Option<Pending>), FetchError> {
        let need = match source {
            VisionTowerSource::Local(path) => return Ok((path.clone(), None)),
            VisionTowerSource::Url(url) => self.need_url(url, observer)?,
            VisionTowerSource::HubFile { repo, path } => {
                let state = self.open_repo(repo, BranchPolicy::Check, observer)?;
                match state.need(path, observer)? {
                    Need::Ready(file) => Need::Ready(file),
                    Need::Fetch(p) => return Ok((state.path(path), Some(*p))),
                }
            }
        };
        Ok(match need {
            Need::Ready(path) => (path, None),
            Need::Fetch(p) => (p.dest.clone(), Some(*p)),
        })
    }
}
