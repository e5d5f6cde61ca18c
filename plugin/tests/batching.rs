//! Model-side batching (issue 10) on the fixture: several caption sequences advanced in one
//! ragged forward give the same ids and logits as each alone, whatever their lengths and
//! whenever they join or leave; a batched encode of frames with different prompts gives the
//! same tokens as encoding them one by one, and a bad frame fails alone; cancelling one
//! sequence leaves the others as they were. Each test runs on the fused CPU kernels, on the
//! portable kernels and on candle's layers (the GPU's code); the decode-step tests and the
//! batched encode also in int8 (batched steps run on the AMX tiles where the CPU has them, one
//! sequence alone on `vpdpbusd`: exact integer sums either way, so the same logits).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{IndexOp, Tensor};
use common::{model_dir, reference_tensor};
use gstllamavid::model::preprocess::FrameView;
use gstllamavid::model::{
    Cancel, CaptionSequence, CpuLayers, FinishReason, FrameToEncode, GenerationParams, IsaLimit,
    LlamaVid, LoadOptions, ModelError, Precision, WeightFormat,
};

/// Logits of a sequence batched with others against the same sequence alone (f32): the
/// products see more rows (another kernel or blocking may add in another order), nothing else.
const BATCH_TOL: f32 = 1e-5;

#[derive(Clone, Copy)]
enum Variant {
    Fused,
    PortableKernels,
    CandleLayers,
    FusedInt8,
}

fn model_for(variant: Variant) -> &'static LlamaVid {
    static MODELS: [OnceLock<LlamaVid>; 4] = [const { OnceLock::new() }; 4];
    MODELS[variant as usize].get_or_init(|| load(variant))
}

/// A model of its own (its KV buffers used by no other test), on two threads whatever the
/// machine (a batched encode on the CPU runs its frames' vision towers side by side then).
fn load(variant: Variant) -> LlamaVid {
    load_on(variant, 2)
}

fn load_on(variant: Variant, threads: usize) -> LlamaVid {
    let mut options = LoadOptions::new(model_dir());
    options.weight_format = WeightFormat::Pickle;
    options.threads = Some(threads);
    match variant {
        Variant::Fused => {}
        Variant::PortableKernels => options.cpu_isa = IsaLimit::Portable,
        Variant::CandleLayers => options.cpu_layers = CpuLayers::Candle,
        Variant::FusedInt8 => options.precision = Precision::Int8,
    }
    LlamaVid::load(&options).expect("fixture model loads")
}

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
    };
}

for_each_variant!(
    sequences_batched_with_others_match_each_alone,
    a_sequence_cancelled_mid_forward_leaves_the_others_as_they_were,
    a_cancelled_step_advances_nobody_and_the_sequences_go_on,
    batched_encode_matches_frames_encoded_one_by_one,
    a_cache_in_a_longer_sequences_old_buffers_matches_a_fresh_one,
    reused_prompt_prefix_gives_the_whole_prefills_captions,
);

/// The decode steps and the batched encode in int8. Reduced precision rounds every block's
/// activations again, so a last-bit difference anywhere grows (one from the patch embedding's
/// product, whose blocking followed the batch's row count, came out 2e-2 in the tokens): a
/// frame encoded in a batch must give its tokens alone to the bit.
mod fused_int8 {
    use super::Variant::FusedInt8;

    #[test]
    fn sequences_batched_with_others_match_each_alone() {
        super::sequences_batched_with_others_match_each_alone(FusedInt8)
    }

    #[test]
    fn a_sequence_cancelled_mid_forward_leaves_the_others_as_they_were() {
        super::a_sequence_cancelled_mid_forward_leaves_the_others_as_they_were(FusedInt8)
    }

    #[test]
    fn a_cancelled_step_advances_nobody_and_the_sequences_go_on() {
        super::a_cancelled_step_advances_nobody_and_the_sequences_go_on(FusedInt8)
    }

    #[test]
    fn batched_encode_matches_frames_encoded_one_by_one() {
        super::batched_encode_matches_frames_encoded_one_by_one(FusedInt8)
    }

    #[test]
    fn reused_prompt_prefix_gives_the_whole_prefills_captions() {
        super::reused_prompt_prefix_gives_the_whole_prefills_captions(FusedInt8)
    }
}

fn params(max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        ..GenerationParams::default()
    }
}

/// Prefills of different lengths: the reference's prompt and video, shortened prefixes of it,
/// and one with the video rows reversed (another content, the same length).
fn inputs(m: &LlamaVid) -> Vec<(Tensor, GenerationParams)> {
    let full = reference_tensor("inputs_embeds")
        .to_dtype(m.dtype())
        .unwrap();
    let len = full.dim(1).unwrap();
    let reversed = {
        let rows: Vec<u32> = (0..len as u32).rev().collect();
        full.index_select(&Tensor::new(rows.as_slice(), full.device()).unwrap(), 1)
            .unwrap()
    };
    vec![
        (full.clone(), params(9)),
        (full.narrow(1, 0, len - 5).unwrap(), params(4)),
        (reversed, params(12)),
        (full.narrow(1, 0, len / 2).unwrap(), params(7)),
    ]
}

