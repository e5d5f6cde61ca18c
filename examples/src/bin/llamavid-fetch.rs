//! Fetches a LLaMA-VID model (a hub id, or a local directory whose EVA file is a URL or a hub
//! file) into the Hugging Face cache with a progress bar, as the element would fetch it, and
//! prints where everything is, one `key=value` line each, for scripts:
//!
//! ```text
//! llamavid-fetch [--vision-tower PATH|URL|owner/name/path] [--weights auto|bin|safetensors] MODEL
//!
//! model=owner/name@<commit>        the value for the element's `model`: pinned, so that loading
//!                                  it asks the network nothing (a local directory stays as given)
//! model-dir=/…/snapshots/<commit>  the checkpoint directory
//! vision-tower=/…/eva_vit_g.pth    the value for `vision-tower` (empty: beside the model)
//! bert-dir=/…                      bert-base-uncased (empty: beside the model)
//! weights-bytes=N                  bytes of the weight files (the model's and EVA's)
//! ```
//!
//! Environment: HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE (see the README).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gstllamavid::model::WeightFormat;
use llamavid_examples::progress::fetch_model;

const USAGE: &str = "usage: llamavid-fetch [--vision-tower PATH|URL|owner/name/path] \
[--weights auto|bin|safetensors] MODEL";

fn main() {
    llamavid_examples::exit_on_error(run());
}

/// Bytes of the weight files in `dir` (what a load reads), following the cache's links.
fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "bin" || e == "safetensors" || e == "pth")
        })
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn run() -> Result<()> {
    let mut model = None;
    let mut vision_tower = None;
    let mut weights = WeightFormat::Auto;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--vision-tower" => vision_tower = Some(value()?),
            "--weights" => {
                weights = value()?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--weights: {e}\n{USAGE}"))?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other if other.starts_with('-') => bail!("unknown option {other}\n{USAGE}"),
            other => model = Some(other.to_owned()),
        }
    }
    let model = model.with_context(|| format!("a model is required\n{USAGE}"))?;
    let fetched = fetch_model(&model, vision_tower.as_deref(), weights)?;
    let shown = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let eva_bytes = fetched
        .vision_tower
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let model_value = fetched
        .pinned
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| model.clone());
    println!("model={model_value}");
    println!("model-dir={}", fetched.model_dir.display());
    println!("vision-tower={}", shown(&fetched.vision_tower));
    println!("bert-dir={}", shown(&fetched.bert_dir));
    println!(
        "weights-bytes={}",
        weight_bytes(&fetched.model_dir) + eva_bytes
    );
    Ok(())
}
