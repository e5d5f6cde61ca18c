//! With the `cuda` feature: compiles every `cuda/*.cu` to PTX with nvcc into `OUT_DIR`, for the
//! compute capability in `CUDA_COMPUTE_CAP` (default 80; PTX is forward compatible, so sm_80
//! PTX also runs on Hopper). nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the
//! PATH. Without the feature: nothing (the CPU twins need no toolkit).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 2] = ["preprocess", "compress"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for k in KERNELS {
        println!("cargo::rerun-if-changed=cuda/{k}.cu");
    }
    println!("cargo::rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_COMPUTE_CAP",
        "NVCC_CCBIN",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = nvcc();
    let arch = compute_cap();
    for k in KERNELS {
        let src = PathBuf::from("cuda").join(format!("{k}.cu"));
        let ptx = out_dir.join(format!("{k}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["-ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=sm_{arch}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src);
        if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        let status = cmd.status().unwrap_or_else(|e| {
            panic!(
                "cannot run nvcc ({}): {e}. The `cuda` feature needs the CUDA toolkit: set NVCC or \
                 CUDA_HOME, or put nvcc on the PATH (kernels/check-cuda-build.sh installs one)",
                nvcc.display()
            )
        });
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return nvcc.into();
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let candidate = PathBuf::from(home).join("bin").join("nvcc");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    "nvcc".into()
}

/// `CUDA_COMPUTE_CAP` as nvcc's arch suffix: "80", "8.0", "90a", "sm_90" all accepted.
fn compute_cap() -> String {
    let raw = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = raw
        .trim()
        .trim_start_matches("sm_")
        .trim_start_matches("compute_")
        .chars()
        .filter(|c| *c != '.')
        .collect();
    if cap.is_empty() || !cap.chars().next().unwrap().is_ascii_digit() {
        panic!("CUDA_COMPUTE_CAP={raw:?} is not a compute capability like 80 or 90");
    }
    cap
}
