//! Each stage of the model against the reference implementation's tensors, fed with the
//! reference input of that stage, then the whole chain from raw frames to generated ids.

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, model_dir, reference, END_TO_END_TOL, STAGE_TOL};
use gstllamavid::model::preprocess::FrameView;
use gstllamavid::model::{GenerationParams, LlamaVid, LoadOptions, WeightFormat};

fn model() -> &'static LlamaVid {
    static MODEL: OnceLock<LlamaVid> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut options = LoadOptions::new(model_dir());
        options.weight_format = WeightFormat::Pickle;
        LlamaVid::load(&options).expect("fixture model loads from the .bin shards")
    })
}

fn reference_tensor(name: &str) -> Tensor {
    static REFERENCE: OnceLock<std::collections::HashMap<String, Tensor>> = OnceLock::new();
    REFERENCE.get_or_init(reference)[name].clone()
}

fn ids(name: &str) -> Vec<u32> {
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

fn patches(vision_features: &Tensor) -> Tensor {
    model().token_generator().patches(vision_features).unwrap()
}

#[test]
fn vision_tower_matches_reference() {
    let ours = model()
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

#[test]
fn qformer_input_is_layer_normed_vision_features() {
    let tg = model().token_generator();
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

#[test]
fn qformer_matches_reference() {
    let tg = model().token_generator();
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

#[test]
fn context_token_path_matches_reference() {
    let tg = model().token_generator();
    let text_queries = tg
        .text_queries(&reference_tensor("qformer_output"))
        .unwrap();
    assert_close(
        "text_queries",
        &text_queries,
        &reference_tensor("text_queries"),
        STAGE_TOL,
    );

    let v = patches(&reference_tensor("vision_features"));
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

#[test]
fn content_token_path_matches_reference() {
    let tg = model().token_generator();
    let pooled = tg
        .content_pooled(&patches(&reference_tensor("vision_features")))
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

#[test]
fn frame_tokens_are_interleaved_context_then_content() {
    let m = model();
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

#[test]
fn prompt_ids_match_reference() {
    let prompt = model().prompt(&question()).unwrap();
    let expected: Vec<i64> = reference_tensor("input_ids")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(prompt.input_ids, expected);
}

#[test]
fn input_embeddings_splice_video_tokens_at_image() {
    let m = model();
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

#[test]
fn llm_prefill_logits_and_hidden_states_match_reference() {
    use gstllamavid::model::llama::LogitsFor;
    let llm = model().llm();
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

#[test]
fn greedy_decoding_with_kv_cache_matches_reference() {
    let expected = ids("generated_ids");
    let generation = model()
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

#[test]
fn end_to_end_from_frames_to_caption() {
    let m = model();
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

#[test]
fn safetensors_copy_gives_the_same_model() {
    let mut options = LoadOptions::new(model_dir());
    options.weight_format = WeightFormat::Safetensors;
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
    let _ = Device::Cpu;
}

#[test]
fn frames_encoded_together_with_their_own_prompts_equal_each_frame_alone() {
    // Issue 10: the scheduler encodes frames of several streams (several questions) in one
    // call; each frame's tokens must be those of the frame encoded alone with its prompt.
    let m = model();
    let reference_frames = reference_tensor("frames");
    let (_, h, w, _) = reference_frames.dims4().unwrap();
    let data = frames();
    let views: Vec<FrameView> = data
        .iter()
        .map(|d| FrameView::packed_rgb(w, h, d))
        .collect();
    let a = m.prompt(&question()).unwrap();
    let b = m.prompt("Which colours are there?").unwrap();
    let prompts: Vec<&gstllamavid::model::CaptionPrompt> = (0..views.len())
        .map(|i| if i % 2 == 0 { &a } else { &b })
        .collect();
    let together = m
        .encode_frames_each_cancellable(&views, &prompts, gstllamavid::model::Cancel::NEVER)
        .unwrap();
    assert_eq!(together.dim(0).unwrap(), views.len());
    for (i, view) in views.iter().enumerate() {
        let alone = m
            .encode_frames(std::slice::from_ref(view), prompts[i])
            .unwrap();
        assert_close(
            &format!("frame {i} with prompt {}", i % 2),
            &together.get(i).unwrap(),
            &alone.get(0).unwrap(),
            1e-5,
        );
    }
}