struct Alone {
    ids: Vec<u32>,
    logits: Vec<Tensor>,
}

fn alone(m: &LlamaVid, embeds: &Tensor, params: &GenerationParams) -> Alone {
    let g = m.generate(embeds, params, true, None).unwrap();
    Alone {
        ids: g.token_ids,
        logits: g.step_logits,
    }
}

fn assert_same(what: &str, seq: &CaptionSequence, expected: &Alone) {
    assert_eq!(seq.token_ids(), expected.ids, "{what}: ids");
    assert_eq!(seq.step_logits().len(), expected.logits.len(), "{what}");
    for (step, (ours, alone)) in seq.step_logits().iter().zip(&expected.logits).enumerate() {
        let err = common::max_abs(&(ours - alone).unwrap());
        assert!(
            err <= BATCH_TOL,
            "{what}: step {step}: logits differ from the sequence alone by {err:e}"
        );
    }
}

/// Steps all `active` sequences together until every one is finished.
fn run(m: &LlamaVid, sequences: &mut [CaptionSequence]) {
    while sequences.iter().any(|s| !s.is_finished()) {
        let mut batch: Vec<&mut CaptionSequence> = sequences.iter_mut().collect();
        m.step(&mut batch, Cancel::NEVER).unwrap();
    }
}

fn sequences_batched_with_others_match_each_alone(variant: Variant) {
    let m = model_for(variant);
    let inputs = inputs(m);
    let expected: Vec<Alone> = inputs.iter().map(|(e, p)| alone(m, e, p)).collect();
    // Sequences join at steps 0, 0, 2 and 3 (a prefill beside decode steps) and leave as they
    // finish (4, 7, 9 and 12 tokens).
    let joins = [0, 0, 2, 3];
    let mut sequences: Vec<CaptionSequence> = Vec::new();
    let mut step = 0;
    while step <= 3 || sequences.iter().any(|s| !s.is_finished()) {
        for (i, &at) in joins.iter().enumerate() {
            if at == step {
                let (embeds, params) = &inputs[i];
                let seq = m.start_sequence(embeds, params).unwrap();
                sequences.push(seq.keeping_step_logits());
            }
        }
        let mut batch: Vec<&mut CaptionSequence> =
            sequences.iter_mut().filter(|s| !s.is_finished()).collect();
        let rows: usize = batch.iter().map(|s| s.next_rows()).sum();
        assert!(rows > 0 || step > 3);
        m.step(&mut batch, Cancel::NEVER).unwrap();
        step += 1;
    }
    for (i, (seq, expected)) in sequences.iter().zip(&expected).enumerate() {
        assert_same(&format!("sequence {i}"), seq, expected);
        assert_ne!(seq.finish_reason(), Some(FinishReason::Cancelled));
    }
}

/// A sequence's cache may get the KV buffers a dropped, longer sequence wrote: what it reads
/// must end at its own positions, so it gives what it gave with fresh (zeroed) buffers.
fn a_cache_in_a_longer_sequences_old_buffers_matches_a_fresh_one(variant: Variant) {
    let m = load(variant);
    let inputs = inputs(&m);
    let (short, short_params) = &inputs[3];
    let (long, long_params) = &inputs[2];
    assert!(long.dim(1).unwrap() > short.dim(1).unwrap());
    assert!(long_params.max_new_tokens > short_params.max_new_tokens);
    // Fresh buffers, given back at the end: the short sequence's, then the long one's.
    let fresh = alone(&m, short, short_params);
    alone(&m, long, long_params);
    // A sequence of the short one's size takes back its own buffers (the smallest that fit),
    // so that the next one gets the long sequence's.
    let mut holder = m.start_sequence(short, short_params).unwrap();
    m.step(&mut [&mut holder], Cancel::NEVER).unwrap();
    let mut reused = m
        .start_sequence(short, short_params)
        .unwrap()
        .keeping_step_logits();
    run(&m, std::slice::from_mut(&mut reused));
    assert_same("in the long sequence's old buffers", &reused, &fresh);
}

