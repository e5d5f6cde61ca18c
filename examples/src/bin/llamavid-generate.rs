//! Runs a GGUF language model alone on given token ids and prints one JSON object: the greedy
//! continuation (`ids`), and with `--logits` the prefill's last-position logits, so that anyone
//! can hold our decoder against llama.cpp or another implementation on the same ids.
//!
//! ```text
//! llamavid-generate --gguf FILE --ids 1,2,3 --max-new-tokens N [--threads T] [--logits]
//!                   [--cpu-isa best|avx512|avx2|portable]
//! ```
//!
//! Exactly N ids are generated (EOS does not stop it, like llama.cpp's `ignore_eos`); ties go
//! to the lowest id.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gstllamavid::model::gguf::{cpu_context, GgufLlama};
use gstllamavid::model::llama::greedy_continuation;
use gstllamavid::model::pool::ComputePool;
use gstllamavid::model::IsaLimit;

const USAGE: &str = "usage: llamavid-generate --gguf FILE --ids 1,2,3 --max-new-tokens N \
[--threads T] [--logits] [--cpu-isa best|avx512|avx2|portable]";

fn main() -> Result<()> {
    let mut gguf = None;
    let mut ids: Option<Vec<u32>> = None;
    let mut max_new = 16usize;
    let mut threads = None;
    let mut want_logits = false;
    let mut cpu_isa = IsaLimit::Best;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--gguf" => gguf = Some(PathBuf::from(value()?)),
            "--ids" => {
                let list = value()?;
                ids = Some(
                    list.split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| s.trim().parse::<u32>())
                        .collect::<std::result::Result<_, _>>()
                        .with_context(|| format!("--ids {list:?}: expected ids like 1,2,3"))?,
                )
            }
            "--max-new-tokens" => max_new = value()?.parse()?,
            "--threads" => threads = Some(value()?.parse::<usize>()?),
            "--logits" => want_logits = true,
            "--cpu-isa" => cpu_isa = value()?.parse().map_err(anyhow::Error::msg)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let gguf = gguf.with_context(|| format!("--gguf is required\n{USAGE}"))?;
    let ids = ids.with_context(|| format!("--ids is required\n{USAGE}"))?;
    if let Some(t) = threads {
        // candle's quantized products run in a pool of their own, sized from this variable
        // when first used; our kernels and candle's other ops run in the rayon pool below.
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    }
    // The model's own pool, as the element gives it one (all of its compute runs there).
    let pool = ComputePool::new(threads, false)?;
    pool.install(|| -> Result<()> {
        let started = Instant::now();
        let file = GgufLlama::open(&gguf)?;
        let vocab = file.config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("--ids: id {bad} is outside the vocabulary of {vocab}");
        }
        let llm = file.load(&cpu_context(cpu_isa), &candle_core::Device::Cpu)?;
        let loaded = started.elapsed();
        let started = Instant::now();
        let (new_ids, rows) = greedy_continuation(&llm, &ids, max_new)?;
        let mut out = serde_json::json!({
            "ids": new_ids,
            "load_s": loaded.as_secs_f64(),
            "generate_s": started.elapsed().as_secs_f64(),
        });
        if want_logits {
            let first = match rows.first() {
                Some(row) => row.clone(),
                None => {
                    let (_, rows) = greedy_continuation(&llm, &ids, 1)?;
                    rows.into_iter().next().unwrap_or_default()
                }
            };
            out["logits"] = serde_json::json!(first);
        }
        println!("{out}");
        Ok(())
    })
}
