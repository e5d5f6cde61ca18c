fn main() {
    gst_plugin_version_helper::info();
    if std::env::var_os("CARGO_FEATURE_MKL").is_some() {
        mkl::link();
    }
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

    /// The CBLAS entry points `src/model/cpu/mkl.rs` declares.
    const SYMBOLS: &[&str] = &[
        "cblas_sgemm",
        "cblas_sgemm_pack_get_size",
        "cblas_sgemm_pack",
        "cblas_sgemm_compute",
        "cblas_gemm_bf16bf16f32",
        "cblas_gemm_s8u8s32",
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
