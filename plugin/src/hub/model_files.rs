//! Which files of a LLaMA-VID repository the loader reads, so that nothing else (training
//! state, optimizer shards, a second copy of the weights) is downloaded.

use std::collections::BTreeSet;

use serde_json::Value;

use super::plan::{Need, Pending};
use super::progress::FetchObserver;
use super::repo::target;
use super::resolve::{BranchPolicy, RepoState};
use super::source::HubRepo;
use super::{FetchError, Hub};
use crate::model::WeightFormat;

/// Read when the repository has them; none is required.
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    // This project's convention for the EVA head count and depth (see the README).
    "vision_config.json",
];
/// At least one is required; `tokenizer.json` is preferred by the loader.
const TOKENIZERS: &[&str] = &["tokenizer.json", "tokenizer.model"];
const SAFETENSORS: [&str; 2] = ["model.safetensors.index.json", "model.safetensors"];
const PICKLES: [&str; 2] = ["pytorch_model.bin.index.json", "pytorch_model.bin"];

/// The files to have locally, in the order they are needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selection {
    pub files: Vec<String>,
    /// The EVA weights, when the repository ships them at `mm_vision_tower`.
    pub eva: Option<String>,
}

pub(crate) enum SelectError {
    /// The listing lacks a file the loader needs.
    Missing(String),
    Fetch(FetchError),
}

impl From<FetchError> for SelectError {
    fn from(e: FetchError) -> Self {
        SelectError::Fetch(e)
    }
}

/// A relative path from `config.json` as a repository path (`./a/b` → `a/b`).
fn repo_path(relative: &str) -> Option<String> {
    let path = relative.trim().trim_start_matches("./").trim_matches('/');
    (!path.is_empty() && !path.split('/').any(|p| p == ".." || p.is_empty()))
        .then(|| path.to_owned())
}

fn parse_json(target: &str, bytes: &[u8]) -> Result<Value, FetchError> {
    serde_json::from_slice(bytes).map_err(|e| FetchError::Protocol {
        target: target.to_owned(),
        url: String::new(),
        detail: format!("not valid JSON: {e}"),
    })
}

