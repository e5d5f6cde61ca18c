//! GGUF language-model speed (not a test). Two parts, each compared within one run:
//!
//! ```text
//! # ours vs llama.cpp on one GGUF: prompt processing of --pp ids and generation of --tg ids
//! # from an empty context, like llama-bench (llama.cpp through llama-cpp-python, built by
//! # examples/scripts/llama-cpp-env.sh; its python in LLAMAVID_LLAMA_CPP_PYTHON)
//! cargo bench -p gst-plugin-llamavid --bench gguf_bench -- --gguf FILE [--pp 128] [--tg 128]
//!
//! # the cpu-bench language model: GGUF exports (q4_k, q8_0; written once into --exports)
//! # against the checkpoint's weights at int8 and bf16: caption prefill (115 positions), decode
//! # per token, 32-token caption
//! flock /tmp/llamavid-bench.lock cargo bench -p gst-plugin-llamavid --bench gguf_bench -- \
//!     --model /work/bench-models/cpu-bench-f32/llama-vid-bench-video --exports DIR
//! ```
//!
//! `--threads` (2) threads, medians of `--repeats` (3) runs after a warm-up, the variants
//! interleaved run by run (these machines drift by tens of percent within an hour).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use gstllamavid::model::checkpoint::{Checkpoint, WeightFormat};
use gstllamavid::model::config::{read_json, LlavaConfig};
use gstllamavid::model::gguf::export::{export_llm, parse_type, ExportOptions};
use gstllamavid::model::gguf::{cpu_context, GgufLlama};
use gstllamavid::model::llama::{Llama, LogitsFor};
use gstllamavid::model::nn::LoadContext;
use gstllamavid::model::{IsaLimit, Precision};
use llamavid_kernels::cpu::{CpuFeatures, CpuKernels, Isa};

const USAGE: &str = "usage: gguf_bench --gguf FILE [--pp N] [--tg N] [--threads N] [--repeats N]
       gguf_bench --model LLAMAVID_MODEL_DIR --exports DIR [--types q4_k,q8_0] [--precisions int8,bf16] [--threads N] [--repeats N]";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 12345u64;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (3 + (s >> 33) as usize % (vocab - 3)) as u32
        })
        .collect()
}

/// Seconds for one forward of `ids` from an empty cache, and for `tg` single-id steps.
fn pp_tg(llm: &Llama, vocab: usize, pp: usize, tg: usize) -> (f64, f64) {
    let prompt = ids(pp.max(tg), vocab);
    let mut cache = llm.new_cache(pp);
    let started = Instant::now();
    llm.forward(
        &llm.embed(&prompt[..pp]).unwrap(),
        &mut cache,
        LogitsFor::LastPosition,
        None,
    )
    .unwrap();
    let pp_s = started.elapsed().as_secs_f64();
    let mut cache = llm.new_cache(tg);
    let started = Instant::now();
    for &id in &prompt[..tg] {
        llm.forward(
            &llm.embed(&[id]).unwrap(),
            &mut cache,
            LogitsFor::LastPosition,
            None,
        )
        .unwrap();
    }
    (pp_s, started.elapsed().as_secs_f64())
}

fn llama_cpp(python: &str, gguf: &Path, threads: usize, pp: usize, tg: usize) -> (f64, f64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gst-tests/llama-cpp/bench.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--model", &gguf.display().to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--pp", &pp.to_string(), "--tg", &tg.to_string()])
        .output()
        .expect("runs llama-cpp-python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["pp_tps"][0].as_f64().unwrap(),
        v["tg_tps"][0].as_f64().unwrap(),
    )
}

fn versus_llama_cpp(gguf: &Path, pp: usize, tg: usize, threads: usize, repeats: usize) {
    let python = std::env::var("LLAMAVID_LLAMA_CPP_PYTHON").unwrap_or_else(|_| {
        eprintln!(
            "set LLAMAVID_LLAMA_CPP_PYTHON (`repo=$PWD; . examples/scripts/llama-cpp-env.sh` \
             builds llama-cpp-python and exports it)"
        );
        std::process::exit(2)
    });
    let file = GgufLlama::open(gguf).unwrap();
    let vocab = file.config().vocab_size;
    let llm = file
        .load(&cpu_context(IsaLimit::Best), &Device::Cpu)
        .unwrap();
    pp_tg(&llm, vocab, pp, 8); // warm-up
    let (mut ours_pp, mut ours_tg, mut cpp_pp, mut cpp_tg) = (vec![], vec![], vec![], vec![]);
    for _ in 0..repeats {
        let (p, t) = pp_tg(&llm, vocab, pp, tg);
        ours_pp.push(pp as f64 / p);
        ours_tg.push(tg as f64 / t);
        let (p, t) = llama_cpp(&python, gguf, threads, pp, tg);
        cpp_pp.push(p);
        cpp_tg.push(t);
    }
    let (op, ot, cp, ct) = (
        median(ours_pp),
        median(ours_tg),
        median(cpp_pp),
        median(cpp_tg),
    );
    println!(
        "{} ({threads} threads, median of {repeats}; CPU: {}):",
        gguf.display(),
        CpuFeatures::detect().describe()
    );
    println!("| test | ours tok/s | llama.cpp tok/s | ours / llama.cpp |");
    println!("|---|---|---|---|");
    println!("| pp{pp} | {op:.1} | {cp:.1} | {:.2}x |", op / cp);
    println!("| tg{tg} | {ot:.1} | {ct:.1} | {:.2}x |", ot / ct);
}

