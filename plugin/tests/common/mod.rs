//! Shared helpers for the fixture tests: where the fixture lives and how to compare tensors.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The fixture directory: `LLAMAVID_FIXTURE`, else `../shared/fixtures/llamavid-tiny-a` beside the
/// repository. A relative `LLAMAVID_FIXTURE` is taken from the repository root, like the default.
pub fn fixture_dir() -> PathBuf {
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = match std::env::var_os("LLAMAVID_FIXTURE") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root.join(dir)
            }
        }
        None => repo_root.join("../shared/fixtures/llamavid-tiny-a"),
    };
    assert!(
        dir.join("reference.safetensors").is_file(),
        "fixture not found at {} (set LLAMAVID_FIXTURE)",
        dir.display()
    );
    dir
}

/// The HF-style model directory inside the fixture (the one whose name contains "vid").
pub fn model_dir() -> PathBuf {
    let root = fixture_dir();
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixture dir readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.join("config.json").is_file() && p.join("pytorch_model.bin.index.json").is_file()
        })
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .next()
        .expect("fixture has a model directory")
}

/// Every tensor recorded by the reference implementation, on the CPU.
pub fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors loads")
}

/// One tensor the reference recorded (all of them loaded once per test binary).
pub fn reference_tensor(name: &str) -> Tensor {
    static REFERENCE: std::sync::OnceLock<std::collections::HashMap<String, Tensor>> =
        std::sync::OnceLock::new();
    REFERENCE.get_or_init(reference)[name].clone()
}

/// Token ids the reference recorded, as u32.
pub fn ids(name: &str) -> Vec<u32> {
    reference_tensor(name)
        .flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| u32::try_from(v).expect("non-negative id"))
        .collect()
}

pub fn prompt_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("prompt.json")).expect("prompt.json");
    serde_json::from_str(&text).expect("prompt.json parses")
}

pub fn meta_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("meta.json")).expect("meta.json");
    serde_json::from_str(&text).expect("meta.json parses")
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `|ours - reference| <= rel * max(1, max|reference|)` element-wise, with a message
/// that says which stage missed and by how much.
pub fn assert_close(stage: &str, ours: &Tensor, reference: &Tensor, rel: f32) {
    assert_eq!(
        ours.dims(),
        reference.dims(),
        "{stage}: shape differs from the reference"
    );
    let ours = ours
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    let bound = rel * max_abs(&reference).max(1.0);
    let err = max_abs(&(ours - &reference).unwrap());
    assert!(
        err <= bound,
        "{stage}: max abs error {err:e} exceeds {bound:e}"
    );
    eprintln!("{stage}: max abs error {err:e} (bound {bound:e})");
}

/// Tolerance of a stage fed with the reference input of that stage.
pub const STAGE_TOL: f32 = 1e-4;
/// Tolerance of all stages chained from the raw frames.
pub const END_TO_END_TOL: f32 = 1e-3;
