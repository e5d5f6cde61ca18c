//! CPU benchmark at real size: the workload of `shared/bench/cpu-bench.json` (EVA-ViT-G and
//! Q-Former at their real dimensions, a 1.26B LLaMA, a 32-frame window, the file's token ids,
//! greedy decoding of 32 tokens ignoring EOS) on a random-weight model written by
//! `llamavid-random-model` and loaded with `LlamaVid::load` as users' models are.
//!
//! ```text
//! cargo run --release -p llamavid-examples --bin llamavid-random-model -- \
//!     --shape ../shared/bench/cpu-bench.json --out bench-models/cpu-bench-f32
//! cargo bench -p gst-plugin-llamavid --bench cpu_bench -- \
//!     --model bench-models/cpu-bench-f32 --dtype f32 [--json out.json]
//! ```
//!
//! Every figure is the median of `--repeats` (5) runs after one warm-up run, on `--threads`
//! (2) threads. Not a test: it prints a table (and writes it as JSON with `--json`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use gstllamavid::model::llama::{LogitsFor, SequenceStep};
use gstllamavid::model::{
    Cancel, CaptionPrompt, IsaLimit, LlamaVid, LoadOptions, Precision, WeightFormat,
};
use llamavid_kernels::cpu::{CpuFeatures, CpuKernels, CpuLinear, Isa, WeightType};
use serde_json::{json, Value};

const USAGE: &str = "usage: cpu_bench --model DIR [--dtype f32|bf16|int8|auto] [--shape FILE] \
[--repeats N] [--threads N] [--isa best|avx512|avx2|portable] [--stages] [--json FILE]
       [--only encode,encode1,encode8,caption,batch,baseline] [--skip-baseline]
       cpu_bench --accuracy [--fixture DIR] [--json FILE]   (errors of every precision per stage)";

struct Args {
    model: PathBuf,
    precision: Precision,
    shape: PathBuf,
    repeats: usize,
    threads: usize,
    /// The most the CPU kernels may use (to measure the AVX2 or portable paths here).
    isa: IsaLimit,
    /// Time the fused vision blocks per stage.
    stages: bool,
    json: Option<PathBuf>,
    only: Option<Vec<String>>,
    /// Accuracy mode: errors per stage on this fixture instead of timings.
    accuracy: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut model = None;
    let mut precision = Precision::F32;
    let mut shape = repo.join("../shared/bench/cpu-bench.json");
    let mut repeats = 5;
    let mut threads = 2;
    let mut isa = IsaLimit::Best;
    let mut stages = false;
    let mut json = None;
    let mut only: Option<Vec<String>> = None;
    let mut accuracy = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--dtype" | "--precision" => precision = value()?.parse()?,
            "--shape" => shape = PathBuf::from(value()?),
            "--repeats" => repeats = value()?.parse().map_err(|e| format!("--repeats: {e}"))?,
            "--threads" => threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--isa" => isa = value()?.parse()?,
            "--stages" => stages = true,
            "--json" => json = Some(PathBuf::from(value()?)),
            "--only" => only = Some(value()?.split(',').map(str::to_owned).collect()),
            "--accuracy" => accuracy = Some(repo.join("../shared/fixtures/llamavid-tiny-a")),
            "--fixture" => accuracy = Some(PathBuf::from(value()?)),
            "--skip-baseline" => {
                only = Some(vec![
                    "encode".into(),
                    "caption".into(),
                    "batch".into(),
                    "load".into(),
                ])
            }
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if accuracy.is_some() && model.is_none() {
        model = Some(PathBuf::new());
    }
    Ok(Args {
        model: model.ok_or(format!("--model is required\n{USAGE}"))?,
        precision,
        shape,
        repeats: repeats.max(1),
        threads: threads.max(1),
        isa,
        stages,
        json,
        only,
        accuracy,
    })
}

