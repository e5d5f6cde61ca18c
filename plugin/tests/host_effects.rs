//! Issue 9 item 6: the plugin's effects on the host process happen only as the load options
//! ask (README, "Effects on the host process"), and no environment variable changes how the
//! shipped code computes.

mod common;

use gstllamavid::model::{IsaLimit, LlamaVid, LoadOptions, Precision, WeightFormat};
use llamavid_kernels::cpu::{host, CpuFeatures, HAS_MKL};

fn load(configure: impl FnOnce(&mut LoadOptions)) -> LlamaVid {
    let mut options = LoadOptions::new(common::model_dir());
    options.weight_format = WeightFormat::Pickle;
    configure(&mut options);
    LlamaVid::load(&options).expect("fixture model loads")
}

/// One test, so that nothing else in this process applies an effect between the checks.
#[test]
fn host_effects_happen_only_when_the_load_options_ask() {
    assert_eq!(
        host::effects(),
        host::HostEffects {
            allocator_tuned: false,
            amx_requested: false
        },
        "nothing before the first load"
    );
    // Every opt-out: no allocator tuning, no AMX permission (bf16 limited to AVX-512), pool
    // threads at the caller's priority.
    let before = host::current_thread_nice();
    let model = load(|o| {
        o.precision = Precision::Bf16;
        o.tune_allocator = false;
        o.lower_thread_priority = false;
        o.cpu_isa = IsaLimit::Avx512;
    });
    let nice = model.install(host::current_thread_nice);
    assert_eq!(nice, before, "the pool kept the caller's priority");
    drop(model);
    assert_eq!(
        host::effects(),
        host::HostEffects {
            allocator_tuned: false,
            amx_requested: false
        },
        "the opt-outs were honoured"
    );

    // The defaults: the allocator is tuned; AMX is asked for only where products will run on
    // it: bf16 in the `mkl` build (MKL's GEMMs), int8 in any build, on a CPU with AMX.
    let model = load(|o| o.precision = Precision::Bf16);
    drop(model);
    let amx = CpuFeatures::detect().amx;
    assert_eq!(
        host::effects(),
        host::HostEffects {
            allocator_tuned: true,
            amx_requested: HAS_MKL && amx
        }
    );
    // int8 asks in every build: our AMX kernel runs its batched decode steps.
    let model = load(|o| o.precision = Precision::Int8);
    drop(model);
    assert_eq!(
        host::effects(),
        host::HostEffects {
            allocator_tuned: true,
            amx_requested: amx
        }
    );
}

/// The shipped code (kernels and model) reads no environment variable to decide how to
/// compute: the only reads allowed are the remote server's API key (a credential, documented)
/// and the Hugging Face hub's own variables (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN:
/// where model files come from, as every hub client reads them; documented in the README).
#[test]
fn no_environment_variable_changes_how_the_model_computes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let allowed = [
        "plugin/src/model/remote/client.rs",
        "plugin/src/hub/config.rs",
    ];
    let mut offenders = Vec::new();
    let mut stack = vec![root.join("plugin/src"), root.join("kernels/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&path).unwrap();
            // A file's unit tests (its `mod tests` at the end) are not shipped: they may read
            // CI=true to fail where a check could not run.
            let shipped = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default();
            let reads = shipped.contains("env::var") || shipped.contains("getenv");
            if reads && !allowed.contains(&relative.as_str()) {
                offenders.push(relative);
            }
        }
    }
    assert!(offenders.is_empty(), "environment reads in {offenders:?}");
}
