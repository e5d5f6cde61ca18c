//! Each stage of the model against the reference implementation's tensors, fed with the
//! reference input of that stage, then the whole chain from raw frames to generated ids.
//!
//! Every test runs on three builds of the model (modules `fused`, `portable_kernels`,
//! `candle_layers` below), chosen by load options, with the same tolerances:
//! * the fused CPU kernels on everything this CPU has (the default);
//! * the fused CPU kernels forced to their portable versions (no SIMD path of ours), which
//!   proves the fallbacks a CPU without AVX2/AVX-512 runs;
//! * candle's ops instead of the fused ViT and LLaMA layers: the code the GPU runs.

mod common;

use std::sync::OnceLock;

use candle_core::{IndexOp, Tensor};
use common::{assert_close, ids, model_dir, reference_tensor, END_TO_END_TOL, STAGE_TOL};
use gstllamavid::model::preprocess::FrameView;
use gstllamavid::model::{
    CpuLayers, GenerationParams, IsaLimit, LlamaVid, LoadOptions, WeightFormat,
};

/// How the model under test computes.
#[derive(Clone, Copy)]
enum Variant {
    Fused,
    PortableKernels,
    CandleLayers,
    /// The AVX2 + FMA kernels (issue 16: what an AVX2 CPU without AVX-512 runs; the portable
    /// ones again on a CPU without AVX2).
    Avx2Kernels,
}

impl Variant {
    fn options(self, format: WeightFormat) -> LoadOptions {
        let mut options = LoadOptions::new(model_dir());
        options.weight_format = format;
        match self {
            Variant::Fused => {}
            Variant::PortableKernels => options.cpu_isa = IsaLimit::Portable,
            Variant::CandleLayers => options.cpu_layers = CpuLayers::Candle,
            Variant::Avx2Kernels => options.cpu_isa = IsaLimit::Avx2,
        }
        options
    }
}

fn model_for(variant: Variant) -> &'static LlamaVid {
    static MODELS: [OnceLock<LlamaVid>; 4] = [const { OnceLock::new() }; 4];
    MODELS[variant as usize].get_or_init(|| {
        LlamaVid::load(&variant.options(WeightFormat::Pickle))
            .expect("fixture model loads from the .bin shards")
    })
}