/// Prefill of 115 positions then 31 single-id steps (the cpu-bench caption): seconds for the
/// prefill, per decode step (median), and the whole caption.
fn caption(llm: &Llama, vocab: usize) -> (f64, f64, f64) {
    let prompt = ids(115, vocab);
    let started = Instant::now();
    let mut cache = llm.new_cache(146);
    llm.forward(
        &llm.embed(&prompt).unwrap(),
        &mut cache,
        LogitsFor::LastPosition,
        None,
    )
    .unwrap();
    let prefill = started.elapsed().as_secs_f64();
    let mut steps = Vec::new();
    for &id in &prompt[..31] {
        let t = Instant::now();
        llm.forward(
            &llm.embed(&[id]).unwrap(),
            &mut cache,
            LogitsFor::LastPosition,
            None,
        )
        .unwrap();
        steps.push(t.elapsed().as_secs_f64());
    }
    (prefill, median(steps), started.elapsed().as_secs_f64())
}

fn exports_vs_precisions(
    model: &Path,
    exports: &Path,
    types: &[String],
    precisions: &[Precision],
    repeats: usize,
) {
    let cfg: LlavaConfig = read_json(&model.join("config.json")).unwrap();
    let mut variants: Vec<(String, Llama, f64)> = Vec::new();
    // As a model load does it: AMX asked for only because bf16/int8 products use it.
    let kernels = CpuKernels::new(Isa::detect(IsaLimit::Best).request_amx());
    for &p in precisions {
        let (resolved, note) = p.resolve(&Device::Cpu, Some(kernels));
        if let Some(note) = note {
            eprintln!("note: {note}");
        }
        let started = Instant::now();
        let ctx = LoadContext::cpu(resolved, kernels);
        let vb = Checkpoint::open_model_dir(model, WeightFormat::Auto)
            .unwrap()
            .var_builder(candle_core::DType::F32, &Device::Cpu);
        let llm = Llama::new(&cfg, vb, &ctx).unwrap();
        variants.push((
            format!("checkpoint {resolved}"),
            llm,
            started.elapsed().as_secs_f64(),
        ));
    }
    std::fs::create_dir_all(exports).unwrap();
    for t in types {
        let path = exports.join(format!("llm-{t}.gguf"));
        if !path.is_file() {
            let started = Instant::now();
            let options = ExportOptions {
                weight_type: parse_type(t).unwrap(),
                output_type: None,
            };
            let report = export_llm(model, &path, &options).unwrap();
            eprintln!(
                "exported {} ({:.0} MB) in {:.0} s",
                path.display(),
                report.bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
        }
        let started = Instant::now();
        let file = GgufLlama::open(&path).unwrap();
        let llm = file
            .load(&cpu_context(IsaLimit::Best), &Device::Cpu)
            .unwrap();
        variants.push((format!("GGUF {t}"), llm, started.elapsed().as_secs_f64()));
    }
    for (_, llm, _) in &variants {
        caption(llm, cfg.vocab_size); // warm-up
    }
    let mut runs = vec![Vec::new(); variants.len()];
    for _ in 0..repeats {
        for (i, (_, llm, _)) in variants.iter().enumerate() {
            runs[i].push(caption(llm, cfg.vocab_size));
        }
    }
    println!(
        "{} language model ({} threads, median of {repeats}; CPU: {}; MKL: {}):",
        model.display(),
        rayon::current_num_threads(),
        CpuFeatures::detect().describe(),
        llamavid_kernels::cpu::HAS_MKL
    );
    println!("| weights | prefill 115 | decode per token | 32-token caption | load |");
    println!("|---|---|---|---|---|");
    for ((name, _, load), r) in variants.iter().zip(runs) {
        let m = |f: fn(&(f64, f64, f64)) -> f64| median(r.iter().map(f).collect());
        println!(
            "| {name} | {:.3} s | {:.4} s | {:.2} s | {load:.1} s |",
            m(|r| r.0),
            m(|r| r.1),
            m(|r| r.2)
        );
    }
}

fn main() {
    let mut gguf = None;
    let mut model = None;
    let mut exports = None;
    let (mut pp, mut tg, mut threads, mut repeats) = (128, 128, 2, 3);
    let mut types = vec!["q4_k".to_owned(), "q8_0".to_owned()];
    let mut precisions = vec![Precision::Int8, Precision::Bf16];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--gguf" => gguf = Some(PathBuf::from(value())),
            "--model" => model = Some(PathBuf::from(value())),
            "--exports" => exports = Some(PathBuf::from(value())),
            "--pp" => pp = value().parse().unwrap(),
            "--tg" => tg = value().parse().unwrap(),
            "--threads" => threads = value().parse().unwrap(),
            "--repeats" => repeats = value().parse().unwrap(),
            "--types" => types = value().split(',').map(str::to_owned).collect(),
            "--precisions" => precisions = value().split(',').map(|p| p.parse().unwrap()).collect(),
            "--bench" => {}
            _ => {
                println!("{USAGE}");
                return;
            }
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| match (gguf, model, exports) {
        (Some(gguf), _, _) => versus_llama_cpp(&gguf, pp, tg, threads, repeats),
        (None, Some(model), Some(exports)) => {
            exports_vs_precisions(&model, &exports, &types, &precisions, repeats)
        }
        _ => println!("{USAGE}"),
    });
}
