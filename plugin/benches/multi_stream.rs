//! Many streams on one model: the shared scheduler against N independent workers (the design
//! before it, kept runnable for this comparison), in one run, on the workload of
//! `shared/bench/cpu-bench.json` (its question, and for captions its prompt ids: 115 positions
//! with the window of 32 frames of 2 tokens; 32 greedy tokens, 2 threads) and a random-weight
//! model of that shape.
//!
//! ```text
//! cargo bench -p gst-plugin-llamavid [--features mkl] --bench multi_stream -- \
//!     --model DIR --streams 1,2,4,8 --dtype f32|bf16|int8 [--frames 4] \
//!     [--isa best|avx512|avx2|portable] [--json FILE]
//! ```
//!
//! For each N:
//! - **encode**: N streams each submit `--frames` sampled frames (224×224 RGB) at once; the
//!   scheduler (one thread, frames of all streams encoded in batches of up to `encode-batch`)
//!   against N workers (one thread per stream, one frame at a time, all on the same model):
//!   aggregate encoded frames/s until the last frame is encoded.
//! - **caption**: N captions fall due at the same moment, each over its own 32-frame window:
//!   the scheduler's caption backend (`LocalCaptions`, the code its thread runs: every running
//!   caption advances one token per step, together) against N workers each generating its own
//!   caption alone, concurrently: aggregate caption tokens/s, p50/p95 of the time from due to
//!   text, and the last caption's time over one caption alone (N = 1 of the same path). The
//!   captions of both paths must be the same text (greedy). One untimed round of N captions
//!   comes first, as a running element's earlier captions would (their KV buffers are reused,
//!   and the prompt's text before the video is prefilled once, by the first caption: both
//!   paths then start each caption from its kept keys and values, unless `--no-prefix-reuse`).
//!
//! Not a test: it prints a table (and writes it as JSON with `--json`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use gstllamavid::captioner::backend::{CaptionBackend, LocalCaptions, Outcome, Report};
use gstllamavid::captioner::{
    BatchLimits, CaptionEngine, CaptionEvent, CaptionOutput, CaptionSettings, FrameJob, Job,
    OwnedFrame, Problem, QueuePolicy, Scheduler, Worker,
};
use gstllamavid::model::preprocess::{PixelFormat, YuvToRgb};
use gstllamavid::model::WeightFormat;
use gstllamavid::model::{Cancel, GenerationParams, IsaLimit, LlamaVid, LoadOptions, Precision};
use serde_json::{json, Value};

const USAGE: &str =
    "usage: multi_stream --model DIR [--streams 1,2,4,8] [--dtype f32|bf16|int8|auto] \
[--frames N] [--threads N] [--isa best|avx512|avx2|portable] [--encode-batch N] \
[--caption-batch N] [--no-prefix-reuse] [--shape FILE] [--json FILE]";

struct Args {
    model: PathBuf,
    precision: Precision,
    streams: Vec<usize>,
    frames: usize,
    threads: usize,
    /// The widest instruction set our kernels use (`--isa avx2` runs an AVX2 CPU's code here;
    /// with `mkl`, narrow MKL too with `MKL_ENABLE_INSTRUCTIONS=AVX2`).
    isa: IsaLimit,
    limits: BatchLimits,
    /// `LoadOptions::reuse_prompt_prefix` (on unless `--no-prefix-reuse`).
    reuse_prefix: bool,
    shape: PathBuf,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut model = None;
    let mut precision = Precision::F32;
    let mut streams = vec![1, 2, 4, 8];
    let mut frames = 4;
    let mut threads = 2;
    let mut isa = IsaLimit::Best;
    let mut limits = BatchLimits::default_for(false);
    let mut reuse_prefix = true;
    let mut shape = repo.join("../shared/bench/cpu-bench.json");
    let mut json = None;
    let mut args = std::env::args().skip(1);
    let number = |v: String, what: &str| v.parse::<usize>().map_err(|e| format!("{what}: {e}"));
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--dtype" | "--precision" => precision = value()?.parse()?,
            "--streams" => {
                streams = value()?
                    .split(',')
                    .map(|n| number(n.to_owned(), "--streams"))
                    .collect::<Result<_, _>>()?
            }
            "--frames" => frames = number(value()?, "--frames")?,
            "--threads" => threads = number(value()?, "--threads")?,
            "--isa" => isa = value()?.parse()?,
            "--encode-batch" => limits.encode = number(value()?, "--encode-batch")?,
            "--caption-batch" => limits.caption = number(value()?, "--caption-batch")?,
            "--no-prefix-reuse" => reuse_prefix = false,
            "--shape" => shape = PathBuf::from(value()?),
            "--json" => json = Some(PathBuf::from(value()?)),
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        model: model.ok_or(format!("--model is required\n{USAGE}"))?,
        precision,
        streams: streams.into_iter().filter(|&n| n > 0).collect(),
        frames: frames.max(1),
        threads: threads.max(1),
        isa,
        limits,
        reuse_prefix,
        shape,
        json,
    })
}

