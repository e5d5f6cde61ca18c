//! Caption latency, local LLaMA vs the same language model on a vLLM server, in one run: the
//! caption step of `shared/bench/cpu-bench.json` (its prompt ids, a window of
//! `window_frames` × 2 tokens, `new_tokens` greedy tokens) on a model written by
//! `llamavid-random-model`, whose language model a vLLM server serves (`llamavid-export-llm`):
//!
//! ```text
//! cargo bench -p gst-plugin-llamavid --bench vllm_caption -- --model DIR \
//!     --llm-server http://127.0.0.1:8000 --llm-server-model NAME [--streams 1,2,4] \
//!     [--repeats 3] [--threads 2] [--shape FILE]
//! ```
//!
//! For each N: N streams caption at the same moment, locally (N threads on the one loaded
//! model, as N independent workers do) and through the server (N clients; vLLM batches them).
//! Reports the median over `--repeats` of the time until all N captions are ready, and
//! whether the greedy ids of both paths are equal. Not a test.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use gstllamavid::model::remote::{RemoteLanguageModel, ServerConfig};
use gstllamavid::model::{CaptionPrompt, GenerationParams, LlamaVid, LoadOptions};
use serde_json::Value;

const USAGE: &str = "usage: vllm_caption --model DIR --llm-server URL --llm-server-model NAME \
[--streams 1,2,4] [--repeats N] [--threads N] [--shape FILE]";

struct Args {
    model: PathBuf,
    server: ServerConfig,
    streams: Vec<usize>,
    repeats: usize,
    threads: usize,
    shape: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (mut model, mut url, mut name) = (None, None, None);
    let mut streams = vec![1, 2, 4];
    let (mut repeats, mut threads) = (3, 2);
    let mut shape = repo.join("../shared/bench/cpu-bench.json");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--llm-server" => url = Some(value()?),
            "--llm-server-model" => name = Some(value()?),
            "--streams" => {
                streams = value()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--streams: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--repeats" => repeats = value()?.parse().map_err(|e| format!("--repeats: {e}"))?,
            "--threads" => threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--shape" => shape = PathBuf::from(value()?),
            "--bench" => {}
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let mut server = ServerConfig::new(
        url.ok_or(format!("--llm-server is required\n{USAGE}"))?,
        name.ok_or(format!("--llm-server-model is required\n{USAGE}"))?,
    );
    server.api_key = ServerConfig::api_key_from_env();
    server.request_timeout = Duration::from_secs(600);
    Ok(Args {
        model: model.ok_or(format!("--model is required\n{USAGE}"))?,
        server,
        streams,
        repeats: repeats.max(1),
        threads: threads.max(1),
        shape,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `n` captions at once on `n` threads; the time until the last is ready, and their ids.
fn at_once(n: usize, caption: &(dyn Fn(usize) -> Vec<u32> + Sync)) -> (Duration, Vec<Vec<u32>>) {
    let started = Instant::now();
    let ids = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n).map(|i| scope.spawn(move || caption(i))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a caption thread"))
            .collect::<Vec<_>>()
    });
    (started.elapsed(), ids)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    // Candle's gemm and rayon read the thread count from here; set it before either starts.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let shape: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.shape)
            .map_err(|e| format!("{}: {e}", args.shape.display()))?,
    )
    .map_err(|e| e.to_string())?;
    let w = &shape["workload"];
    let ids = |key: &str| -> Vec<i64> {
        w[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default()
    };
    let frames = w["window_frames"].as_u64().unwrap_or(32) as usize;
    let new_tokens = w["decode"]["new_tokens"].as_u64().unwrap_or(32) as usize;
    let question = w["question"].as_str().unwrap_or("").to_owned();

    let started = Instant::now();
    let model = LlamaVid::load(&LoadOptions::new(&args.model)).map_err(|e| e.to_string())?;
    eprintln!("model loaded in {:.1?}", started.elapsed());
    let qformer_ids: Vec<u32> = ids("qformer_input_ids").iter().map(|&v| v as u32).collect();
    let prompt: CaptionPrompt = model
        .prompt_from_ids(&question, ids("llm_input_ids"), &qformer_ids)
        .map_err(|e| e.to_string())?;
    let hidden = model.llm().hidden_size();
    let rows = frames * model.tokens_per_frame();
    let values: Vec<f32> = (0..rows * hidden)
        .map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 * 0.04 - 0.02)
        .collect();
    let video =
        Tensor::from_vec(values, (rows, hidden), &Device::Cpu).map_err(|e| e.to_string())?;
    let params = GenerationParams {
        max_new_tokens: new_tokens,
        ..GenerationParams::default()
    };
    let most = args.streams.iter().copied().max().unwrap_or(1);
    let remotes: Vec<RemoteLanguageModel> = (0..most)
        .map(|_| RemoteLanguageModel::new(args.server.clone()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let model = Arc::new(model);
    let local = |_: usize| {
        model
            .caption(&video, &prompt, &params, None)
            .expect("local caption")
            .token_ids
    };
    let remote = |i: usize| {
        model
            .caption_remote(&video, &prompt, &params, &remotes[i], None)
            .expect("remote caption")
            .token_ids
    };
    // Warm-up: the server's first request after start is slow; the local path's first run
    // allocates.
    let reference = local(0);
    let through = remote(0);
    println!(
        "workload: {} prompt + {rows} window tokens, {new_tokens} greedy tokens; {} threads; server {} ({})",
        prompt.input_ids.len() - 1,
        args.threads,
        args.server.url,
        args.server.model
    );
    println!(
        "greedy ids equal local vs server: {} ({} tokens)",
        if reference == through { "yes" } else { "NO" },
        reference.len()
    );
    println!("streams | local: all ready (ms) | server: all ready (ms) | server/local");
    for &n in &args.streams {
        let mut local_times = Vec::new();
        let mut remote_times = Vec::new();
        for _ in 0..args.repeats {
            let (t, ids) = at_once(n, &local);
            assert!(ids.iter().all(|i| *i == reference));
            local_times.push(t);
            let (t, ids) = at_once(n, &remote);
            assert!(ids.iter().all(|i| *i == reference), "server ids differ");
            remote_times.push(t);
        }
        let (l, r) = (median(local_times), median(remote_times));
        println!(
            "{n:>7} | {:>21.1} | {:>22.1} | {:.2}",
            l.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            r.as_secs_f64() / l.as_secs_f64()
        );
    }
    Ok(())
}
