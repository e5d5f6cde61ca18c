//! The scheduler's batching through the real model on the fixture (issue 10): what the
//! scheduler's thread runs (`CaptionEngine` for `LlamaVid`, and `LocalCaptions`, its continuous
//! batching of captions) must caption each stream exactly as that stream alone would:
//! frames of streams with different questions encoded in one call give each frame's own
//! tokens; captions of windows of different lengths, prompts and sampling, decoded together
//! (joining and leaving between steps), give each stream's own ids (greedy: exactly; seeded
//! sampling: exactly, the sampler is the stream's).

mod common;

use std::sync::{Arc, OnceLock};

use candle_core::{IndexOp, Tensor};
use common::{model_dir, reference_tensor};
use gstllamavid::captioner::backend::{CaptionBackend, LocalCaptions, Outcome, Report};
use gstllamavid::captioner::CaptionEngine;
use gstllamavid::model::preprocess::FrameView;
use gstllamavid::model::{
    Cancel, CaptionPrompt, GenerationParams, LlamaVid, LoadOptions, WeightFormat,
};

fn model() -> Arc<LlamaVid> {
    static MODEL: OnceLock<Arc<LlamaVid>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let mut options = LoadOptions::new(model_dir());
            options.weight_format = WeightFormat::Pickle;
            Arc::new(LlamaVid::load(&options).expect("fixture model loads"))
        })
        .clone()
}

/// The fixture's frames as packed RGB bytes, with their size.
fn frames() -> (Vec<Vec<u8>>, usize, usize) {
    let frames = reference_tensor("frames");
    let (count, h, w, _) = frames.dims4().unwrap();
    let data = (0..count)
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
    (data, w, h)
}

/// One stream: its question, the fixture frames of its window (in order), its sampling.
struct Stream {
    question: &'static str,
    window: Vec<usize>,
    params: GenerationParams,
}

fn streams() -> Vec<Stream> {
    let greedy = |max_new_tokens| GenerationParams {
        max_new_tokens,
        ..GenerationParams::default()
    };
    vec![
        Stream {
            question: "What is happening in this video?",
            window: vec![0, 1, 2],
            params: greedy(10),
        },
        Stream {
            question: "Which colours stand out?",
            window: vec![2],
            params: greedy(4),
        },
        Stream {
            question: "What is happening in this video?",
            window: vec![1, 0, 2, 1, 0],
            params: greedy(12),
        },
        Stream {
            question: "Is anyone there?",
            window: vec![0, 2],
            params: GenerationParams {
                max_new_tokens: 8,
                temperature: 0.8,
                top_p: 0.9,
                seed: 7,
            },
        },
    ]
}

/// Each stream's window of tokens (frames · tokens_per_frame, H), every frame encoded alone
/// with its stream's question.
fn windows_alone(m: &LlamaVid, streams: &[Stream], prompts: &[CaptionPrompt]) -> Vec<Tensor> {
    let (data, w, h) = frames();
    streams
        .iter()
        .zip(prompts)
        .map(|(s, prompt)| {
            let tokens: Vec<Tensor> = s
                .window
                .iter()
                .map(|&f| {
                    m.encode_frames(&[FrameView::packed_rgb(w, h, &data[f])], prompt)
                        .unwrap()
                        .squeeze(0)
                        .unwrap()
                })
                .collect();
            Tensor::cat(&tokens, 0).unwrap()
        })
        .collect()
}

/// The ids of each stream's caption generated alone (the one-sequence path).
fn ids_alone(
    m: &LlamaVid,
    streams: &[Stream],
    prompts: &[CaptionPrompt],
    windows: &[Tensor],
) -> Vec<Vec<u32>> {
    streams
        .iter()
        .zip(prompts)
        .zip(windows)
        .map(|((s, prompt), window)| {
            let embeddings = m.input_embeddings(prompt, window).unwrap();
            m.generate(&embeddings, &s.params, false, None)
                .unwrap()
                .token_ids
        })
        .collect()
}

#[test]
fn frames_of_streams_with_different_questions_encoded_together_are_each_frames_own() {
    let m = model();
    let streams = streams();
    let prompts: Vec<CaptionPrompt> = streams
        .iter()
        .map(|s| CaptionEngine::prepare(&*m, s.question).unwrap())
        .collect();
    let alone = windows_alone(&m, &streams, &prompts);
    let (data, w, h) = frames();
    // Every stream's window in ONE encode call, as the scheduler batches them.
    let mut batch: Vec<(FrameView, &CaptionPrompt)> = Vec::new();
    for (s, prompt) in streams.iter().zip(&prompts) {
        for &f in &s.window {
            batch.push((FrameView::packed_rgb(w, h, &data[f]), prompt));
        }
    }
    let results = CaptionEngine::encode_batch(&*m, &batch, Cancel::NEVER);
    assert_eq!(results.len(), batch.len());
    let mut results = results.into_iter();
    for (k, (s, alone)) in streams.iter().zip(&alone).enumerate() {
        let tokens: Vec<Tensor> = (0..s.window.len())
            .map(|_| results.next().unwrap().expect("frame encodes"))
            .collect();
        let together = Tensor::cat(&tokens, 0).unwrap();
        let err = common::max_abs(&(&together - alone).unwrap());
        assert!(err <= 1e-5, "stream {k}: batched tokens differ by {err:e}");
    }
}