/// Captions started from the kept keys and values of the prompt's text before the video
/// (`LlamaVid::start_caption`) give what the whole prefill gives: the first one, which
/// computes them, a later one, which reuses them, and two more that join a running batch
/// beside a sequence prefilled whole. Loading with the reuse off prefills them whole.
fn reused_prompt_prefix_gives_the_whole_prefills_captions(variant: Variant) {
    let m = load(variant);
    let prompt = m.prompt("What is happening in this video?").unwrap();
    let video = reference_tensor("video_tokens")
        .to_dtype(m.dtype())
        .unwrap();
    let rows = video.dim(0).unwrap();
    let reversed = {
        let order: Vec<u32> = (0..rows as u32).rev().collect();
        video
            .index_select(&Tensor::new(order.as_slice(), video.device()).unwrap(), 0)
            .unwrap()
    };
    let whole = |v: &Tensor| m.input_embeddings(&prompt, v).unwrap();
    let full_len = whole(&video).dim(1).unwrap();
    let (p9, p6) = (params(9), params(6));
    let expected = alone(&m, &whole(&video), &p9);
    let expected_reversed = alone(&m, &whole(&reversed), &p6);
    for label in ["first (computes the prefix)", "second (reuses it)"] {
        let mut seq = m
            .start_caption(&prompt, &video, &p9)
            .unwrap()
            .keeping_step_logits();
        assert!(
            seq.positions() > 0 && seq.next_rows() + seq.positions() == full_len,
            "{label}: starts after the prefix ({} + {} of {full_len} rows)",
            seq.positions(),
            seq.next_rows()
        );
        run(&m, std::slice::from_mut(&mut seq));
        assert_same(label, &seq, &expected);
    }
    // A whole prefill running; two captions from the prefix join it at the next step.
    let mut sequences = vec![m
        .start_sequence(&whole(&reversed), &p6)
        .unwrap()
        .keeping_step_logits()];
    m.step(&mut [&mut sequences[0]], Cancel::NEVER).unwrap();
    sequences.push(
        m.start_caption(&prompt, &video, &p9)
            .unwrap()
            .keeping_step_logits(),
    );
    sequences.push(
        m.start_caption(&prompt, &reversed, &p6)
            .unwrap()
            .keeping_step_logits(),
    );
    run(&m, &mut sequences);
    assert_same(
        "whole, beside prefix-started ones",
        &sequences[0],
        &expected_reversed,
    );
    assert_same("from the prefix, in a batch", &sequences[1], &expected);
    assert_same(
        "another window from the prefix",
        &sequences[2],
        &expected_reversed,
    );

    let mut options = LoadOptions::new(model_dir());
    options.weight_format = WeightFormat::Pickle;
    options.reuse_prompt_prefix = false;
    let off = LlamaVid::load(&options).unwrap();
    let seq = off.start_caption(&prompt, &video, &p9).unwrap();
    assert_eq!(
        (seq.positions(), seq.next_rows()),
        (0, full_len),
        "reuse off: whole prefill"
    );
}

fn a_sequence_cancelled_mid_forward_leaves_the_others_as_they_were(variant: Variant) {
    let m = model_for(variant);
    let inputs = inputs(m);
    let expected: Vec<Alone> = inputs[..3].iter().map(|(e, p)| alone(m, e, p)).collect();
    let mut sequences: Vec<CaptionSequence> = inputs[..3]
        .iter()
        .map(|(e, p)| m.start_sequence(e, p).unwrap().keeping_step_logits())
        .collect();
    let flag = Arc::new(AtomicBool::new(false));
    sequences[1].set_cancel_flag(flag.clone());
    // Two steps together, then sequence 1 is cancelled while the third step's forward runs
    // (the caller's probe sets its flag at the second layer).
    for _ in 0..2 {
        let mut batch: Vec<&mut CaptionSequence> = sequences.iter_mut().collect();
        m.step(&mut batch, Cancel::NEVER).unwrap();
    }
    let before: Vec<usize> = sequences.iter().map(|s| s.token_ids().len()).collect();
    let checks = AtomicUsize::new(0);
    let probe = || {
        if checks.fetch_add(1, Ordering::Relaxed) == 1 {
            flag.store(true, Ordering::Relaxed);
        }
        false
    };
    let mut batch: Vec<&mut CaptionSequence> = sequences.iter_mut().collect();
    m.step(&mut batch, Cancel::on_probe(&probe)).unwrap();
    assert_eq!(
        checks.load(Ordering::Relaxed),
        2,
        "the forward stopped at the layer after the flag was set"
    );
    assert_eq!(sequences[1].finish_reason(), Some(FinishReason::Cancelled));
    let after: Vec<usize> = sequences.iter().map(|s| s.token_ids().len()).collect();
    assert_eq!(after, before, "an interrupted step advances nobody");
    run(m, &mut sequences);
    assert_same("sequence 0", &sequences[0], &expected[0]);
    assert_same("sequence 2", &sequences[2], &expected[2]);
    assert_eq!(sequences[1].token_ids(), &expected[1].ids[..2]);
}

