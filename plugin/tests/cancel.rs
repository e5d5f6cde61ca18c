//! Cancellation reaches into a forward pass: a frame encode or a prefill stops at the next
//! layer boundary, so that a flush or PLAYING -> NULL waits for at most one layer (issue 9,
//! item 10). The probe counts the checks: it proves where the pass stopped, with no timing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use common::{model_dir, reference};
use gstllamavid::model::{Cancel, GenerationParams, LlamaVid, LoadOptions, ModelError};

fn model() -> LlamaVid {
    LlamaVid::load(&LoadOptions::new(model_dir())).expect("the fixture loads")
}

/// A probe that says "cancel" from its `at`-th question on, and counts the questions.
struct Probe {
    at: usize,
    asked: AtomicUsize,
}

impl Probe {
    fn new(at: usize) -> Self {
        Self {
            at,
            asked: AtomicUsize::new(0),
        }
    }

    fn ask(&self) -> bool {
        self.asked.fetch_add(1, Ordering::SeqCst) + 1 >= self.at
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

#[test]
fn an_encode_stops_at_the_layer_after_the_cancel() {
    let m = model();
    let prompt = m.prompt("What happens?").unwrap();
    let pixels = reference()["pixel_values"].clone();
    // Checks: once before the pass, before each EVA block, before each Q-Former layer.
    let never = Probe::new(usize::MAX);
    let ask = || never.ask();
    m.encode_pixels_cancellable(&pixels, &prompt, Cancel::on_probe(&ask))
        .expect("runs to the end");
    let checks = never.asked();
    let layers = m.vision().config().depth;
    assert!(
        checks > layers,
        "{checks} checks for {layers} EVA blocks and the Q-Former"
    );
    for at in [1, 2, layers + 1, checks] {
        let probe = Probe::new(at);
        let ask = || probe.ask();
        let result = m.encode_pixels_cancellable(&pixels, &prompt, Cancel::on_probe(&ask));
        assert!(
            matches!(result, Err(ModelError::Cancelled)),
            "at {at}: {result:?}"
        );
        assert_eq!(
            probe.asked(),
            at,
            "stopped at the first check after the cancel"
        );
    }
}

#[test]
fn a_prefill_stops_at_the_layer_after_the_cancel() {
    let m = model();
    let embeddings = reference()["inputs_embeds"].clone();
    let params = GenerationParams {
        max_new_tokens: 8,
        ..GenerationParams::default()
    };
    let layers = m.config().num_hidden_layers;
    // Cancelled before the second layer of the prefill: one layer ran.
    let probe = Probe::new(2);
    let ask = || probe.ask();
    let result = m.generate_cancellable(&embeddings, &params, false, Cancel::on_probe(&ask));
    assert!(matches!(result, Err(ModelError::Cancelled)), "{result:?}");
    assert_eq!(probe.asked(), 2);
    // Cancelled in the first decode step: the prefill's layers and one more check.
    let probe = Probe::new(layers + 1);
    let ask = || probe.ask();
    let result = m.generate_cancellable(&embeddings, &params, false, Cancel::on_probe(&ask));
    assert!(matches!(result, Err(ModelError::Cancelled)), "{result:?}");
    assert_eq!(probe.asked(), layers + 1);
}

#[test]
fn a_flag_set_before_the_work_cancels_it_at_once() {
    let m = model();
    let prompt = m.prompt("What happens?").unwrap();
    let flag = AtomicBool::new(true);
    let frame = vec![128u8; 16 * 16 * 3];
    let view = gstllamavid::model::preprocess::FrameView::new(
        gstllamavid::model::preprocess::PixelFormat::Rgb,
        16,
        16,
        vec![&frame],
        vec![16 * 3],
    );
    let result = m.encode_frames_cancellable(&[view], &prompt, Cancel::on_flag(&flag));
    assert!(matches!(result, Err(ModelError::Cancelled)), "{result:?}");
    let video = Tensor::zeros((2, m.llm().hidden_size()), DType::F32, &Device::Cpu).unwrap();
    let caption = m.caption(&video, &prompt, &GenerationParams::default(), Some(&flag));
    assert!(matches!(caption, Err(ModelError::Cancelled)), "{caption:?}");
}
