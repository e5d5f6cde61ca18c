//! The language model from GGUF files: the exporter's output loads back into the same decoder
//! (f32 exactly as the reference, quantized types within their error), the LLaMA-VID model
//! takes its language model from a GGUF, and broken files are refused with the file and the
//! tensor named, never a panic. (llama.cpp itself checks these files in
//! `gguf_llama_cpp.rs`, run by `gst-tests/llama-cpp-check.sh`.)

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{assert_close, ids, model_dir, reference_tensor, STAGE_TOL};
use gstllamavid::model::gguf::export::{export_llm, ExportOptions};
use gstllamavid::model::gguf::{cpu_context, GgufLlama};
use gstllamavid::model::llama::{Llama, LlamaCache, LogitsFor, SequenceStep};
use gstllamavid::model::IsaLimit;
use gstllamavid::model::{Cancel, GenerationParams, LlamaVid, LoadOptions, ModelError};

/// The fixture's language model exported at `t`, once per type (kept for the whole run).
fn exported(t: GgmlDType) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let path = dir.path().join(format!("llm-{t:?}.gguf"));
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap();
    if !path.is_file() {
        let options = ExportOptions {
            weight_type: t,
            output_type: None,
        };
        export_llm(&model_dir(), &path, &options).expect("the fixture's LLM exports");
    }
    path
}

fn prefill_logits(llm: &Llama) -> Tensor {
    let embeds = reference_tensor("inputs_embeds");
    let mut cache = llm.new_cache(embeds.dim(1).unwrap());
    llm.forward(&embeds, &mut cache, LogitsFor::AllPositions, None)
        .unwrap()
}

#[test]
fn f32_export_reproduces_the_reference_decoder() {
    let file = GgufLlama::open(&exported(GgmlDType::F32)).unwrap();
    let cfg = file.config();
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers), (64, 2));
    assert!(!cfg.tie_word_embeddings, "the fixture has an lm_head");
    let llm = file
        .load(&cpu_context(IsaLimit::Best), &Device::Cpu)
        .unwrap();
    // The Q/K rows went to llama.cpp's order and back: any slip shows in every logit.
    assert_close(
        "logits (f32 GGUF)",
        &prefill_logits(&llm),
        &reference_tensor("logits"),
        STAGE_TOL,
    );
}

/// Quantized exports against the reference logits, max abs error relative to
/// max(1, max|reference|). The tiny fixture's widths (64, 172) do not split into 256-column
/// K-quant blocks, so q4_k falls back to Q5_0 (and the 172-column down projection to f16), as
/// llama.cpp's quantizer does. Measured: q8_0 2.7e-2, q4_k 1.6e-1 (random weights amplify
/// quantization error far more than trained ones); the bounds are about twice that, and a slip
/// in the row order or the block layout gives errors of the logits' own size (1).
#[test]
fn quantized_exports_stay_close_to_the_reference() {
    for (t, tol) in [(GgmlDType::Q8_0, 6e-2), (GgmlDType::Q4K, 3e-1)] {
        let file = GgufLlama::open(&exported(t)).unwrap();
        let types = file.tensor_types();
        assert_ne!(
            types["blk.0.attn_q.weight"],
            GgmlDType::F32,
            "{t:?} export is quantized"
        );
        let llm = file
            .load(&cpu_context(IsaLimit::Best), &Device::Cpu)
            .unwrap();
        assert_close(
            &format!("logits ({t:?} GGUF)"),
            &prefill_logits(&llm),
            &reference_tensor("logits"),
            tol,
        );
    }
}

#[test]
fn llamavid_takes_its_language_model_from_a_gguf() {
    let mut options = LoadOptions::new(model_dir());
    options.llm_gguf = Some(exported(GgmlDType::F32));
    let model = LlamaVid::load(&options).unwrap();
    let expected = ids("generated_ids");
    let params = GenerationParams {
        max_new_tokens: expected.len(),
        ..GenerationParams::default()
    };
    let generation = model
        .generate(&reference_tensor("inputs_embeds"), &params, true, None)
        .unwrap();
    assert_eq!(
        generation.token_ids, expected,
        "greedy ids through the GGUF LLM"
    );
    // And the prompt embeddings come from the GGUF's token_embd.
    let prompt = model
        .prompt("Describe what is happening in the video.")
        .unwrap();
    assert!(!prompt.input_ids.is_empty());

    // q8_0: the same greedy ids on the fixture (its top-2 margins are far above q8_0's error).
    options.llm_gguf = Some(exported(GgmlDType::Q8_0));
    let model = LlamaVid::load(&options).unwrap();
    let generation = model
        .generate(&reference_tensor("inputs_embeds"), &params, false, None)
        .unwrap();
    assert_eq!(
        generation.token_ids, expected,
        "greedy ids through the q8_0 GGUF LLM"
    );
}

