//! Our GGUF decoder against llama.cpp on the same ids: a real trained model (SmolLM2-135M-
//! Instruct, Q4_1) and the exporter's own files. Needs the referee's recordings, so it is
//! ignored in `cargo test`; `gst-tests/llama-cpp-check.sh` installs llama.cpp (llama-cpp-python
//! built for this CPU), records them and runs this test with `--ignored`.
//!
//! For each recording (`$LLAMAVID_LLAMA_CPP_CASES/*.json`, written by
//! `gst-tests/llama-cpp/referee.py`):
//! * **prefill logits** at the last prompt position: max abs difference, relative to
//!   max(1, max |llama.cpp|), within the bound the recording's name selects (see `bound`);
//! * **greedy continuations** (32 ids each): equal to llama.cpp's up to the first position where
//!   llama.cpp's top two logits are within 1e-3 (a near tie, where rounding order may pick
//!   either); prompts with such a position are counted and reported, and after it anything
//!   goes.

use std::path::PathBuf;

use gstllamavid::model::gguf::{cpu_context, GgufLlama};
use gstllamavid::model::llama::greedy_continuation;
use gstllamavid::model::IsaLimit;
use serde_json::Value;

/// llama.cpp's top-2 margin below which either id may be picked.
const NEAR_TIE: f64 = 1e-3;

/// The prefill-logit bound for a recording, relative to max(1, max |llama.cpp logits|).
///
/// Both sides quantize the activations to 8 bits per 32-block before each block-quantized
/// product (ggml's `vec_dot_type`: Q8_0, Q8_1 or Q8_K, which candle reproduces), so they
/// compute the same integer dot products; what differs is the order of f32 sums (SIMD width,
/// threads), RoPE tables (llama.cpp multiplies θ step by step, we take powers), and, where an
/// activation lands within rounding of a half step, its 8-bit value: one such flip moves a
/// logit by about (block scale / 2) · weight. Measured on this project's machines: see the
/// README; the bounds hold about 3x margin.
fn bound(case: &str) -> f64 {
    if case.starts_with("smollm2") {
        // Trained weights, 30 layers, logits up to ~30.
        2e-3
    } else {
        // Random weights: tiny scales make flips relatively larger.
        5e-3
    }
}

#[test]
#[ignore = "needs llama.cpp's recordings: run gst-tests/llama-cpp-check.sh"]
fn gguf_decoder_matches_llama_cpp() {
    let dir = std::env::var_os("LLAMAVID_LLAMA_CPP_CASES")
        .map(PathBuf::from)
        .expect(
            "LLAMAVID_LLAMA_CPP_CASES is not set: run gst-tests/llama-cpp-check.sh, which records \
         llama.cpp's outputs and points this test at them",
        );
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no recordings in {}", dir.display());
    let mut failures = Vec::new();
    for case_path in &cases {
        let case = case_path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let rec: Value =
            serde_json::from_str(&std::fs::read_to_string(case_path).unwrap()).unwrap();
        let model = PathBuf::from(rec["model"].as_str().unwrap());
        let file = GgufLlama::open(&model).unwrap_or_else(|e| panic!("{case}: {e}"));
        let llm = file
            .load(&cpu_context(IsaLimit::Best), &candle_core::Device::Cpu)
            .unwrap();
        let prompts = rec["prompts"].as_array().unwrap();
        assert!(prompts.len() >= 20, "{case}: at least 20 prompts");
        let (mut worst, mut exact, mut near_ties, mut checked_ids) = (0f64, 0, 0, 0);
        for (n, p) in prompts.iter().enumerate() {
            let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
            let theirs: Vec<u32> = serde_json::from_value(p["greedy"].clone()).unwrap();
            let margins: Vec<f64> = serde_json::from_value(p["margins"].clone()).unwrap();
            let reference: Vec<f32> = serde_json::from_value(p["prefill_logits"].clone()).unwrap();
            let (ours, rows) = greedy_continuation(&llm, &ids, theirs.len()).unwrap();

            let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs())) as f64;
            let err = rows[0]
                .iter()
                .zip(&reference)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
                / scale;
            worst = worst.max(err);
            if err > bound(&case) {
                failures.push(format!(
                    "{case} prompt {n}: prefill logits differ by {err:.2e} of max|logit| {scale:.1} (bound {:.0e})",
                    bound(&case)
                ));
            }

            let tie = margins.iter().position(|&m| m < NEAR_TIE);
            let must_match = tie.unwrap_or(theirs.len());
            checked_ids += must_match;
            if ours[..must_match] != theirs[..must_match] {
                let at = (0..must_match).find(|&i| ours[i] != theirs[i]).unwrap();
                failures.push(format!(
                    "{case} prompt {n}: greedy ids differ at step {at} (llama.cpp margin {:.2e}): ours {:?}, llama.cpp {:?}",
                    margins[at],
                    &ours[..=at],
                    &theirs[..=at]
                ));
            }
            match tie {
                Some(_) => near_ties += 1,
                None if ours == theirs => exact += 1,
                None => {}
            }
        }
        eprintln!(
            "{case}: {} prompts x {} ids: prefill logits max rel diff {worst:.2e} (bound {:.0e}); \
             {exact} continuations identical, {near_ties} with a llama.cpp near tie (< {NEAR_TIE:.0e}) \
             checked up to it; {checked_ids} ids compared",
            prompts.len(),
            prompts[0]["greedy"].as_array().unwrap().len(),
            bound(&case),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
