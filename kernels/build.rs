//! With the `cuda` feature: compiles every `cuda/*.cu` to PTX with nvcc into `OUT_DIR`, for the
//! compute capability in `CUDA_COMPUTE_CAP` (default 80; PTX is forward compatible, so sm_80
//! PTX also runs on Hopper). nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the
//! PATH. Without the feature: nothing (the CPU twins need no toolkit).
//!
//! With the `mkl` feature: links oneMKL statically from `$MKLROOT` (see [`mkl`]).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 2] = ["preprocess", "compress"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_MKL").is_some() {
        mkl::link();
    }
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

/// Static oneMKL for the `mkl` feature. MKL's static libraries depend on each other in a
/// cycle (interface <-> core <-> threading), which needs `--start-group` on the final link
/// line; a library crate cannot put that there for its dependents. So the routines we call are
/// partially linked here (`ld -r`) into one relocatable object holding exactly what they need
/// (about 20 MB instead of the 640 MB archives), archived as `libllamavid_mkl.a`, and linked
/// like any static library.
mod mkl {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The CBLAS entry points `src/cpu/mkl.rs` declares.
    const SYMBOLS: &[&str] = &[
        "cblas_sgemm",
        "cblas_sgemm_pack_get_size",
        "cblas_sgemm_pack",
        "cblas_sgemm_compute",
        "cblas_gemm_bf16bf16f32",
        "cblas_gemm_s8u8s32",
        "cblas_gemm_s8u8s32_pack_get_size",
        "cblas_gemm_s8u8s32_pack",
        "cblas_gemm_s8u8s32_compute",
    ];
    const LIBS: &[&str] = &["mkl_intel_lp64", "mkl_sequential", "mkl_core"];

    fn lib_dir(root: &Path) -> Option<PathBuf> {
        // pip wheels (`mkl-static`) put the archives in <prefix>/lib; oneAPI in lib/intel64.
        [root.join("lib"), root.join("lib/intel64")]
            .into_iter()
            .find(|d| d.join("libmkl_core.a").is_file())
    }

    pub fn link() {
        println!("cargo:rerun-if-env-changed=MKLROOT");
        let Some(root) = std::env::var_os("MKLROOT").map(PathBuf::from) else {
            panic!(
                "feature `mkl` needs MKLROOT: `python3 -m venv /opt/mkl && /opt/mkl/bin/pip \
                 install mkl-static mkl-include`, then build with MKLROOT=/opt/mkl"
            );
        };
        let Some(lib) = lib_dir(&root) else {
            panic!(
                "MKLROOT={} has no libmkl_core.a in lib/ or lib/intel64/ (install mkl-static)",
                root.display()
            );
        };
        for l in LIBS {
            println!(
                "cargo:rerun-if-changed={}",
                lib.join(format!("lib{l}.a")).display()
            );
        }
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
        let object = out.join("llamavid_mkl.o");
        let mut ld = Command::new(std::env::var("LD").unwrap_or_else(|_| "ld".into()));
        ld.arg("-r").arg("-o").arg(&object);
        for s in SYMBOLS {
            ld.arg("-u").arg(s);
        }
        ld.arg("--start-group");
        for l in LIBS {
            ld.arg(lib.join(format!("lib{l}.a")));
        }
        ld.arg("--end-group");
        run(&mut ld, "partial link of MKL (ld -r)");
        let archive = out.join("libllamavid_mkl.a");
        let _ = std::fs::remove_file(&archive);
        run(
            Command::new(std::env::var("AR").unwrap_or_else(|_| "ar".into()))
                .arg("crs")
                .arg(&archive)
                .arg(&object),
            "archiving the MKL object",
        );
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=llamavid_mkl");
        for l in ["pthread", "m", "dl"] {
            println!("cargo:rustc-link-lib=dylib={l}");
        }
    }

    fn run(cmd: &mut Command, what: &str) {
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{what} failed ({s}): {cmd:?}"),
            Err(e) => panic!("{what}: cannot run {cmd:?}: {e}"),
        }
    }
}