/// The HF model directory: `dir` itself, or its single subdirectory holding a config.json.
fn model_dir(dir: &Path) -> Result<PathBuf, String> {
    if dir.join("config.json").is_file() {
        return Ok(dir.to_owned());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("config.json").is_file() && p.join("vision_config.json").exists())
        .or_else(|| {
            std::fs::read_dir(dir)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.join("config.json").is_file())
        })
        .ok_or(format!("{} holds no model directory", dir.display()))
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds used by every process (from /proc/stat) and by this one (getrusage-like, from
/// /proc/self/stat): their difference over a run is what other processes took meanwhile.
fn cpu_seconds() -> (f64, f64) {
    let tick = 100.0; // USER_HZ on Linux
    let total = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            let v: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
            Some(
                v.iter().sum::<f64>()
                    - v.get(3).copied().unwrap_or(0.0)
                    - v.get(4).copied().unwrap_or(0.0),
            )
        })
        .unwrap_or(0.0);
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<f64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // Fields after the command: state(skipped as non-number) ... utime is field 14.
            Some(f.get(10)? + f.get(11)?)
        })
        .unwrap_or(0.0);
    (total / tick, own / tick)
}

fn gib(kib: u64) -> f64 {
    kib as f64 / (1024.0 * 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `f` once to warm up, then `repeats` times; returns the median of each of its
/// reported durations (seconds).
fn measure<const N: usize>(
    repeats: usize,
    mut f: impl FnMut() -> candle_core::Result<[f64; N]>,
) -> candle_core::Result<[f64; N]> {
    f()?;
    let mut samples: Vec<[f64; N]> = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        samples.push(f()?);
    }
    let mut out = [0.0; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = median(samples.iter().map(|s| s[i]).collect());
    }
    Ok(out)
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

struct Workload {
    llm_ids: Vec<i64>,
    qformer_ids: Vec<u32>,
    question: String,
    window_frames: usize,
    tokens_per_frame: usize,
    new_tokens: usize,
    baseline_frames: usize,
    baseline_tokens_per_frame: usize,
}

fn workload(shape: &Value) -> Result<Workload, String> {
    let w = &shape["workload"];
    let ids = |key: &str| -> Result<Vec<i64>, String> {
        w[key]
            .as_array()
            .ok_or(format!("workload.{key} missing"))?
            .iter()
            .map(|v| v.as_i64().ok_or(format!("workload.{key}: not an integer")))
            .collect()
    };
    let n = |v: &Value, what: &str| {
        v.as_u64()
            .map(|x| x as usize)
            .ok_or(format!("{what} missing"))
    };
    Ok(Workload {
        llm_ids: ids("llm_input_ids")?,
        qformer_ids: ids("qformer_input_ids")?
            .into_iter()
            .map(|v| v as u32)
            .collect(),
        question: w["question"].as_str().unwrap_or("").to_owned(),
        window_frames: n(&w["window_frames"], "workload.window_frames")?,
        tokens_per_frame: n(&w["tokens_per_frame"], "workload.tokens_per_frame")?,
        new_tokens: n(&w["decode"]["new_tokens"], "workload.decode.new_tokens")?,
        baseline_frames: n(&w["baseline_full_tokens"]["frames"], "baseline frames")?,
        baseline_tokens_per_frame: n(
            &w["baseline_full_tokens"]["tokens_per_frame"],
            "baseline tokens_per_frame",
        )?,
    })
}

fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()
}

/// Prefill then greedy decoding of `new_tokens` tokens, EOS ignored (the benchmark's rule):
/// token 1 from the prefill logits, tokens 2.. from single-token forwards with the KV cache.
/// Returns (prefill s, decode s per token, total s).
fn caption(model: &LlamaVid, embeds: &Tensor, new_tokens: usize) -> candle_core::Result<[f64; 3]> {
    let llm = model.llm();
    let start = Instant::now();
    let mut cache = llm.new_cache(embeds.dim(1)? + new_tokens);
    let logits = llm.forward(embeds, &mut cache, LogitsFor::LastPosition, None)?;
    let mut token = argmax(&logits)?;
    let prefill = secs(start);
    let decode_start = Instant::now();
    for _ in 1..new_tokens {
        let next = llm.embed(&[token])?;
        let logits = llm.forward(&next, &mut cache, LogitsFor::LastPosition, None)?;
        token = argmax(&logits)?;
    }
    let decode = secs(decode_start);
    Ok([
        prefill,
        decode / (new_tokens - 1).max(1) as f64,
        secs(start),
    ])
}

/// Decode steps of `batch` sequences advanced together (one forward, `batch` rows: the weight
/// read shared), after one batched prefill; the median time of one step. EOS is ignored, as
/// in `caption`.
fn decode_batch(
    model: &LlamaVid,
    embeds: &Tensor,
    batch: usize,
    steps: usize,
) -> candle_core::Result<[f64; 1]> {
    let llm = model.llm();
    let capacity = embeds.dim(1)? + steps + 1;
    let mut caches: Vec<_> = (0..batch).map(|_| llm.new_cache(capacity)).collect();
    let mut inputs = vec![embeds.clone(); batch];
    let mut times = Vec::with_capacity(steps);
    for step in 0..=steps {
        let start = Instant::now();
        let mut batch_steps: Vec<SequenceStep> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(embeddings, cache)| SequenceStep { embeddings, cache })
            .collect();
        let logits = llm.forward_batch(&mut batch_steps, LogitsFor::LastPosition, Cancel::NEVER)?;
        let tokens = logits
            .iter()
            .map(argmax)
            .collect::<candle_core::Result<Vec<u32>>>()?;
        let next = llm.embed(&tokens)?;
        inputs = (0..batch)
            .map(|i| next.narrow(1, i, 1))
            .collect::<candle_core::Result<_>>()?;
        if step > 0 {
            times.push(secs(start));
        }
    }
    Ok([median(times)])
}