/// The model directory: `dir`, or its subdirectory holding a config.json and a
/// vision_config.json.
fn model_dir(dir: &Path) -> Result<PathBuf, String> {
    let is_model =
        |p: &Path| p.join("config.json").is_file() && p.join("vision_config.json").exists();
    if is_model(dir) {
        return Ok(dir.to_owned());
    }
    std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| is_model(p))
        .ok_or(format!("{} holds no model directory", dir.display()))
}

/// What the bench takes from the workload file.
struct Workload {
    question: String,
    /// The spliced prompt's ids as the workload gives them (its prefill length is the
    /// workload's, whatever the model's tokenizer makes of the question).
    llm_ids: Vec<i64>,
    qformer_ids: Vec<u32>,
    window_frames: usize,
    tokens_per_frame: usize,
    new_tokens: usize,
}

fn workload(path: &Path) -> Result<Workload, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let shape: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let w = &shape["workload"];
    let n = |v: &Value, what: &str| {
        v.as_u64()
            .map(|x| x as usize)
            .ok_or(format!("{what} missing"))
    };
    let ids = |key: &str| -> Result<Vec<i64>, String> {
        w[key]
            .as_array()
            .ok_or(format!("workload.{key} missing"))?
            .iter()
            .map(|v| v.as_i64().ok_or(format!("workload.{key}: not an integer")))
            .collect()
    };
    Ok(Workload {
        question: w["question"].as_str().unwrap_or("").to_owned(),
        llm_ids: ids("llm_input_ids")?,
        qformer_ids: ids("qformer_input_ids")?
            .into_iter()
            .map(|v| v as u32)
            .collect(),
        window_frames: n(&w["window_frames"], "workload.window_frames")?,
        tokens_per_frame: n(&w["tokens_per_frame"], "workload.tokens_per_frame")?,
        new_tokens: n(&w["decode"]["new_tokens"], "workload.decode.new_tokens")?,
    })
}

/// A 224×224 RGB frame of a pattern of its own (the values do not change the cost).
fn frame(seed: usize) -> OwnedFrame {
    let (w, h) = (224, 224);
    let data = (0..w * h * 3)
        .map(|i| ((i * 31 + seed * 97) % 251) as u8)
        .collect();
    OwnedFrame {
        format: PixelFormat::Rgb,
        width: w,
        height: h,
        planes: vec![data],
        strides: vec![w * 3],
        yuv: YuvToRgb::default_for_height(h),
    }
}

/// Counts encoded frames of every stream, and wakes whoever waits for a total.
#[derive(Default)]
struct Counter {
    encoded: Mutex<u64>,
    changed: Condvar,
    batched: AtomicU64,
    failure: Mutex<Option<String>>,
}

impl Counter {
    fn wait_for(&self, total: u64) -> Result<(), String> {
        let mut encoded = self.encoded.lock().unwrap();
        while *encoded < total {
            if let Some(failure) = self.failure.lock().unwrap().clone() {
                return Err(failure);
            }
            encoded = self
                .changed
                .wait_timeout(encoded, Duration::from_secs(1))
                .unwrap()
                .0;
        }
        Ok(())
    }
}

