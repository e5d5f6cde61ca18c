//! The reduced-precision modes (bf16, int8) against the reference fixtures, stage by stage, on
//! every set of CPU kernels this machine can run (the portable ones always; AVX2, AVX-512 and
//! AMX where present: a line says which were skipped and why). Each stage is fed the reference
//! input of that stage, as the f32 tests are, and held to the bounds the README states for the
//! mode (section "Error of the fast modes").

mod common;

use std::io::Write;

use candle_core::{DType, Tensor};
use common::{ids, max_abs, model_dir, reference_tensor};
use gstllamavid::model::llama::LogitsFor;
use gstllamavid::model::{
    GenerationParams, IsaLimit, LlamaVid, LoadOptions, Precision, WeightFormat,
};
use llamavid_kernels::cpu::{CpuFeatures, Isa, HAS_MKL};

/// Error relative to max(1, max |reference|), the fixtures' measure.
fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    let ours = ours.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    max_abs(&(ours - &reference).unwrap()) / max_abs(&reference).max(1.0)
}

/// The README's bounds per stage: (stage, bf16, int8).
const BOUNDS: [(&str, f32, f32); 5] = [
    ("vision_features", 1e-2, 4e-2),
    ("qformer_output", 1e-2, 4e-2),
    ("video_tokens", 1.5e-2, 6e-2),
    ("logits", 3e-2, 8e-2),
    ("step_logits", 2e-2, 6e-2),
];

fn report(line: &str) {
    // The real stderr: visible in every `cargo test` run, not only with --nocapture.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Every limit whose kernels differ on this CPU, with a visible line for those it lacks.
fn limits() -> Vec<IsaLimit> {
    let mut seen: Vec<Isa> = Vec::new();
    let mut out = Vec::new();
    for limit in [
        IsaLimit::Portable,
        IsaLimit::Avx2,
        IsaLimit::Avx512,
        IsaLimit::Best,
    ] {
        let isa = Isa::detect(limit);
        // Without MKL, AMX serves nothing (the load does not ask for it).
        let isa = if HAS_MKL {
            isa
        } else {
            isa.narrow(IsaLimit::Avx512)
        };
        if seen.contains(&isa) {
            report(&format!(
                "skipped: bf16/int8 on the {limit} kernels: this CPU ({}) has nothing more than \
                 the kernels already tested",
                CpuFeatures::detect().describe()
            ));
            continue;
        }
        seen.push(isa);
        out.push(limit);
    }
    out
}

fn check(precision: Precision, limit: IsaLimit) {
    let mut options = LoadOptions::new(model_dir());
    options.weight_format = WeightFormat::Pickle;
    options.precision = precision;
    options.cpu_isa = limit;
    let model = LlamaVid::load(&options).expect("fixture loads");
    assert_eq!(model.precision(), precision, "{:?}", model.notes());
    let what = format!("{precision} on {}", model.compute());
    // The kernels the limit names, and nothing wider (issue 16: the AVX2 path runs no
    // AVX-512 kernel and no MKL GEMM, which would pick its own wider code).
    let paths = model.product_paths();
    let narrowed = match Isa::detect(limit) {
        isa if limit == IsaLimit::Avx2 && isa.avx2() => Some("avx2"),
        _ if limit == IsaLimit::Portable => Some("portable"),
        _ => None,
    };
    if let Some(name) = narrowed {
        for path in &paths {
            assert!(path.ends_with(&format!("({name})")), "{what}: {path}");
        }
    }
    report(&format!("{what}: {}", paths.join("; ")));
    let tg = model.token_generator();
    let qformer_ids = ids("qformer_input_ids");
    let question = common::prompt_json()["question"]
        .as_str()
        .unwrap()
        .to_owned();
    let prompt = model.prompt(&question).unwrap();
    let embeds = reference_tensor("inputs_embeds");
    let expected = ids("generated_ids");
    let (vision, qformer, tokens, logits) = model.install(|| {
        let vision = model
            .vision()
            .forward(&reference_tensor("pixel_values"))
            .unwrap();
        let guidance = tg.text_guidance(&qformer_ids).unwrap();
        let qformer = tg
            .qformer_output(&guidance, &reference_tensor("qformer_visual_input"))
            .unwrap();
        let tokens = model
            .encode_pixels(&reference_tensor("pixel_values"), &prompt)
            .unwrap();
        let mut cache = model.llm().new_cache(embeds.dim(1).unwrap());
        let logits = model
            .llm()
            .forward(&embeds, &mut cache, LogitsFor::AllPositions, None)
            .unwrap();
        (vision, qformer, tokens, logits)
    });
    let frames = tokens.dim(0).unwrap();
    let video = tokens.reshape((frames * 2, ())).unwrap();
    let params = GenerationParams {
        max_new_tokens: expected.len(),
        ..GenerationParams::default()
    };
    let generation = model.generate(&embeds, &params, true, None).unwrap();
    let steps = Tensor::stack(&generation.step_logits, 0).unwrap();

    let ours = [&vision, &qformer, &video, &logits];
    for ((stage, bf16, int8), ours) in BOUNDS.iter().zip(ours) {
        let bound = if precision == Precision::Bf16 {
            *bf16
        } else {
            *int8
        };
        let err = relative_error(ours, &reference_tensor(stage));
        report(&format!(
            "{what}: {stage} relative error {err:.2e} (bound {bound:.0e})"
        ));
        assert!(
            err <= bound,
            "{what}: {stage} error {err:e} exceeds {bound:e}"
        );
    }

    // Greedy ids: equal to the reference's, except that a step whose top-2 logits the reference
    // separates by less than our error there may pick the runner-up; the sequences then diverge
    // and nothing after it compares.
    let margins: Vec<f64> = common::meta_json()["greedy_top2_margins"]
        .as_array()
        .expect("meta.json has greedy_top2_margins")
        .iter()
        .map(|m| m.as_f64().unwrap())
        .collect();
    let reference_steps = reference_tensor("step_logits");
    let mut compared = 0;
    for (step, (&ours_id, &want)) in generation.token_ids.iter().zip(&expected).enumerate() {
        let step_err =
            max_abs(&(steps.get(step).unwrap() - reference_steps.get(step).unwrap()).unwrap())
                as f64;
        if ours_id != want {
            assert!(
                margins[step] < 2.0 * step_err,
                "{what}: step {step} picked {ours_id} instead of {want} although the reference's \
                 top-2 margin {} exceeds twice our logit error {step_err}",
                margins[step]
            );
            report(&format!(
                "{what}: greedy ids diverge at step {step} (reference margin {:.3}, our error \
                 {step_err:.3})",
                margins[step]
            ));
            break;
        }
        compared += 1;
    }
    if compared == expected.len() {
        let (_, bf16, int8) = BOUNDS[4];
        let bound = if precision == Precision::Bf16 {
            bf16
        } else {
            int8
        };
        let err = relative_error(&steps, &reference_steps);
        report(&format!(
            "{what}: all {compared} greedy ids equal; step_logits relative error {err:.2e} (bound \
             {bound:.0e})"
        ));
        assert!(
            err <= bound,
            "{what}: step_logits error {err:e} exceeds {bound:e}"
        );
    }
}

#[test]
fn bf16_stages_stay_within_the_stated_bounds() {
    for limit in limits() {
        check(Precision::Bf16, limit);
    }
}

#[test]
fn int8_stages_stay_within_the_stated_bounds() {
    for limit in limits() {
        check(Precision::Int8, limit);
    }
}