fn prefill_only(model: &LlamaVid, embeds: &Tensor) -> candle_core::Result<[f64; 1]> {
    let llm = model.llm();
    let start = Instant::now();
    let mut cache = llm.new_cache(embeds.dim(1)?);
    let logits = llm.forward(embeds, &mut cache, LogitsFor::LastPosition, None)?;
    argmax(&logits)?;
    Ok([secs(start)])
}

/// One frame batch through the encoder, timed by stage: vision tower, Q-Former (with its
/// input norm), the rest (projections, context attention, pooling, mm_projector).
fn encode_stages(
    model: &LlamaVid,
    prompt: &CaptionPrompt,
    pixels: &Tensor,
) -> candle_core::Result<[f64; 4]> {
    let tg = model.token_generator();
    let start = Instant::now();
    let features = model.vision().forward(pixels)?;
    let vision = secs(start);
    let t = Instant::now();
    let visual_input = tg.qformer_visual_input(&features)?;
    let qformer_out = tg.qformer_output(&prompt.guidance, &visual_input)?;
    let qformer = secs(t);
    let t = Instant::now();
    let text_queries = tg.text_queries(&qformer_out)?;
    let patches = tg.patches(&features)?;
    let attention = tg.context_attention(&text_queries, &tg.context_keys(&patches)?)?;
    let context = tg.context_tokens(&tg.context_pooled(&attention, &patches)?)?;
    let content = tg.content_tokens(&tg.content_pooled(&patches)?)?;
    let tokens = Tensor::cat(&[&context.unsqueeze(1)?, &content], 1)?;
    let _ = tokens.sum_all()?.to_scalar::<f32>()?;
    let rest = secs(t);
    Ok([secs(start), vision, qformer, rest])
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    // The model runs in its own pool of `--threads` threads; candle's gemm reads its task
    // count from here (as the baseline runs did), set before it starts.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    if let Some(fixture) = &args.accuracy {
        return accuracy(fixture, args.json.as_deref());
    }
    let e = |e: candle_core::Error| e.to_string();
    let shape: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.shape)
            .map_err(|e| format!("{}: {e}", args.shape.display()))?,
    )
    .map_err(|e| e.to_string())?;
    let work = workload(&shape)?;
    let dir = model_dir(&args.model)?;
    let wants = |what: &str| {
        args.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == what))
    };

    // The machine's speed right now, before and after the run: these machines are shared, and
    // the reference figures were taken on an idle one (2048³ bf16 in 12.4 ms on 2 threads).
    let speed_at_start = machine_speed(args.threads);
    let cpu_at_start = cpu_seconds();
    let wall_start = Instant::now();
    let rss_before = proc_status_kib("VmRSS:").unwrap_or(0);
    let mut options = LoadOptions::new(&dir);
    options.weight_format = WeightFormat::Pickle;
    options.precision = args.precision;
    options.threads = Some(args.threads);
    options.cpu_isa = args.isa;
    options.profile = args.stages;
    // Measured at the priority the baseline ran at: a deprioritised pool would lose to the
    // other processes of a shared machine and blur the comparison.
    options.lower_thread_priority = false;
    let t = Instant::now();
    let model = LlamaVid::load(&options).map_err(|e| e.to_string())?;
    let load_s = secs(t);
    let rss_after_load = proc_status_kib("VmRSS:").unwrap_or(0);
    let hwm_after_load = proc_status_kib("VmHWM:").unwrap_or(0);
    let cpu = CpuFeatures::detect();
    println!(
        "model {} | precision requested {} -> {} | mkl {} | threads: model pool {}, candle gemm {}",
        dir.display(),
        args.precision,
        model.precision(),
        llamavid_kernels::cpu::HAS_MKL,
        model.pool().threads(),
        candle_core::utils::get_num_threads()
    );
    println!("CPU features: {}", cpu.describe());
    println!("compute: {}", model.compute());
    for line in model.product_paths() {
        println!("product path: {line}");
    }
    for note in model.notes() {
        println!("note: {note}");
    }
    println!(
        "load {:.2} s, RSS after load {:.2} GiB (before {:.2} GiB)",
        load_s,
        gib(rss_after_load),
        gib(rss_before)
    );

    take_profile(&model);
    let prompt = model
        .prompt_from_ids(&work.question, work.llm_ids.clone(), &work.qformer_ids)
        .map_err(|e| e.to_string())?;
    let size = model.vision().config().image_size();
    let hidden = model.llm().hidden_size();
    let pixels = |b: usize| Tensor::randn(0f32, 1.0, (b, 3, size, size), &Device::Cpu);
    let mut results = serde_json::Map::new();
    let mut table: Vec<(String, f64, &str)> = Vec::new();
    table.push(("model load".into(), load_s, "s"));

    if wants("encode") || wants("encode1") {
        let one = pixels(1).map_err(e)?;
        let [enc1] = measure(args.repeats, || {
            let t = Instant::now();
            let tokens = model
                .encode_pixels(&one, &prompt)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            tokens.sum_all()?.to_scalar::<f32>()?;
            Ok([secs(t)])
        })
        .map_err(e)?;
        table.push(("encode 1 frame".into(), enc1, "s"));
        stage_profile(&model, &mut table, (1 + args.repeats) as f64);
        results.insert("encode_one_frame_s".into(), json!(enc1));
    }
    if wants("encode") || wants("encode8") {
        let eight = pixels(8).map_err(e)?;
        let [total, vision, qformer, rest] = model
            .install(|| measure(args.repeats, || encode_stages(&model, &prompt, &eight)))
            .map_err(e)?;
        table.push(("encode per frame, batch 8".into(), total / 8.0, "s"));
        table.push(("  vision tower".into(), vision / 8.0, "s"));
        table.push(("  Q-Former".into(), qformer / 8.0, "s"));
        table.push(("  rest (projections, pooling)".into(), rest / 8.0, "s"));
        stage_profile(&model, &mut table, 8.0 * (1 + args.repeats) as f64);
        results.insert(
            "encode_batch8".into(),
            json!({"batch8_per_frame_s": total / 8.0,
                   "batch8_vision_per_frame_s": vision / 8.0,
                   "batch8_qformer_per_frame_s": qformer / 8.0,
                   "batch8_rest_per_frame_s": rest / 8.0}),
        );
    }

    if wants("caption") {
        let rows = work.window_frames * work.tokens_per_frame;
        let video = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).map_err(e)?;
        let embeds = model
            .input_embeddings(&prompt, &video)
            .map_err(|e| e.to_string())?;
        let len = embeds.dim(1).map_err(e)?;
        let [prefill, per_token, total] = model
            .install(|| measure(args.repeats, || caption(&model, &embeds, work.new_tokens)))
            .map_err(e)?;
        table.push((format!("caption prefill ({len} tokens)"), prefill, "s"));
        table.push(("decode per token".into(), per_token, "s"));
        table.push((
            format!("{}-token caption total", work.new_tokens),
            total,
            "s",
        ));
        results.insert(
            "caption".into(),
            json!({"prefill_len": len, "prefill_s": prefill, "decode_per_token_s": per_token,
                   "new_tokens": work.new_tokens, "total_s": total}),
        );
    }

    if wants("batch") {
        // Decode steps of 1 and 4 sequences at once over the caption's context: the weights
        // are read once per step for all rows (issue 10's shared weight read).
        let rows = work.window_frames * work.tokens_per_frame;
        let video = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).map_err(e)?;
        let embeds = model
            .input_embeddings(&prompt, &video)
            .map_err(|e| e.to_string())?;
        let steps = work.new_tokens.min(16);
        let [one] = model
            .install(|| measure(args.repeats, || decode_batch(&model, &embeds, 1, steps)))
            .map_err(e)?;
        let [four] = model
            .install(|| measure(args.repeats, || decode_batch(&model, &embeds, 4, steps)))
            .map_err(e)?;
        table.push(("decode step, batch 1".into(), one, "s"));
        table.push(("decode step, batch 4".into(), four, "s"));
        table.push(("  per token at batch 4".into(), four / 4.0, "s"));
        table.push((
            "  tokens/s batch 4 vs batch 1".into(),
            4.0 * one / four,
            "x",
        ));
        results.insert(
            "decode_batch".into(),
            json!({"steps": steps, "batch1_step_s": one, "batch4_step_s": four,
                   "speedup": 4.0 * one / four}),
        );
    }

    if wants("baseline") {
        let frames = work.baseline_frames;
        let full_rows = frames * work.baseline_tokens_per_frame;
        let full = Tensor::randn(0f32, 1.0, (full_rows, hidden), &Device::Cpu).map_err(e)?;
        let full = model
            .input_embeddings(&prompt, &full)
            .map_err(|e| e.to_string())?;
        let ours = Tensor::randn(
            0f32,
            1.0,
            (frames * work.tokens_per_frame, hidden),
            &Device::Cpu,
        )
        .map_err(e)?;
        let ours = model
            .input_embeddings(&prompt, &ours)
            .map_err(|e| e.to_string())?;
        let (full_len, ours_len) = (full.dim(1).map_err(e)?, ours.dim(1).map_err(e)?);
        let [full_s] = model
            .install(|| measure(args.repeats, || prefill_only(&model, &full)))
            .map_err(e)?;
        let [ours_s] = model
            .install(|| measure(args.repeats, || prefill_only(&model, &ours)))
            .map_err(e)?;
        table.push((
            format!(
                "prefill {frames} frames x {} tok ({full_len})",
                work.baseline_tokens_per_frame
            ),
            full_s,
            "s",
        ));
        table.push((
            format!(
                "prefill {frames} frames x {} tok ({ours_len})",
                work.tokens_per_frame
            ),
            ours_s,
            "s",
        ));
        table.push(("  ratio".into(), full_s / ours_s, "x"));
        results.insert(
            "baseline_prefill".into(),
            json!({"frames": frames, "full_len": full_len, "full_s": full_s,
                   "llamavid_len": ours_len, "llamavid_s": ours_s, "ratio": full_s / ours_s}),
        );
    }

    let hwm = proc_status_kib("VmHWM:").unwrap_or(0);
    let cpu_at_end = cpu_seconds();
    let wall = secs(wall_start);
    let own_cpu = cpu_at_end.1 - cpu_at_start.1;
    let foreign_cpu = (cpu_at_end.0 - cpu_at_start.0) - own_cpu;
    println!(
        "\nCPU use over the run ({wall:.0} s wall): this process {:.2} cores, other processes {:.2} \
         cores (anything above ~0.05 means the figures are disturbed)",
        own_cpu / wall,
        foreign_cpu.max(0.0) / wall
    );
    let speed_at_end = machine_speed(args.threads);
    for (when, [f32_ms, bf16_ms, gbps]) in [("start", speed_at_start), ("end", speed_at_end)] {
        println!(
            "machine speed at the {when}: 2048³ products f32 {f32_ms:.1} ms ({:.0} GFLOP/s), \
             bf16 {bf16_ms:.1} ms ({:.0} GFLOP/s; reference machine 12.4 ms), memory read {gbps:.1} GB/s",
            GEMM_FLOP / f32_ms * 1e-6,
            GEMM_FLOP / bf16_ms * 1e-6,
        );
        results.insert(
            format!("machine_speed_{when}"),
            json!({"f32_2048_ms": f32_ms, "bf16_2048_ms": bf16_ms, "read_gb_per_s": gbps}),
        );
    }
    results.insert("own_cpu_cores".into(), json!(own_cpu / wall));
    results.insert(
        "foreign_cpu_cores".into(),
        json!(foreign_cpu.max(0.0) / wall),
    );
    table.push(("peak resident memory".into(), gib(hwm), "GiB"));
    table.push(("  after load".into(), gib(hwm_after_load), "GiB"));

    println!();
    println!(
        "{:<36} {:>10}   (precision {}, {} threads, median of {} after 1 warm-up)",
        "figure",
        "value",
        model.precision(),
        args.threads,
        args.repeats
    );
    for (name, value, unit) in &table {
        println!("{name:<36} {value:>10.3} {unit}");
    }

    if let Some(path) = &args.json {
        results.insert("precision_requested".into(), json!(args.precision.as_str()));
        results.insert("precision".into(), json!(model.precision().as_str()));
        results.insert("threads".into(), json!(args.threads));
        results.insert("repeats".into(), json!(args.repeats));
        results.insert("load_s".into(), json!(load_s));
        results.insert("peak_rss_gib".into(), json!(gib(hwm)));
        results.insert("peak_rss_after_load_gib".into(), json!(gib(hwm_after_load)));
        results.insert("rss_after_load_gib".into(), json!(gib(rss_after_load)));
        results.insert("mkl".into(), json!(llamavid_kernels::cpu::HAS_MKL));
        results.insert("cpu_features".into(), json!(cpu.describe()));
        results.insert("compute".into(), json!(model.compute()));
        results.insert("product_paths".into(), json!(model.product_paths()));
        results.insert("model".into(), json!(dir.display().to_string()));
        results.insert("notes".into(), json!(model.notes()));
        std::fs::write(
            path,
            serde_json::to_string_pretty(&Value::Object(results)).unwrap(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Floating-point operations of one 2048³ matrix product.
const GEMM_FLOP: f64 = 2.0 * 2048.0 * 2048.0 * 2048.0;

/// The machine's speed now, through the same kernels the model uses: best of 5 of a 2048³
/// product in f32 and in bf16 (ms), and the rate of reading 512 MiB on all threads (GB/s), on
/// a pool of `threads` threads.
fn machine_speed(threads: usize) -> [f64; 3] {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    pool.install(|| {
        let n = 2048;
        let w: Vec<f32> = (0..n * n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        // Everything the CPU has; AMX asked for, as a bf16 model load does.
        let kernels = CpuKernels::new(Isa::detect(IsaLimit::Best).request_amx());
        let tensor = Tensor::from_vec(w.clone(), (n, n), &Device::Cpu).expect("tensor");
        let f32_layer = CpuLinear::f32(tensor, None, kernels).expect("f32 layer");
        let bf16_layer = CpuLinear::from_f32(WeightType::Bf16, &w, n, n, None, kernels);
        let mut out = vec![0f32; n * n];
        let mut best_ms = |layer: &CpuLinear| {
            layer.forward_into(&w, n, &mut out);
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    layer.forward_into(&w, n, &mut out);
                    secs(t) * 1e3
                })
                .fold(f64::MAX, f64::min)
        };
        let (f32_ms, bf16_ms) = (best_ms(&f32_layer), best_ms(&bf16_layer));
        let words = vec![1u64; 64 << 20];
        let read = |words: &[u64]| {
            words
                .par_chunks(1 << 16)
                .map(|c| c.iter().sum::<u64>())
                .sum::<u64>()
        };
        std::hint::black_box(read(&words));
        let t = Instant::now();
        std::hint::black_box(read(&words));
        let gbps = (words.len() * 8) as f64 / secs(t) * 1e-9;
        [f32_ms, bf16_ms, gbps]
    })
}

/// Resets the stage times of the fused vision blocks.
fn take_profile(model: &LlamaVid) -> Option<[f64; 6]> {
    model.vision().profile().map(|p| p.take())
}

/// The fused ViT blocks' time per stage and frame, when profiled (`--stages`).
fn stage_profile(model: &LlamaVid, table: &mut Vec<(String, f64, &'static str)>, frames: f64) {
    let Some(profile) = take_profile(model) else {
        return;
    };
    for (name, s) in llamavid_kernels::cpu::vit::VitProfile::STAGES
        .iter()
        .zip(profile)
    {
        table.push((format!("    vit {name}"), s / frames, "s"));
    }
}

/// Largest |a - b| and that error relative to max(1, max |b|) (the fixture tests' measure).
fn error(ours: &Tensor, reference: &Tensor) -> candle_core::Result<(f64, f64)> {
    let ours = ours.to_dtype(candle_core::DType::F32)?.flatten_all()?;
    let reference = reference.to_dtype(candle_core::DType::F32)?.flatten_all()?;
    let err = (ours - &reference)?.abs()?.max(0)?.to_scalar::<f32>()? as f64;
    let scale = reference.abs()?.max(0)?.to_scalar::<f32>()?.max(1.0) as f64;
    Ok((err, err / scale))
}

/// Loads the fixture at every precision and compares each stage, fed with the reference
/// input of that stage, with the reference implementation's tensors (as the fixture tests do).
fn accuracy(fixture: &Path, json_path: Option<&Path>) -> Result<(), String> {
    let e = |e: candle_core::Error| e.to_string();
    let reference =
        candle_core::safetensors::load(fixture.join("reference.safetensors"), &Device::Cpu)
            .map_err(|e| format!("{}: {e}", fixture.display()))?;
    let r = |name: &str| {
        reference
            .get(name)
            .cloned()
            .ok_or(format!("reference has no {name}"))
    };
    let prompt_json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("prompt.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let question = prompt_json["question"].as_str().unwrap_or("").to_owned();
    let ids = |name: &str| -> Result<Vec<u32>, String> {
        Ok(r(name)?
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::I64))
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(e)?
            .into_iter()
            .map(|v| v as u32)
            .collect())
    };
    let model_dir = std::fs::read_dir(fixture)
        .map_err(|e| e.to_string())?
        .filter_map(|d| d.ok().map(|d| d.path()))
        .find(|p| p.join("pytorch_model.bin.index.json").is_file())
        .ok_or("fixture has no model directory")?;
    let stages = [
        "vision_features",
        "qformer_output",
        "video_tokens",
        "logits",
        "step_logits",
    ];
    // f32 tolerances of the fixture tests (relative to max(1, max|ref|)).
    let tolerance = [1e-4, 1e-4, 1e-3, 1e-4, 1e-4];
    let mut out = serde_json::Map::new();
    println!(
        "{:<8} {:<16} {:>12} {:>12} {:>14}",
        "dtype", "stage", "max abs err", "relative", "x f32 tolerance"
    );
    for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
        let mut options = LoadOptions::new(&model_dir);
        options.weight_format = WeightFormat::Pickle;
        options.precision = precision;
        let model = LlamaVid::load(&options).map_err(|e| e.to_string())?;
        let tg = model.token_generator();
        let prompt = model.prompt(&question).map_err(|e| e.to_string())?;
        let pixels = r("pixel_values")?;
        let guidance = tg.text_guidance(&ids("qformer_input_ids")?).map_err(e)?;
        let tokens = model
            .encode_pixels(&pixels, &prompt)
            .map_err(|e| e.to_string())?;
        let frames = tokens.dim(0).map_err(e)?;
        let mut cache = model
            .llm()
            .new_cache(r("inputs_embeds")?.dim(1).map_err(e)?);
        let logits = model
            .llm()
            .forward(
                &r("inputs_embeds")?,
                &mut cache,
                LogitsFor::AllPositions,
                None,
            )
            .map_err(e)?;
        let expected_ids = ids("generated_ids")?;
        let params = gstllamavid::model::GenerationParams {
            max_new_tokens: expected_ids.len(),
            ..Default::default()
        };
        let generation = model
            .generate(&r("inputs_embeds")?, &params, true, None)
            .map_err(|e| e.to_string())?;
        let ours = [
            model.vision().forward(&pixels).map_err(e)?,
            tg.qformer_output(&guidance, &r("qformer_visual_input")?)
                .map_err(e)?,
            tokens
                .reshape((frames * tokens.dim(1).map_err(e)?, ()))
                .map_err(e)?,
            logits,
            Tensor::stack(&generation.step_logits, 0).map_err(e)?,
        ];
        let matching = generation
            .token_ids
            .iter()
            .zip(&expected_ids)
            .take_while(|(a, b)| a == b)
            .count();
        let mut entry = serde_json::Map::new();
        for ((stage, ours), tol) in stages.iter().zip(&ours).zip(tolerance) {
            let (abs, rel) = error(ours, &r(stage)?).map_err(e)?;
            println!(
                "{:<8} {:<16} {:>12.3e} {:>12.3e} {:>14.1}",
                model.precision().as_str(),
                stage,
                abs,
                rel,
                rel / tol
            );
            entry.insert(
                stage.to_string(),
                json!({"max_abs": abs, "relative": rel, "tolerance": tol}),
            );
        }
        println!(
            "{:<8} {:<16} {matching} of {} greedy ids as the reference{}",
            model.precision().as_str(),
            "generated ids",
            expected_ids.len(),
            if generation.token_ids == expected_ids {
                " (all)"
            } else {
                ""
            }
        );
        entry.insert(
            "greedy_ids_matching_prefix".into(),
            json!({"matching": matching, "of": expected_ids.len()}),
        );
        out.insert(model.precision().as_str().into(), Value::Object(entry));
    }
    if let Some(path) = json_path {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&Value::Object(out)).unwrap(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