struct CountingOutput(Arc<Counter>);

impl CaptionOutput for CountingOutput {
    fn frame_encoded(&self, _epoch: u64, batch: usize) {
        if batch > 1 {
            self.0.batched.fetch_add(1, Ordering::Relaxed);
        }
        *self.0.encoded.lock().unwrap() += 1;
        self.0.changed.notify_all();
    }
    fn caption(&self, _event: CaptionEvent) {}
    fn idle_until(&self, _epoch: u64, _until: u64) {}
    fn eos(&self, _epoch: u64) {}
    fn warning(&self, _problem: Problem) {}
    fn error(&self, problem: Problem) {
        *self.0.failure.lock().unwrap() = Some(problem.message);
        self.0.changed.notify_all();
    }
}

/// Settings under which no caption falls due while frames are encoded.
fn encode_only(question: &str) -> Arc<Mutex<CaptionSettings>> {
    Arc::new(Mutex::new(CaptionSettings {
        prompt: question.to_owned(),
        params: GenerationParams::default(),
        window_duration: u64::MAX / 4,
        caption_interval: u64::MAX / 4,
    }))
}

fn job(stream: usize, index: usize) -> Job {
    let ms = 1_000_000;
    Job::Frame {
        epoch: 0,
        job: FrameJob {
            running_time: index as u64 * 1000 * ms,
            next_sample_due: (index as u64 + 1) * 1000 * ms,
            arrived: Instant::now(),
            frame: frame(stream * 1000 + index),
        },
    }
}

/// Feeds `frames` frames on each of `submit`'s streams from one thread per stream, and waits
/// for all of them to be encoded. Returns (seconds, frames encoded in batches of 2 or more).
fn feed(
    streams: usize,
    frames: usize,
    counter: &Arc<Counter>,
    submit: impl Fn(usize, Job) + Sync,
) -> Result<(f64, u64), String> {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for s in 0..streams {
            let submit = &submit;
            scope.spawn(move || {
                for i in 0..frames {
                    submit(s, job(s, i));
                }
            });
        }
    });
    counter.wait_for((streams * frames) as u64)?;
    Ok((
        start.elapsed().as_secs_f64(),
        counter.batched.load(Ordering::Relaxed),
    ))
}

fn encode_with_scheduler(
    model: &Arc<LlamaVid>,
    limits: BatchLimits,
    question: &str,
    streams: usize,
    frames: usize,
) -> Result<(f64, u64), String> {
    let scheduler = Scheduler::spawn(model.clone(), limits).map_err(|e| e.to_string())?;
    let counter = Arc::new(Counter::default());
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            scheduler.attach(
                encode_only(question),
                Arc::new(CountingOutput(counter.clone())),
                frames,
            )
        })
        .collect();
    feed(streams, frames, &counter, |s, job| {
        handles[s].submit(job, QueuePolicy::Block);
    })
}

fn encode_with_workers(
    model: &Arc<LlamaVid>,
    question: &str,
    streams: usize,
    frames: usize,
) -> Result<(f64, u64), String> {
    let counter = Arc::new(Counter::default());
    let workers: Vec<Worker> = (0..streams)
        .map(|_| {
            Worker::spawn(
                model.clone(),
                encode_only(question),
                Arc::new(CountingOutput(counter.clone())),
                frames,
            )
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    feed(streams, frames, &counter, |s, job| {
        workers[s].submit(job, QueuePolicy::Block);
    })
}

/// N windows of `frames` frames of tokens: values of a fixed pseudo-random sequence per
/// window (the cost does not depend on them, but where a caption meets EOS does: the same
/// windows in every run make runs comparable).
fn windows(model: &LlamaVid, work: &Workload, n: usize) -> Result<Vec<Tensor>, String> {
    let rows = work.window_frames * work.tokens_per_frame;
    let hidden = model.llm().hidden_size();
    (0..n)
        .map(|w| {
            let mut state = (w as u32 + 1).wrapping_mul(2654435761);
            let values: Vec<f32> = (0..rows * hidden)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state as f32 / u32::MAX as f32) * 2.0 - 1.0
                })
                .collect();
            Tensor::from_vec(values, (rows, hidden), &Device::Cpu).map_err(|e| e.to_string())
        })
        .collect()
}