/// Generates one `#[test]` per stage test for each variant, in a module named after it.
macro_rules! for_each_variant {
    ($($test:ident),* $(,)?) => {
        mod fused {
            $(#[test] fn $test() { super::$test(super::Variant::Fused) })*
        }
        mod portable_kernels {
            $(#[test] fn $test() { super::$test(super::Variant::PortableKernels) })*
        }
        mod candle_layers {
            $(#[test] fn $test() { super::$test(super::Variant::CandleLayers) })*
        }
        mod avx2_kernels {
            $(#[test] fn $test() { super::$test(super::Variant::Avx2Kernels) })*
        }
    };
}

for_each_variant!(
    vision_tower_matches_reference,
    qformer_input_is_layer_normed_vision_features,
    qformer_matches_reference,
    context_token_path_matches_reference,
    content_token_path_matches_reference,
    frame_tokens_are_interleaved_context_then_content,
    prompt_ids_match_reference,
    input_embeddings_splice_video_tokens_at_image,
    llm_prefill_logits_and_hidden_states_match_reference,
    greedy_decoding_with_kv_cache_matches_reference,
    end_to_end_from_frames_to_caption,
    safetensors_copy_gives_the_same_model,
);

fn patches(m: &LlamaVid, vision_features: &Tensor) -> Tensor {
    m.token_generator().patches(vision_features).unwrap()
}

fn vision_tower_matches_reference(variant: Variant) {
    let ours = model_for(variant)
        .vision()
        .forward(&reference_tensor("pixel_values"))
        .unwrap();
    assert_close(
        "vision_features",
        &ours,
        &reference_tensor("vision_features"),
        STAGE_TOL,
    );
}

fn qformer_input_is_layer_normed_vision_features(variant: Variant) {
    let tg = model_for(variant).token_generator();
    let ours = tg
        .qformer_visual_input(&reference_tensor("vision_features"))
        .unwrap();
    assert_close(
        "qformer_visual_input",
        &ours,
        &reference_tensor("qformer_visual_input"),
        STAGE_TOL,
    );
}

fn qformer_matches_reference(variant: Variant) {
    let tg = model_for(variant).token_generator();
    let guidance = tg.text_guidance(&ids("qformer_input_ids")).unwrap();
    let ours = tg
        .qformer_output(&guidance, &reference_tensor("qformer_visual_input"))
        .unwrap();
    assert_close(
        "qformer_output",
        &ours,
        &reference_tensor("qformer_output"),
        STAGE_TOL,
    );
}

fn context_token_path_matches_reference(variant: Variant) {
    let tg = model_for(variant).token_generator();
    let text_queries = tg
        .text_queries(&reference_tensor("qformer_output"))
        .unwrap();
    assert_close(
        "text_queries",
        &text_queries,
        &reference_tensor("text_queries"),
        STAGE_TOL,
    );

    let v = patches(model_for(variant), &reference_tensor("vision_features"));
    let keys = tg.context_keys(&v).unwrap();
    assert_close(
        "context_keys",
        &keys,
        &reference_tensor("context_keys"),
        STAGE_TOL,
    );

    let attention = tg
        .context_attention(
            &reference_tensor("text_queries"),
            &reference_tensor("context_keys"),
        )
        .unwrap();
    assert_close(
        "context_attention_weights",
        &attention,
        &reference_tensor("context_attention_weights"),
        STAGE_TOL,
    );

    let pooled = tg
        .context_pooled(&reference_tensor("context_attention_weights"), &v)
        .unwrap();
    assert_close(
        "context_pooled",
        &pooled,
        &reference_tensor("context_pooled"),
        STAGE_TOL,
    );

    let tokens = tg
        .context_tokens(&reference_tensor("context_pooled"))
        .unwrap();
    assert_close(
        "context_tokens",
        &tokens,
        &reference_tensor("context_tokens"),
        STAGE_TOL,
    );
}

fn content_token_path_matches_reference(variant: Variant) {
    let tg = model_for(variant).token_generator();
    let pooled = tg
        .content_pooled(&patches(
            model_for(variant),
            &reference_tensor("vision_features"),
        ))
        .unwrap();
    assert_close(
        "content_pooled",
        &pooled.squeeze(1).unwrap(),
        &reference_tensor("content_pooled"),
        STAGE_TOL,
    );

    let tokens = tg
        .content_tokens(&reference_tensor("content_pooled").unsqueeze(1).unwrap())
        .unwrap();
    assert_close(
        "content_tokens",
        &tokens.squeeze(1).unwrap(),
        &reference_tensor("content_tokens"),
        STAGE_TOL,
    );
}

fn frame_tokens_are_interleaved_context_then_content(variant: Variant) {
    let m = model_for(variant);
    let guidance_prompt = m.prompt(&question()).unwrap();
    let tokens = m
        .encode_pixels(&reference_tensor("pixel_values"), &guidance_prompt)
        .unwrap();
    let frames = tokens.dim(0).unwrap();
    assert_eq!(
        tokens.dim(1).unwrap(),
        2,
        "a video checkpoint gives two tokens per frame"
    );
    let video = tokens.reshape((frames * 2, ())).unwrap();
    // Chained from the pixels through every encoding stage.
    assert_close(
        "video_tokens",
        &video,
        &reference_tensor("video_tokens"),
        END_TO_END_TOL,
    );
}

fn question() -> String {
    common::prompt_json()["question"]
        .as_str()
        .expect("question")
        .to_owned()
}

fn prompt_ids_match_reference(variant: Variant) {
    let prompt = model_for(variant).prompt(&question()).unwrap();
    let expected: Vec<i64> = reference_tensor("input_ids")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(prompt.input_ids, expected);
}

fn input_embeddings_splice_video_tokens_at_image(variant: Variant) {
    let m = model_for(variant);
    let prompt = m.prompt(&question()).unwrap();
    let ours = m
        .input_embeddings(&prompt, &reference_tensor("video_tokens"))
        .unwrap();
    assert_close(
        "inputs_embeds",
        &ours,
        &reference_tensor("inputs_embeds"),
        STAGE_TOL,
    );
}

fn llm_prefill_logits_and_hidden_states_match_reference(variant: Variant) {
    use gstllamavid::model::llama::LogitsFor;
    let llm = model_for(variant).llm();
    let embeds = reference_tensor("inputs_embeds");
    let mut cache = llm.new_cache(embeds.dim(1).unwrap());
    let mut states = Vec::new();
    let logits = llm
        .forward(
            &embeds,
            &mut cache,
            LogitsFor::AllPositions,
            Some(&mut states),
        )
        .unwrap();
    assert_close("logits", &logits, &reference_tensor("logits"), STAGE_TOL);
    let reference_states = reference_tensor("llm_hidden_states");
    assert_eq!(
        states.len(),
        reference_states.dim(0).unwrap(),
        "number of hidden states"
    );
    for (i, state) in states.iter().enumerate() {
        assert_close(
            &format!("llm_hidden_states[{i}]"),
            &state.squeeze(0).unwrap(),
            &reference_states.i(i).unwrap(),
            STAGE_TOL,
        );
    }
}

fn greedy(steps: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: steps,
        ..GenerationParams::default()
    }
}

fn greedy_decoding_with_kv_cache_matches_reference(variant: Variant) {
    let expected = ids("generated_ids");
    let generation = model_for(variant)
        .generate(
            &reference_tensor("inputs_embeds"),
            &greedy(expected.len()),
            true,
            None,
        )
        .unwrap();
    assert_eq!(generation.token_ids, expected);
    let logits = Tensor::stack(&generation.step_logits, 0).unwrap();
    assert_close(
        "step_logits",
        &logits,
        &reference_tensor("step_logits"),
        STAGE_TOL,
    );
}

fn frames() -> Vec<Vec<u8>> {
    let frames = reference_tensor("frames");
    (0..frames.dim(0).unwrap())
        .map(|t| {
            frames
                .i(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
        })
        .collect()
}

fn end_to_end_from_frames_to_caption(variant: Variant) {
    let m = model_for(variant);
    let reference_frames = reference_tensor("frames");
    let (_, h, w, _) = reference_frames.dims4().unwrap();
    let data = frames();
    let views: Vec<FrameView> = data
        .iter()
        .map(|d| FrameView::packed_rgb(w, h, d))
        .collect();

    let pixels = m.preprocess(&views).unwrap();
    assert_close(
        "pixel_values",
        &pixels,
        &reference_tensor("pixel_values"),
        1e-5,
    );

    let prompt = m.prompt(&question()).unwrap();
    let tokens = m.encode_frames(&views, &prompt).unwrap();
    let video = tokens
        .reshape((tokens.dim(0).unwrap() * tokens.dim(1).unwrap(), ()))
        .unwrap();
    let embeds = m.input_embeddings(&prompt, &video).unwrap();

    let expected = ids("generated_ids");
    let generation = m
        .generate(&embeds, &greedy(expected.len()), true, None)
        .unwrap();
    assert_eq!(
        generation.token_ids, expected,
        "generated ids from raw frames"
    );
    let logits = Tensor::stack(&generation.step_logits, 0).unwrap();
    assert_close(
        "step_logits (end to end)",
        &logits,
        &reference_tensor("step_logits"),
        END_TO_END_TOL,
    );

    let caption = m
        .caption(&video, &prompt, &greedy(expected.len()), None)
        .unwrap();
    let expected_text = common::prompt_json()["generated_text"]
        .as_str()
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(caption.text, expected_text);
}

fn safetensors_copy_gives_the_same_model(variant: Variant) {
    let options = variant.options(WeightFormat::Safetensors);
    let from_safetensors = LlamaVid::load(&options).expect("loads from model.safetensors");
    let pixels = reference_tensor("pixel_values");
    let prompt = from_safetensors.prompt(&question()).unwrap();
    let tokens = from_safetensors.encode_pixels(&pixels, &prompt).unwrap();
    let video = tokens.reshape((tokens.dim(0).unwrap() * 2, ())).unwrap();
    assert_close(
        "video_tokens (safetensors)",
        &video,
        &reference_tensor("video_tokens"),
        END_TO_END_TOL,
    );
    let embeds = reference_tensor("inputs_embeds");
    let expected = ids("generated_ids");
    let generation = from_safetensors
        .generate(&embeds, &greedy(expected.len()), false, None)
        .unwrap();
    assert_eq!(generation.token_ids, expected);
}

/// The load options really select the path each variant names (else the variants would test
/// the same code three times).
#[test]
fn each_variant_runs_the_path_it_names() {
    let paths = |v: Variant| model_for(v).product_paths().join("; ");
    assert!(
        paths(Variant::CandleLayers).contains("candle"),
        "{}",
        paths(Variant::CandleLayers)
    );
    let portable = paths(Variant::PortableKernels);
    assert!(!portable.contains("candle"), "{portable}");
    assert!(
        !portable.contains("avx"),
        "portable kernels use no extension: {portable}"
    );
    let fused = paths(Variant::Fused);
    assert!(!fused.contains("candle"), "{fused}");
    let avx2 = paths(Variant::Avx2Kernels);
    assert!(
        !avx2.contains("candle") && !avx2.contains("avx512"),
        "AVX2 kernels use no AVX-512: {avx2}"
    );
    if llamavid_kernels::cpu::Isa::detect(IsaLimit::Avx2).avx2() {
        assert!(avx2.contains("gemv (avx2)"), "{avx2}");
    }
    eprintln!("fused: {fused}\nportable: {portable}\navx2: {avx2}");
}