/// Picks the files from `listing`; `read` brings a small file (config, index) and returns its
/// bytes.
pub(crate) fn select(
    repo: &HubRepo,
    listing: &BTreeSet<String>,
    format: WeightFormat,
    read: &mut dyn FnMut(&str) -> Result<Vec<u8>, SelectError>,
) -> Result<Selection, SelectError> {
    let has = |f: &str| listing.contains(f);
    let mut files = Vec::new();
    if !has("config.json") {
        return Err(SelectError::Missing("config.json".into()));
    }
    files.push("config.json".to_owned());
    let tokenizers: Vec<String> = TOKENIZERS
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    if tokenizers.is_empty() {
        return Err(SelectError::Missing("tokenizer.model".into()));
    }
    files.extend(tokenizers);
    files.extend(OPTIONAL.iter().filter(|f| has(f)).map(|f| f.to_string()));

    let choices: Vec<&str> = match format {
        WeightFormat::Auto => SAFETENSORS.iter().chain(PICKLES.iter()).copied().collect(),
        WeightFormat::Safetensors => SAFETENSORS.to_vec(),
        WeightFormat::Pickle => PICKLES.to_vec(),
    };
    let Some(weights) = choices.iter().find(|f| has(f)) else {
        return Err(SelectError::Missing(choices[choices.len() - 2].to_owned()));
    };
    files.push(weights.to_string());
    if weights.ends_with(".index.json") {
        let index = parse_json(&target(repo, weights), &read(weights)?)?;
        let shards: BTreeSet<&str> = index
            .get("weight_map")
            .and_then(Value::as_object)
            .map(|map| map.values().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if shards.is_empty() {
            return Err(SelectError::Fetch(FetchError::Protocol {
                target: target(repo, weights),
                url: String::new(),
                detail: "no weight_map".into(),
            }));
        }
        for shard in shards {
            if !has(shard) {
                return Err(SelectError::Missing(shard.to_owned()));
            }
            files.push(shard.to_owned());
        }
    }

    // What config.json points to inside the repository, when the repository has it.
    let config = parse_json(&target(repo, "config.json"), &read("config.json")?)?;
    let field = |name: &str| config.get(name).and_then(Value::as_str).and_then(repo_path);
    let eva = field("mm_vision_tower").filter(|p| has(p));
    files.extend(eva.clone());
    if let Some(processor) = field("image_processor") {
        let preprocessor = format!("{processor}/preprocessor_config.json");
        if has(&preprocessor) {
            files.push(preprocessor);
        }
    }
    Ok(Selection { files, eva })
}

/// The model repository at its commit, the files it needs, and the downloads still to do.
pub(crate) fn model_repo<'h>(
    hub: &'h Hub,
    repo: &HubRepo,
    format: WeightFormat,
    observer: &dyn FetchObserver,
) -> Result<(RepoState<'h>, Selection, Vec<Pending>), FetchError> {
    let mut state = hub.open_repo(repo, BranchPolicy::Check, observer)?;
    if state.listing.is_none() {
        // Pinned, offline, or the hub is unreachable: the cache alone may be enough.
        let local = state.local_listing();
        let mut read_local = |file: &str| -> Result<Vec<u8>, SelectError> {
            if !state.is_cached(file, observer) {
                return Err(SelectError::Missing(file.to_owned()));
            }
            let path = state.path(file);
            std::fs::read(&path)
                .map_err(|e| SelectError::Fetch(FetchError::io(&target(repo, file), &path, e)))
        };
        let missing = match select(repo, &local, format, &mut read_local) {
            Ok(selection) => match selection
                .files
                .iter()
                .find(|f| !state.is_cached(f, observer))
            {
                None => return Ok((state, selection, Vec::new())),
                Some(file) => file.clone(),
            },
            Err(SelectError::Missing(file)) => file,
            Err(SelectError::Fetch(e)) => return Err(e),
        };
        if hub.config.offline {
            // Missing, or damaged: `need` tells which, in words.
            return Err(match state.need(&missing, observer) {
                Err(e) => e,
                Ok(_) => FetchError::Offline {
                    target: target(repo, &missing),
                    cache: state.path(&missing),
                },
            });
        }
        state.remote_listing()?;
    }
    let listing = state.listing.clone().unwrap_or_default();
    let mut read_remote = |file: &str| -> Result<Vec<u8>, SelectError> {
        let path = state.get_now(file, observer)?;
        std::fs::read(&path)
            .map_err(|e| SelectError::Fetch(FetchError::io(&target(repo, file), &path, e)))
    };
    let selection = select(repo, &listing, format, &mut read_remote).map_err(|e| match e {
        SelectError::Missing(file) => FetchError::BadSource(format!(
            "{repo} has no {file}: it is not a LLaMA-VID checkpoint in the release layout \
             (config.json, weights, tokenizer.model){}",
            match format {
                WeightFormat::Auto => "",
                _ => ", or not in the weight format asked for",
            }
        )),
        SelectError::Fetch(e) => e,
    })?;
    let mut pending = Vec::new();
    for file in &selection.files {
        if let Need::Fetch(p) = state.need(file, observer)? {
            pending.push(*p);
        }
    }
    Ok((state, selection, pending))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(files: &[&str]) -> BTreeSet<String> {
        files.iter().map(|f| f.to_string()).collect()
    }

    fn run(files: &[&str], format: WeightFormat, config: &str) -> Result<Selection, String> {
        let repo = HubRepo::new("o/n", None);
        let mut read = |file: &str| -> Result<Vec<u8>, SelectError> {
            Ok(match file {
                "config.json" => config.as_bytes().to_vec(),
                f if f.ends_with(".index.json") => br#"{"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin", "c": "pytorch_model-00001-of-00002.bin"}}"#.to_vec(),
                other => panic!("read {other}"),
            })
        };
        select(&repo, &listing(files), format, &mut read).map_err(|e| match e {
            SelectError::Missing(f) => format!("missing {f}"),
            SelectError::Fetch(e) => e.to_string(),
        })
    }

    /// The files of YanweiLi/llama-vid-7b-full-224-video-fps-1 as released.
    const RELEASE: &[&str] = &[
        ".gitattributes",
        "config.json",
        "generation_config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "trainer_state.json",
        "training_args.bin",
    ];

    #[test]
    fn a_release_needs_its_shards_and_tokenizer_only() {
        let config = r#"{"mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth", "image_processor": "./llamavid/processor/clip-patch14-224"}"#;
        let selection = run(RELEASE, WeightFormat::Auto, config).unwrap();
        assert_eq!(
            selection.files,
            [
                "config.json",
                "tokenizer.model",
                "generation_config.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "pytorch_model.bin.index.json",
                "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin",
            ]
        );
        assert_eq!(selection.eva, None, "the release does not ship EVA");
    }

    #[test]
    fn files_the_config_points_to_are_taken_from_the_repository() {
        let mut files = RELEASE.to_vec();
        files.extend([
            "model_zoo/LAVIS/eva_vit_g.pth",
            "llamavid/processor/clip-patch14-224/preprocessor_config.json",
        ]);
        let config = r#"{"mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth", "image_processor": "./llamavid/processor/clip-patch14-224"}"#;
        let selection = run(&files, WeightFormat::Auto, config).unwrap();
        assert_eq!(
            selection.eva.as_deref(),
            Some("model_zoo/LAVIS/eva_vit_g.pth")
        );
        assert!(selection
            .files
            .contains(&"llamavid/processor/clip-patch14-224/preprocessor_config.json".into()));
    }

    #[test]
    fn the_weight_format_chooses_one_copy() {
        let files = [
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        ];
        let auto = run(&files, WeightFormat::Auto, "{}").unwrap();
        assert!(auto.files.contains(&"model.safetensors".into()));
        assert!(!auto.files.iter().any(|f| f.ends_with(".bin")));
        let pickle = run(&files, WeightFormat::Pickle, "{}").unwrap();
        assert!(!pickle.files.contains(&"model.safetensors".into()));
        assert_eq!(
            pickle.files.iter().filter(|f| f.ends_with(".bin")).count(),
            2
        );
    }

    #[test]
    fn what_is_missing_is_named() {
        assert_eq!(
            run(&["tokenizer.model"], WeightFormat::Auto, "{}"),
            Err("missing config.json".into())
        );
        assert_eq!(
            run(
                &["config.json", "pytorch_model.bin"],
                WeightFormat::Auto,
                "{}"
            ),
            Err("missing tokenizer.model".into())
        );
        assert_eq!(
            run(
                &["config.json", "tokenizer.model"],
                WeightFormat::Auto,
                "{}"
            ),
            Err("missing pytorch_model.bin.index.json".into())
        );
        assert_eq!(
            run(
                &[
                    "config.json",
                    "tokenizer.model",
                    "pytorch_model.bin.index.json",
                    "pytorch_model-00001-of-00002.bin"
                ],
                WeightFormat::Auto,
                "{}"
            ),
            Err("missing pytorch_model-00002-of-00002.bin".into())
        );
    }
}