/// Seconds from the start to each caption's text, and the texts.
type CaptionRun = (Vec<f64>, Vec<String>);

/// A caption of the workers' path: seconds to its text, the text, tokens generated.
type Alone = (f64, String, usize);

/// The scheduler's caption backend: all N captions taken at once, stepped together, on a
/// thread of its own as the scheduler's (not the thread that loaded the model).
fn captions_with_scheduler(
    model: &Arc<LlamaVid>,
    limits: BatchLimits,
    prompt: &<LlamaVid as CaptionEngine>::Prompt,
    params: &GenerationParams,
    windows: &[Tensor],
) -> Result<CaptionRun, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut backend = LocalCaptions::new(model.clone(), limits.caption);
                let start = Instant::now();
                for (id, window) in windows.iter().enumerate() {
                    backend
                        .start(id as u64, window, prompt, params)
                        .map_err(|e| e.summary())?;
                }
                let mut done = vec![None; windows.len()];
                // Where the time goes: the first step runs every prefill, the others decode.
                let mut steps = Vec::new();
                while backend.ready() {
                    let t0 = Instant::now();
                    let reports = backend.advance(Cancel::NEVER);
                    steps.push(t0.elapsed().as_secs_f64());
                    for report in reports {
                        let Report::Finished(finished) = report else {
                            continue;
                        };
                        match finished.outcome {
                            Outcome::Text(text) => {
                                done[finished.id as usize] =
                                    Some((start.elapsed().as_secs_f64(), text))
                            }
                            other => return Err(format!("caption {}: {other:?}", finished.id)),
                        }
                    }
                }
                if let Some((first, decode)) = steps.split_first() {
                    eprintln!(
                        "  scheduler, {} captions: first step (every prefill) {:.2} s, then \
                         {:.1} ms per decode step over {} steps",
                        windows.len(),
                        first,
                        decode.iter().sum::<f64>() * 1e3 / decode.len().max(1) as f64,
                        decode.len()
                    );
                }
                Ok(done
                    .into_iter()
                    .map(|d| d.expect("every caption finished"))
                    .unzip())
            })
            .join()
            .unwrap()
    })
}