fn a_cancelled_step_advances_nobody_and_the_sequences_go_on(variant: Variant) {
    let m = model_for(variant);
    let inputs = inputs(m);
    let expected: Vec<Alone> = inputs[..2].iter().map(|(e, p)| alone(m, e, p)).collect();
    let mut sequences: Vec<CaptionSequence> = inputs[..2]
        .iter()
        .map(|(e, p)| m.start_sequence(e, p).unwrap().keeping_step_logits())
        .collect();
    let layers = m.config().num_hidden_layers;
    for cancel_at in [layers, 2] {
        // The prefill (first time) or a decode step (second time) cut at its last layer.
        let checks = AtomicUsize::new(0);
        let probe = || checks.fetch_add(1, Ordering::Relaxed) + 1 >= cancel_at;
        let mut batch: Vec<&mut CaptionSequence> = sequences.iter_mut().collect();
        let result = m.step(&mut batch, Cancel::on_probe(&probe));
        assert!(matches!(result, Err(ModelError::Cancelled)), "{result:?}");
        let positions: Vec<usize> = sequences.iter().map(|s| s.positions()).collect();
        let mut batch: Vec<&mut CaptionSequence> = sequences.iter_mut().collect();
        m.step(&mut batch, Cancel::NEVER).unwrap();
        let advanced: Vec<usize> = sequences.iter().map(|s| s.positions()).collect();
        for ((seq, p), a) in sequences.iter().zip(positions).zip(advanced) {
            assert!(
                a > p,
                "{seq:?}: the step after the cancelled one advanced it"
            );
        }
    }
    run(m, &mut sequences);
    assert_same("sequence 0", &sequences[0], &expected[0]);
    assert_same("sequence 1", &sequences[1], &expected[1]);
}

fn batched_encode_matches_frames_encoded_one_by_one(variant: Variant) {
    batched_encode_matches_one_by_one_on(model_for(variant))
}

/// On one thread, the CPU runs a batch's vision tower as one batch of frames (as a GPU does).
#[test]
fn batched_encode_on_one_thread_matches_frames_encoded_one_by_one() {
    for variant in [Variant::Fused, Variant::FusedInt8] {
        batched_encode_matches_one_by_one_on(&load_on(variant, 1));
    }
}

fn batched_encode_matches_one_by_one_on(m: &LlamaVid) {
    let frames = reference_tensor("frames");
    let (count, h, w, _) = frames.dims4().unwrap();
    let data: Vec<Vec<u8>> = (0..count)
        .map(|t| {
            frames
                .i(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let views: Vec<FrameView> = data
        .iter()
        .map(|d| FrameView::packed_rgb(w, h, d))
        .collect();
    let first = m.prompt("What is happening in this video?").unwrap();
    let second = m.prompt("Which colours stand out?").unwrap();
    let same_as_first = m.prompt("What is happening in this video?").unwrap();
    // A frame whose stride is shorter than its rows: refused, alone.
    let bad = FrameView::new(
        gstllamavid::model::preprocess::PixelFormat::Rgb,
        w,
        h,
        vec![&data[0]],
        vec![w],
    );
    let prompts = [&first, &second, &same_as_first];
    let mut batch: Vec<FrameToEncode> = Vec::new();
    for (i, view) in views.iter().enumerate() {
        for prompt in prompts {
            batch.push(FrameToEncode {
                frame: view.clone(),
                prompt,
            });
        }
        if i == 0 {
            batch.push(FrameToEncode {
                frame: bad.clone(),
                prompt: &first,
            });
        }
    }
    let results = m.encode_batch(&batch, Cancel::NEVER).unwrap();
    assert_eq!(results.len(), batch.len());
    for (item, result) in batch.iter().zip(&results) {
        let one = m.encode_frames(std::slice::from_ref(&item.frame), item.prompt);
        match (result, one) {
            (Ok(ours), Ok(one)) => {
                let one = one.squeeze(0).unwrap();
                let err = common::max_abs(&(ours - &one).unwrap());
                assert!(err <= BATCH_TOL, "batched tokens differ by {err:e}");
            }
            (Err(ModelError::InvalidInput(_)), Err(ModelError::InvalidInput(_))) => {}
            (ours, one) => panic!("batched {ours:?} but one by one {one:?}"),
        }
    }
    assert!(matches!(results[3], Err(ModelError::InvalidInput(_))));
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    // The two prompts guide the context token differently; the content token is the same.
    let (a, b) = (results[0].as_ref().unwrap(), results[1].as_ref().unwrap());
    assert!(common::max_abs(&(a.i(0).unwrap() - b.i(0).unwrap()).unwrap()) > 1e-4);
    assert!(common::max_abs(&(a.i(1).unwrap() - b.i(1).unwrap()).unwrap()) <= BATCH_TOL);
}