/// Index of the largest value (the lowest on ties).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn last_row(logits: &Tensor) -> Vec<f32> {
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

/// `steps` greedy ids after the prompt embeddings, alone: (ids, the logits that chose them).
fn alone(llm: &Llama, prompt: &Tensor, steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = llm.new_cache(prompt.dim(1).unwrap() + steps);
    let mut x = prompt.clone();
    let (mut ids, mut rows) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let row = last_row(
            &llm.forward(&x, &mut cache, LogitsFor::LastPosition, None)
                .unwrap(),
        );
        ids.push(argmax(&row));
        rows.push(row);
        x = llm.embed(&ids[ids.len() - 1..]).unwrap();
    }
    (ids, rows)
}

/// The batched forward of the shared scheduler (issue 10) on block-quantized weights: three
/// sequences of different lengths, prefilled in one forward and then decoded together, get
/// each the ids and logits it gets alone, on the best and on the portable kernels. The block
/// products handle every row alone (each activation row quantized by itself), so the batch
/// changes nothing but the f32 order elsewhere in the layer.
#[test]
fn gguf_sequences_batched_match_each_alone() {
    let embeds = reference_tensor("inputs_embeds");
    let len = embeds.dim(1).unwrap();
    let prompts: Vec<Tensor> = [len, len - 7, 5]
        .iter()
        .map(|&n| embeds.narrow(1, 0, n).unwrap())
        .collect();
    let steps = 4;
    for t in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        for limit in [IsaLimit::Best, IsaLimit::Portable] {
            let file = GgufLlama::open(&exported(t)).unwrap();
            let llm = file.load(&cpu_context(limit), &Device::Cpu).unwrap();
            let expected: Vec<_> = prompts.iter().map(|p| alone(&llm, p, steps)).collect();
            let mut caches: Vec<LlamaCache> = prompts
                .iter()
                .map(|p| llm.new_cache(p.dim(1).unwrap() + steps))
                .collect();
            let mut inputs = prompts.clone();
            let mut ids: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
            for step in 0..steps {
                let mut batch: Vec<SequenceStep> = inputs
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(embeddings, cache)| SequenceStep { embeddings, cache })
                    .collect();
                let logits = llm
                    .forward_batch(&mut batch, LogitsFor::LastPosition, Cancel::NEVER)
                    .unwrap();
                for (i, l) in logits.iter().enumerate() {
                    let row = last_row(l);
                    let want = &expected[i].1[step];
                    let err = row
                        .iter()
                        .zip(want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        err <= 1e-5,
                        "{t:?} {limit}: sequence {i} step {step}: logits differ by {err:e}"
                    );
                    ids[i].push(argmax(&row));
                }
                inputs = ids
                    .iter()
                    .map(|s| llm.embed(&s[s.len() - 1..]).unwrap())
                    .collect();
            }
            for (i, (want, _)) in expected.iter().enumerate() {
                assert_eq!(&ids[i], want, "{t:?} {limit}: sequence {i} ids");
            }
        }
    }
}

// ---- bad input ----------------------------------------------------------------------------

/// The f32 export's header and tensors, to rewrite into broken files.
type Metadata = Vec<(String, Value)>;
type Tensors = Vec<(String, QTensor)>;

fn parts() -> (Metadata, Tensors) {
    let path = exported(GgmlDType::F32);
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    (meta, tensors)
}

fn write(path: &Path, meta: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let mut f = std::fs::File::create(path).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &m, &t).unwrap();
}