/// N workers' way: each caption generated alone on its own thread, all at once.
fn captions_with_workers(
    model: &Arc<LlamaVid>,
    prompt: &<LlamaVid as CaptionEngine>::Prompt,
    params: &GenerationParams,
    windows: &[Tensor],
) -> Result<Vec<Alone>, String> {
    let barrier = Barrier::new(windows.len());
    let start = Mutex::new(None::<Instant>);
    let results: Vec<Result<Alone, String>> = std::thread::scope(|scope| {
        let runs: Vec<_> = windows
            .iter()
            .map(|window| {
                let (barrier, start) = (&barrier, &start);
                scope.spawn(move || {
                    barrier.wait();
                    let started = *start.lock().unwrap().get_or_insert_with(Instant::now);
                    let engine = &**model;
                    let mut sequence =
                        CaptionEngine::start_sequence(engine, window, prompt, params)
                            .map_err(|e| e.summary())?;
                    loop {
                        let step = CaptionEngine::step(engine, &mut [&mut sequence], Cancel::NEVER)
                            .map_err(|e| e.summary())?;
                        if let Some(text) = step.into_iter().next().flatten() {
                            let took = started.elapsed().as_secs_f64();
                            return Ok((took, text, sequence.generated()));
                        }
                    }
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    results.into_iter().collect()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// CPU seconds of every process (/proc/stat) and of this one (/proc/self/stat).
fn cpu_seconds() -> (f64, f64) {
    let field_sum = |text: &str, skip: usize| -> Vec<f64> {
        text.split_whitespace()
            .skip(skip)
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    let all = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v = field_sum(all.lines().next().unwrap_or(""), 1);
    let busy = v.iter().sum::<f64>() - v.get(3).unwrap_or(&0.0) - v.get(4).unwrap_or(&0.0);
    let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f = field_sum(own.rsplit_once(')').map_or("", |(_, rest)| rest), 0);
    let own = f.get(10).unwrap_or(&0.0) + f.get(11).unwrap_or(&0.0);
    (busy / 100.0, own / 100.0)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    // candle's CPU ops and rayon read the thread count here; set before either starts.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let work = workload(&args.shape)?;
    let dir = model_dir(&args.model)?;
    let mut options = LoadOptions::new(&dir);
    options.weight_format = WeightFormat::Pickle;
    options.precision = args.precision;
    options.threads = Some(args.threads);
    options.cpu_isa = args.isa;
    options.reuse_prompt_prefix = args.reuse_prefix;
    let t = Instant::now();
    let model = Arc::new(LlamaVid::load(&options).map_err(|e| e.summary())?);
    let cpu = llamavid_kernels::cpu::CpuFeatures::detect();
    println!(
        "model {} | precision {} | mkl {} | amx {} | isa limit {} | {} threads | loaded in \
         {:.1} s | limits: encode {} frames, caption {} captions | prompt prefix reuse {}",
        dir.display(),
        model.precision(),
        llamavid_kernels::cpu::HAS_MKL,
        cpu.amx,
        args.isa,
        args.threads,
        t.elapsed().as_secs_f64(),
        args.limits.encode,
        args.limits.caption,
        if args.reuse_prefix { "on" } else { "off" },
    );
    let prompt = model
        .prompt_from_ids(&work.question, work.llm_ids.clone(), &work.qformer_ids)
        .map_err(|e| e.summary())?;
    let prefill_len = model
        .input_embeddings(&prompt, &windows(&model, &work, 1)?[0])
        .and_then(|e| Ok(e.dim(1)?))
        .map_err(|e| e.summary())?;
    eprintln!("each caption prefills {prefill_len} positions");
    let params = GenerationParams {
        max_new_tokens: work.new_tokens,
        ..GenerationParams::default()
    };
    let cpu_start = cpu_seconds();
    let wall_start = Instant::now();
    let mut rows = Vec::new();
    let mut alone = None;
    for &n in &args.streams {
        eprintln!("N = {n}: encode, scheduler");
        let (enc_s, batched) =
            encode_with_scheduler(&model, args.limits, &work.question, n, args.frames)?;
        eprintln!("N = {n}: encode, workers");
        let (enc_w, _) = encode_with_workers(&model, &work.question, n, args.frames)?;
        let frames = (n * args.frames) as f64;
        let windows = windows(&model, &work, n)?;
        // Untimed: a running element's captions reuse the KV buffers of its earlier ones, so
        // the timed runs start from that steady state, not from unmapped memory.
        eprintln!("N = {n}: captions, warm-up");
        captions_with_scheduler(&model, args.limits, &prompt, &params, &windows)?;
        eprintln!("N = {n}: captions, scheduler");
        let (sched_t, sched_text) =
            captions_with_scheduler(&model, args.limits, &prompt, &params, &windows)?;
        eprintln!("N = {n}: captions, workers");
        let alone_runs = captions_with_workers(&model, &prompt, &params, &windows)?;
        let work_t: Vec<f64> = alone_runs.iter().map(|r| r.0).collect();
        let work_text: Vec<String> = alone_runs.iter().map(|r| r.1.clone()).collect();
        // The same greedy ids on both paths (checked by their texts) have the same length.
        let tokens: f64 = alone_runs.iter().map(|r| r.2 as f64).sum();
        if sched_text != work_text {
            return Err(format!(
                "N = {n}: the scheduler's captions differ from the workers': {sched_text:?} vs {work_text:?}"
            ));
        }
        let full = (n * work.new_tokens) as f64;
        if tokens < full {
            eprintln!(
                "  N = {n}: captions ended at EOS before {} tokens: {tokens} of {full} made \
                 (tokens/s counts those made)",
                work.new_tokens
            );
        }
        let alone = *alone.get_or_insert((max(&sched_t), max(&work_t)));
        let row = json!({
            "streams": n,
            "encode": {
                "frames": frames,
                "scheduler_frames_per_s": frames / enc_s,
                "workers_frames_per_s": frames / enc_w,
                "ratio": enc_w / enc_s,
                "frames_batched": batched,
            },
            "caption": {
                "tokens": tokens,
                "scheduler_tokens_per_s": tokens / max(&sched_t),
                "workers_tokens_per_s": tokens / max(&work_t),
                "scheduler_p50_s": percentile(&sched_t, 50.0),
                "scheduler_p95_s": percentile(&sched_t, 95.0),
                "workers_p50_s": percentile(&work_t, 50.0),
                "workers_p95_s": percentile(&work_t, 95.0),
                "scheduler_last_over_alone": max(&sched_t) / alone.0,
                "workers_last_over_alone": max(&work_t) / alone.1,
            },
        });
        println!("{row}");
        rows.push(row);
    }
    let wall = wall_start.elapsed().as_secs_f64();
    let cpu_end = cpu_seconds();
    let own = cpu_end.1 - cpu_start.1;
    let foreign = ((cpu_end.0 - cpu_start.0) - own).max(0.0);

    println!(
        "\nprecision {}, {} threads, {} frames per stream, windows of {} frames, {} tokens per caption",
        model.precision(),
        args.threads,
        args.frames,
        work.window_frames,
        work.new_tokens
    );
    println!(
        "{:>3} | {:>21} | {:>5} | {:>21} | {:>8} | {:>17} | {:>17} | {:>13}",
        "N",
        "encode fr/s sch/wrk",
        "ratio",
        "caption tok/s s/w",
        "vs N=1",
        "p50 s sch/wrk",
        "p95 s sch/wrk",
        "last/alone s/w"
    );
    let first_rate = rows
        .first()
        .map(|r| r["caption"]["scheduler_tokens_per_s"].as_f64().unwrap())
        .unwrap_or(1.0);
    for row in &rows {
        let e = &row["encode"];
        let c = &row["caption"];
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>3} | {:>10.3} / {:>8.3} | {:>5.2} | {:>10.2} / {:>8.2} | {:>7.2}x | {:>7.2} / {:>7.2} | {:>7.2} / {:>7.2} | {:>5.2} / {:>5.2}",
            row["streams"],
            f(e, "scheduler_frames_per_s"),
            f(e, "workers_frames_per_s"),
            f(e, "ratio"),
            f(c, "scheduler_tokens_per_s"),
            f(c, "workers_tokens_per_s"),
            f(c, "scheduler_tokens_per_s") / first_rate,
            f(c, "scheduler_p50_s"),
            f(c, "workers_p50_s"),
            f(c, "scheduler_p95_s"),
            f(c, "workers_p95_s"),
            f(c, "scheduler_last_over_alone"),
            f(c, "workers_last_over_alone"),
        );
    }
    println!(
        "CPU use over the run ({wall:.0} s): this process {:.2} cores, other processes {:.2} cores",
        own / wall,
        foreign / wall
    );
    if let Some(path) = &args.json {
        let out = json!({
            "model": dir.display().to_string(),
            "precision": model.precision().as_str(),
            "mkl": llamavid_kernels::cpu::HAS_MKL,
            "amx": cpu.amx,
            "isa_limit": args.isa.as_str(),
            "threads": args.threads,
            "frames_per_stream": args.frames,
            "encode_batch": args.limits.encode,
            "caption_batch": args.limits.caption,
            "window_frames": work.window_frames,
            "new_tokens": work.new_tokens,
            "rows": rows,
            "own_cpu_cores": own / wall,
            "foreign_cpu_cores": foreign / wall,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
