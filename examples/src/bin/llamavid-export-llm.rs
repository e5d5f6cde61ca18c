//! Writes the language model of a LLaMA-VID checkpoint as a plain `LlamaForCausalLM`
//! directory for an LLM server, so that the server and the element (`llm-server`) use the same
//! weights:
//!
//! ```text
//! llamavid-export-llm --model LLAMAVID_DIR --out DIR [--dtype keep|f32|bf16|f16]
//!                     [--weights auto|bin|safetensors] [--shard-gb 5]
//! python -m vllm.entrypoints.openai.api_server --model DIR --enable-prompt-embeds ...
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use gstllamavid::model::WeightFormat;
use llamavid_examples::export_llm::{export_language_model, ExportOptions};

const USAGE: &str = "usage: llamavid-export-llm --model LLAMAVID_DIR --out DIR \
[--dtype keep|f32|bf16|f16] [--weights auto|bin|safetensors] [--shard-gb GB]";

fn parse_args() -> Result<ExportOptions> {
    let mut model = None;
    let mut out = None;
    let mut dtype = None;
    let mut weights = WeightFormat::Auto;
    let mut shard_gb = 5.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "keep" => None,
                    "f32" | "float32" => Some(DType::F32),
                    "bf16" | "bfloat16" => Some(DType::BF16),
                    "f16" | "float16" => Some(DType::F16),
                    other => bail!("unknown --dtype {other}\n{USAGE}"),
                }
            }
            "--weights" => {
                weights = value()?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--weights: {e}\n{USAGE}"))?
            }
            "--shard-gb" => shard_gb = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let mut options = ExportOptions::new(
        model.with_context(|| format!("--model is required\n{USAGE}"))?,
        out.with_context(|| format!("--out is required\n{USAGE}"))?,
    );
    options.dtype = dtype;
    options.weight_format = weights;
    options.shard_bytes = (shard_gb * 1e9) as u64;
    Ok(options)
}

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn run() -> Result<()> {
    let options = parse_args()?;
    if options.out_dir.join("config.json").exists()
        && std::fs::canonicalize(&options.out_dir)? == std::fs::canonicalize(&options.model_dir)?
    {
        bail!("--out must not be the LLaMA-VID directory itself");
    }
    let started = Instant::now();
    let summary = export_language_model(&options)?;
    println!(
        "exported {} language-model tensors ({:.2} GB) to {} in {:.1} s",
        summary.tensors,
        summary.bytes as f64 / 1e9,
        options.out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