/// Opening `path` fails (no panic) with a message naming the file and containing `words`.
fn refused(path: &Path, words: &[&str]) -> ModelError {
    let result = std::panic::catch_unwind(|| GgufLlama::open(path));
    let err = result
        .expect("a broken GGUF must not panic")
        .expect_err("a broken GGUF must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "names the file: {msg}"
    );
    for w in words {
        assert!(msg.contains(w), "{msg:?} should contain {w:?}");
    }
    eprintln!("refused: {msg}");
    err
}

#[test]
fn truncated_files_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(exported(GgmlDType::F32)).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = refused(&cut, &["truncated", "tensor `"]);
    assert!(matches!(err, ModelError::BadTensor { .. }));
    std::fs::write(&cut, &bytes[..40]).unwrap();
    refused(&cut, &["truncated"]);
    std::fs::write(&cut, b"PK\x03\x04 this is a zip, not a gguf").unwrap();
    refused(&cut, &["not a GGUF file"]);
    // And a missing file.
    let missing = dir.path().join("absent.gguf");
    assert!(matches!(
        GgufLlama::open(&missing),
        Err(ModelError::MissingFile { .. })
    ));
}

#[test]
fn other_architectures_and_missing_metadata_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut meta, tensors) = parts();
    let arch = meta
        .iter_mut()
        .find(|(k, _)| k == "general.architecture")
        .unwrap();
    arch.1 = Value::String("gpt2".into());
    let path = dir.path().join("gpt2.gguf");
    write(&path, &meta, &tensors);
    refused(&path, &["architecture `gpt2` is not supported"]);

    let (mut meta, tensors) = parts();
    meta.retain(|(k, _)| k != "llama.attention.head_count");
    write(&path, &meta, &tensors);
    refused(&path, &["llama.attention.head_count is missing"]);
}

#[test]
fn missing_tensors_and_wrong_shapes_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    let (meta, mut tensors) = parts();
    tensors.retain(|(k, _)| k != "blk.1.ffn_up.weight");
    write(&path, &meta, &tensors);
    refused(&path, &["tensor `blk.1.ffn_up.weight`", "missing"]);

    let (meta, mut tensors) = parts();
    let slot = tensors
        .iter_mut()
        .find(|(k, _)| k == "blk.0.attn_k.weight")
        .unwrap();
    let wrong = Tensor::zeros((32, 64), DType::F32, &Device::Cpu).unwrap();
    slot.1 = QTensor::quantize(&wrong, GgmlDType::F32).unwrap();
    write(&path, &meta, &tensors);
    refused(
        &path,
        &[
            "tensor `blk.0.attn_k.weight`",
            "shape [32, 64], expected [64, 64]",
        ],
    );
}

#[test]
fn unsupported_quantization_types_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq.gguf");
    let mut bytes = std::fs::read(exported(GgmlDType::F32)).unwrap();
    // The tensor info is: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    let name = b"blk.1.attn_v.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header");
    let type_at = at + name.len() + 4 + 2 * 8;
    assert_eq!(
        bytes[type_at..type_at + 4],
        0u32.to_le_bytes(),
        "an f32 tensor"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes()); // IQ2_XXS
    std::fs::write(&path, &bytes).unwrap();
    refused(
        &path,
        &["tensor `blk.1.attn_v.weight`", "IQ2_XXS", "not supported"],
    );
}

#[test]
fn a_gguf_of_another_width_is_refused_by_the_llamavid_loader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.gguf");
    let (mut meta, tensors) = parts();
    let vocab = meta
        .iter_mut()
        .find(|(k, _)| k == "llama.vocab_size")
        .unwrap();
    vocab.1 = Value::U32(512);
    // Same file, but the LLaMA-VID config says another vocabulary: pretend by editing rows.
    let mut tensors = tensors;
    for (name, t) in tensors.iter_mut() {
        if name == "token_embd.weight" || name == "output.weight" {
            let bigger = Tensor::zeros((600, 64), DType::F32, &Device::Cpu).unwrap();
            *t = QTensor::quantize(&bigger, GgmlDType::F32).unwrap();
        }
    }
    write(&path, &meta, &tensors);
    let mut options = LoadOptions::new(model_dir());
    options.llm_gguf = Some(path.clone());
    let err = LlamaVid::load(&options).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("vocab_size") && msg.contains("600"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}
