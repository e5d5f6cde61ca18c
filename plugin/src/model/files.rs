//! Finding the pieces of a deployment: the reference resolves `mm_vision_tower` and
//! `image_processor` from its working directory and fetches `bert-base-uncased` from a hub; we
//! look beside the model instead, and accept explicit paths.

use std::path::{Path, PathBuf};

use super::{ModelError, Result};

/// Where each file of a model comes from, resolved before anything heavy is read.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub model_dir: PathBuf,
    pub config: PathBuf,
    pub vision_tower: PathBuf,
    /// `preprocessor_config.json`, when one was found.
    pub preprocessor_config: Option<PathBuf>,
    pub bert_config: PathBuf,
    pub bert_vocab: PathBuf,
    /// `vision_config.json`, this project's optional file for the EVA head count and depth.
    pub vision_overrides: Option<PathBuf>,
}

/// Paths a relative path from `config.json` may mean: the model directory, its parent (the
/// layout of the reference repository, where the model sits in a sub-folder), and the
/// working directory (what the reference itself does).
fn candidates(model_dir: &Path, relative: &Path) -> Vec<PathBuf> {
    if relative.is_absolute() {
        return vec![relative.to_owned()];
    }
    let mut out = vec![model_dir.join(relative)];
    if let Some(parent) = model_dir.parent() {
        out.push(parent.join(relative));
    }
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join(relative));
    }
    out
}

fn tried(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ModelFiles {
    /// Resolves the files of the model in `model_dir`. `mm_vision_tower` and `image_processor`
    /// are the values from its `config.json`; `vision_tower` and `bert_dir` override them.
    pub fn resolve(
        model_dir: &Path,
        mm_vision_tower: &str,
        image_processor: Option<&str>,
        vision_tower: Option<&Path>,
        bert_dir: Option<&Path>,
    ) -> Result<Self> {
        let config = model_dir.join("config.json");

        let vision_tower = match vision_tower {
            Some(explicit) if explicit.is_dir() => explicit.join("eva_vit_g.pth"),
            Some(explicit) => explicit.to_owned(),
            None => {
                let paths = candidates(model_dir, Path::new(mm_vision_tower));
                match paths.iter().find(|p| p.is_file()) {
                    Some(found) => found.clone(),
                    None => {
                        return Err(ModelError::MissingFile {
                            what: "EVA vision tower weights (mm_vision_tower)",
                            path: PathBuf::from(mm_vision_tower),
                            hint: format!(
                                "looked at {}; put LAVIS eva_vit_g.pth there, or set \
                                 vision-tower to its path, to its URL ({}) to download it, or \
                                 to a hub file owner/name/path",
                                tried(&paths),
                                crate::hub::LAVIS_EVA_URL
                            ),
                        })
                    }
                }
            }
        };
        if !vision_tower.is_file() {
            return Err(ModelError::MissingFile {
                what: "EVA vision tower weights",
                path: vision_tower,
                hint: "the vision-tower path does not name a file".into(),
            });
        }

        let preprocessor_config = image_processor.and_then(|dir| {
            candidates(model_dir, Path::new(dir))
                .into_iter()
                .map(|d| d.join("preprocessor_config.json"))
                .find(|p| p.is_file())
        });

        let bert_dirs = match bert_dir {
            Some(dir) => vec![dir.to_owned()],
            None => candidates(model_dir, Path::new("bert-base-uncased")),
        };
        let Some(bert_dir) = bert_dirs.iter().find(|d| d.join("vocab.txt").is_file()) else {
            return Err(ModelError::MissingFile {
                what: "Q-Former tokenizer (bert-base-uncased vocab.txt)",
                path: bert_dirs[0].join("vocab.txt"),
                hint: format!(
                    "looked in {}; put a bert-base-uncased folder (config.json, vocab.txt) beside \
                     the model directory",
                    tried(&bert_dirs)
                ),
            });
        };
        let bert_config = bert_dir.join("config.json");
        if !bert_config.is_file() {
            return Err(ModelError::MissingFile {
                what: "Q-Former configuration (bert-base-uncased config.json)",
                path: bert_config,
                hint: "the bert-base-uncased folder needs its config.json beside vocab.txt".into(),
            });
        }

        let overrides = model_dir.join("vision_config.json");
        Ok(Self {
            model_dir: model_dir.to_owned(),
            config,
            vision_tower,
            preprocessor_config,
            bert_vocab: bert_dir.join("vocab.txt"),
            bert_config,
            vision_overrides: overrides.is_file().then_some(overrides),
        })
    }
}

/// Refuses a model directory holding an entry that could make loading read what the model's
/// author did not ship, or hang: a symbolic link leading out of the directory, or anything
/// that is not a regular file or folder (a FIFO, a socket, a device such as `/dev/zero`).
///
/// A link inside the directory is fine, and so is the layout of a Hugging Face hub cache
/// (`snapshots/{commit}/{file}` linking into the repository's `blobs/`). A whole model
/// directory that is itself a link is fine too: it is resolved first.
pub fn check_model_dir(model_dir: &Path) -> Result<()> {
    let root = model_dir
        .canonicalize()
        .map_err(|e| ModelError::io(model_dir, e))?;
    let blobs = hub_blobs_of(&root);
    let entries = std::fs::read_dir(&root).map_err(|e| ModelError::io(model_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io(model_dir, e))?;
        let path = entry.path();
        let link = entry
            .file_type()
            .map_err(|e| ModelError::io(&path, e))?
            .is_symlink();
        if link {
            // A dangling link is left to the reader that needs the file, if any does.
            let Ok(target) = path.canonicalize() else {
                continue;
            };
            let inside =
                target.starts_with(&root) || blobs.as_ref().is_some_and(|b| target.starts_with(b));
            if !inside {
                return Err(ModelError::bad_file(
                    &path,
                    format!(
                        "is a symbolic link to {}, outside the model directory; refused (copy \
                         the file into the directory, or link the whole directory instead)",
                        target.display()
                    ),
                ));
            }
        }
        let meta = std::fs::metadata(&path).map_err(|e| ModelError::io(&path, e))?;
        if !meta.is_file() && !meta.is_dir() {
            return Err(ModelError::bad_file(
                &path,
                "is neither a regular file nor a folder (a FIFO, socket or device); refused",
            ));
        }
    }
    Ok(())
}

/// `…/models--org--name/blobs` when `dir` is `…/models--org--name/snapshots/{commit}[/sub…]`.
fn hub_blobs_of(dir: &Path) -> Option<PathBuf> {
    let mut at = dir;
    while let Some(parent) = at.parent() {
        if parent.file_name().is_some_and(|n| n == "snapshots") {
            let repo = parent.parent()?;
            let blobs = repo.join("blobs");
            return blobs.is_dir().then_some(blobs);
        }
        at = parent;
    }
    None
}
