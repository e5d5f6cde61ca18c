//! Writes the language model of a LLaMA-VID checkpoint as a llama.cpp GGUF file, quantized
//! (candle's quantizers and GGUF writer); the element and `llamavid-caption` then take it with
//! `llm-gguf=FILE` / `--llm-gguf FILE`, and llama.cpp loads it too.
//!
//! ```text
//! llamavid-export-gguf --model DIR --out FILE.gguf [--type q4_k|q8_0|...] [--output-type T]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gstllamavid::model::gguf::export::{export_llm, parse_type, ExportOptions, EXPORT_TYPES};

fn usage() -> String {
    format!(
        "usage: llamavid-export-gguf --model DIR --out FILE.gguf [--type T] [--output-type T]\n\
         types: {EXPORT_TYPES} (default q4_k; the output layer defaults to q6_k for 4/5-bit K types, q8_0 for the others)"
    )
}

fn main() -> Result<()> {
    let mut model = None;
    let mut out = None;
    let mut options = ExportOptions {
        weight_type: parse_type("q4_k").map_err(anyhow::Error::msg)?,
        output_type: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{}", usage()))
        };
        match arg.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--type" => options.weight_type = parse_type(&value()?).map_err(anyhow::Error::msg)?,
            "--output-type" => {
                options.output_type = Some(parse_type(&value()?).map_err(anyhow::Error::msg)?)
            }
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other}\n{}", usage()),
        }
    }
    let model = model.with_context(|| format!("--model is required\n{}", usage()))?;
    let out = out.with_context(|| format!("--out is required\n{}", usage()))?;
    let started = Instant::now();
    let report = export_llm(&model, &out, &options)?;
    println!(
        "{}: {} tensors, {:.1} MB, {:?} in {:.1} s",
        out.display(),
        report.tensors,
        report.bytes as f64 / 1e6,
        options.weight_type,
        started.elapsed().as_secs_f64()
    );
    for (name, t) in &report.fallbacks {
        println!(
            "  {name}: {t:?} (its columns do not split into {:?} blocks)",
            options.weight_type
        );
    }
    Ok(())
}
