//! A short, deterministic run of every fuzz target (see `llamavid_gst_tests::fuzz`): no panic,
//! no allocation beyond the target's budget, no slow execution. Long runs with a growing
//! corpus: `cargo bench -p llamavid-gst-tests --bench fuzz`.
//!
//! `cargo test -p llamavid-gst-tests --test fuzz`

use llamavid_gst_tests::alloc_meter::MeteredAllocator;
use llamavid_gst_tests::fuzz::{targets, Fuzzer, Target};

#[global_allocator]
static ALLOC: MeteredAllocator = MeteredAllocator;

/// The CI run's seed: fixed, so a failure here reproduces with the bench binary
/// (`--seed 13 --iterations N --target NAME`).
const SEED: u64 = 13;

fn fuzz(mut target: impl Target, iterations: u64) {
    let fuzzer = Fuzzer {
        seed: SEED,
        corpus_dir: None,
    };
    let report = fuzzer.run(&mut target, iterations, None);
    println!("{report}");
    for finding in &report.findings {
        let shown = &finding.input[..finding.input.len().min(96)];
        println!(
            "  {}: input ({} bytes) {shown:02x?}",
            finding.what,
            finding.input.len()
        );
    }
    assert!(
        report.findings.is_empty(),
        "{}: {} findings, first: {}",
        report.target,
        report.findings.len(),
        report.findings[0].what
    );
    assert!(report.refused > 0, "mutations never reached an error path");
}

#[test]
fn frame() {
    fuzz(targets::FrameTarget, 1500);
}

#[test]
fn pickle() {
    fuzz(targets::PickleTarget::new(), 1500);
}

#[test]
fn torch_zip() {
    fuzz(targets::TorchZipTarget, 600);
}

#[test]
fn safetensors() {
    fuzz(targets::SafetensorsTarget, 3000);
}

#[test]
fn gguf() {
    fuzz(targets::GgufTarget, 3000);
}

#[test]
fn tokenizer_model() {
    fuzz(targets::SentencePieceTarget::new(), 600);
}

#[test]
fn tokenizer_json() {
    fuzz(targets::TokenizerJsonTarget::new(), 400);
}

#[test]
fn config_json() {
    fuzz(targets::ConfigJsonTarget, 3000);
}

#[test]
fn config_load() {
    fuzz(targets::ConfigLoadTarget::new(), 60);
}
