//! Long fuzz runs with a corpus that grows outside the repository (see
//! `llamavid_gst_tests::fuzz`). Inputs that fail are kept in `<corpus>/<target>/findings/`.
//!
//! ```text
//! cargo bench -p llamavid-gst-tests --bench fuzz -- [--target NAME] [--seconds N]
//!     [--iterations N] [--seed N] [--corpus DIR | --no-corpus]
//! ```
//!
//! Defaults: every target, 60 s each, seed 13, corpus `~/.cache/gst-llamavid/fuzz-corpus/`.
//! Exits non-zero when anything was found.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use llamavid_gst_tests::alloc_meter::MeteredAllocator;
use llamavid_gst_tests::fuzz::{default_corpus_root, targets, Fuzzer};

#[global_allocator]
static ALLOC: MeteredAllocator = MeteredAllocator;

fn main() -> ExitCode {
    let mut target: Option<String> = None;
    let mut seconds = 60u64;
    let mut iterations = u64::MAX;
    let mut seed = 13u64;
    let mut corpus = Some(default_corpus_root());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match arg.as_str() {
            "--target" => target = Some(value("--target")),
            "--seconds" => seconds = value("--seconds").parse().expect("--seconds N"),
            "--iterations" => iterations = value("--iterations").parse().expect("--iterations N"),
            "--seed" => seed = value("--seed").parse().expect("--seed N"),
            "--corpus" => corpus = Some(PathBuf::from(value("--corpus"))),
            "--no-corpus" => corpus = None,
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            "--help" | "-h" => {
                println!(
                    "fuzz [--target NAME] [--seconds N] [--iterations N] [--seed N] \
                     [--corpus DIR | --no-corpus]\ntargets: {}",
                    targets::all()
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return ExitCode::SUCCESS;
            }
            other => panic!("unknown argument {other} (--help)"),
        }
    }
    let fuzzer = Fuzzer {
        seed,
        corpus_dir: corpus.clone(),
    };
    if let Some(dir) = &corpus {
        println!("corpus: {}", dir.display());
    }
    let mut found = 0;
    let mut ran = 0;
    for mut t in targets::all() {
        if target.as_deref().is_some_and(|name| name != t.name()) {
            continue;
        }
        ran += 1;
        let report = fuzzer.run(&mut *t, iterations, Some(Duration::from_secs(seconds)));
        println!("{report}");
        for finding in &report.findings {
            println!("  {} ({} bytes)", finding.what, finding.input.len());
        }
        found += report.findings.len();
    }
    assert!(ran > 0, "no target named {target:?} (--help)");
    if found > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