#[test]
fn captions_stepped_together_give_each_stream_its_own_ids() {
    let m = model();
    let streams = streams();
    let prompts: Vec<CaptionPrompt> = streams
        .iter()
        .map(|s| CaptionEngine::prepare(&*m, s.question).unwrap())
        .collect();
    let windows = windows_alone(&m, &streams, &prompts);
    let expected = ids_alone(&m, &streams, &prompts, &windows);
    assert!(
        expected.iter().any(|ids| ids.len() >= 4),
        "the fixture writes captions of a few tokens at least: {expected:?}"
    );
    // Two streams start together; the third joins after two steps, the fourth after five
    // (a prefill beside the others' decode steps); each leaves when it is done.
    let start = |k: usize| {
        CaptionEngine::start_sequence(&*m, &windows[k], &prompts[k], &streams[k].params).unwrap()
    };
    let mut running = vec![(0, start(0)), (1, start(1))];
    let mut texts: Vec<Option<String>> = vec![None; streams.len()];
    let mut ids: Vec<Option<Vec<u32>>> = vec![None; streams.len()];
    let mut widest = 0;
    for step in 0.. {
        match step {
            2 => running.push((2, start(2))),
            5 => running.push((3, start(3))),
            _ => {}
        }
        if running.is_empty() {
            break;
        }
        assert!(step < 100, "captions never finished");
        widest = widest.max(running.len());
        let mut batch: Vec<_> = running.iter_mut().map(|(_, s)| s).collect();
        let done = CaptionEngine::step(&*m, &mut batch, Cancel::NEVER).unwrap();
        assert_eq!(done.len(), running.len());
        let mut kept = Vec::new();
        for ((k, sequence), text) in running.drain(..).zip(done) {
            match text {
                Some(text) => {
                    ids[k] = Some(sequence.token_ids().to_vec());
                    texts[k] = Some(text);
                }
                None => kept.push((k, sequence)),
            }
        }
        running = kept;
    }
    assert!(widest >= 3, "at most {widest} sequences ran together");
    for k in 0..streams.len() {
        assert_eq!(
            ids[k].as_deref(),
            Some(expected[k].as_slice()),
            "stream {k}: ids decoded together differ from the stream alone"
        );
        let text_alone = m.caption_from_ids(expected[k].clone()).unwrap().text;
        assert_eq!(texts[k].as_deref(), Some(text_alone.as_str()), "stream {k}");
    }
}

#[test]
fn the_schedulers_caption_backend_batches_and_captions_each_stream_as_alone() {
    // `LocalCaptions` is the code the scheduler's thread runs for captions: at most
    // `caption-batch` (here 3) step together, the others wait oldest first and join when one
    // leaves.
    let m = model();
    let streams = streams();
    let prompts: Vec<CaptionPrompt> = streams
        .iter()
        .map(|s| CaptionEngine::prepare(&*m, s.question).unwrap())
        .collect();
    let windows = windows_alone(&m, &streams, &prompts);
    let expected: Vec<String> = ids_alone(&m, &streams, &prompts, &windows)
        .into_iter()
        .map(|ids| m.caption_from_ids(ids).unwrap().text)
        .collect();
    let mut backend = LocalCaptions::new(m.clone(), 3);
    for (k, s) in streams.iter().enumerate() {
        backend
            .start(k as u64, &windows[k], &prompts[k], &s.params)
            .unwrap();
    }
    let mut texts: Vec<Option<(String, usize)>> = vec![None; streams.len()];
    let mut rounds = 0;
    while backend.ready() {
        rounds += 1;
        assert!(rounds < 100, "captions never finished");
        for report in backend.advance(Cancel::NEVER) {
            let Report::Finished(done) = report else {
                panic!("the local backend reports captions only: {report:?}");
            };
            let Outcome::Text(text) = done.outcome else {
                panic!("caption {}: {:?}", done.id, done.outcome);
            };
            texts[done.id as usize] = Some((text, done.batch));
        }
    }
    for (k, expected) in expected.iter().enumerate() {
        let (text, batch) = texts[k].clone().expect("every caption finished");
        assert_eq!(&text, expected, "stream {k}: batched caption differs");
        assert!((1..=3).contains(&batch), "stream {k}: batch {batch}");
    }
    assert!(
        texts.iter().flatten().any(|(_, batch)| *batch == 3),
        "no caption finished in a full batch: {texts:?}"
    );
}
