//! Writes a LLaMA-VID checkpoint's language model as a llama.cpp GGUF file (candle's quantizers
//! and GGUF writer): the `llama` architecture's metadata and tensor names, Q and K rows in
//! llama.cpp's RoPE order, the vocabulary (from `tokenizer.model`, else `tokenizer.json`), and
//! the matrices at the chosen type. Norms stay f32, as llama.cpp keeps them.
//!
//! A matrix whose rows do not split into the type's blocks (K-quants need multiples of 256
//! columns) falls back as llama.cpp's `llama-quantize` does: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K
//! to Q8_0; when even 32 does not divide them, to f32 (llama-quantize takes f16, but llama.cpp
//! multiplies f16 weights with activations rounded to f16, which we do not: f32 is exact in
//! both, and such widths only occur in toy models). The report lists those tensors.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::reorder_rope_rows;
use crate::model::checkpoint::{Checkpoint, WeightFormat};
use crate::model::config::{read_json, LlavaConfig};
use crate::model::llama::{LlamaConfig, LlamaParam};
use crate::model::tokenizer::{LlamaTokenizer, PieceType, SentencePieceModel};
use crate::model::{ModelError, Result};

/// The types the exporter writes, by llama.cpp's names.
pub const EXPORT_TYPES: &str = "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k";

/// Parses a type name (`q4_k`, `Q8_0`, `f16`, ...).
pub fn parse_type(name: &str) -> std::result::Result<GgmlDType, String> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q4_k" | "q4_k_m" | "q4_k_s" => GgmlDType::Q4K,
        "q5_k" | "q5_k_m" | "q5_k_s" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        other => {
            return Err(format!(
                "unknown type {other:?} (expected one of {EXPORT_TYPES})"
            ))
        }
    })
}

/// What to write.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Type of the matrices (embedding included).
    pub weight_type: GgmlDType,
    /// Type of `output.weight`; default: Q6_K when `weight_type` has fewer bits (as llama.cpp's
    /// Q4_K_M does: the output layer is the most sensitive), else `weight_type`.
    pub output_type: Option<GgmlDType>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors written at another type than asked, with the type used.
    pub fallbacks: Vec<(String, GgmlDType)>,
}

/// llama.cpp's `general.file_type` (`llama_ftype`) for a file mostly of `t`.
fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        GgmlDType::Q8_1 | GgmlDType::Q8K => 7,
    }
}

/// The type a matrix of `columns` columns gets when `wanted` is asked for.
fn fitting_type(wanted: GgmlDType, columns: usize) -> GgmlDType {
    let mut t = wanted;
    if !columns.is_multiple_of(t.block_size()) {
        t = match t {
            GgmlDType::Q4K | GgmlDType::Q3K | GgmlDType::Q2K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
    }
    if !columns.is_multiple_of(t.block_size()) {
        t = GgmlDType::F32;
    }
    t
}

/// The vocabulary as llama.cpp's `llama` (SentencePiece) tokenizer reads it: pieces, scores and
/// token types, padded with unused pieces up to the model's rows.
struct Vocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    bos: u32,
    eos: u32,
    unk: u32,
}

fn piece_type_id(kind: PieceType) -> i32 {
    // llama.cpp's llama_token_type.
    match kind {
        PieceType::Normal => 1,
        PieceType::Unknown => 2,
        PieceType::Control => 3,
        PieceType::UserDefined => 4,
        PieceType::Unused => 5,
        PieceType::Byte => 6,
    }
}

fn read_vocab(model_dir: &Path, rows: usize) -> Result<Vocab> {
    let tokenizer = LlamaTokenizer::from_model_dir(model_dir)?;
    let spm_path = model_dir.join(LlamaTokenizer::MODEL_FILE);
    let mut vocab = Vocab {
        tokens: Vec::new(),
        scores: Vec::new(),
        types: Vec::new(),
        bos: tokenizer.bos_id(),
        eos: tokenizer.eos_id(),
        unk: 0,
    };
    if spm_path.is_file() {
        let spm = SentencePieceModel::from_file(&spm_path)?;
        for p in &spm.pieces {
            vocab.tokens.push(p.piece.clone());
            vocab.scores.push(p.score);
            vocab.types.push(piece_type_id(p.kind));
        }
        vocab.unk = spm.special_id(spm.trainer.unk_id).unwrap_or(0);
    } else {
        // tokenizer.json: a SentencePiece BPE orders its pieces by score, so -id keeps the
        // order llama.cpp merges by.
        let inner = tokenizer.inner();
        let added = inner.get_added_vocabulary();
        for id in 0..tokenizer.vocab_size() as u32 {
            let piece = tokenizer
                .id_to_token(id)
                .unwrap_or_else(|| format!("<unused{id}>"));
            let kind = if added.is_special_token(&piece) || piece == "<unk>" {
                if piece == "<unk>" {
                    vocab.unk = id;
                    PieceType::Unknown
                } else {
                    PieceType::Control
                }
            } else if is_byte_piece(&piece) {
                PieceType::Byte
            } else {
                PieceType::Normal
            };
            vocab.tokens.push(piece);
            vocab.scores.push(-(id as f32));
            vocab.types.push(piece_type_id(kind));
        }
    }
    if vocab.tokens.len() > rows {
        return Err(ModelError::bad_file(
            tokenizer.source(),
            format!(
                "the tokenizer has {} pieces but the embedding only {rows} rows",
                vocab.tokens.len()
            ),
        ));
    }
    while vocab.tokens.len() < rows {
        let id = vocab.tokens.len();
        vocab.tokens.push(format!("<unused{id}>"));
        vocab.scores.push(-1e9);
        vocab.types.push(piece_type_id(PieceType::Unused));
    }
    Ok(vocab)
}

fn is_byte_piece(piece: &str) -> bool {
    piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>')
}

/// Exports the language model of the LLaMA-VID model directory `model_dir` to `out`.
pub fn export_llm(model_dir: &Path, out: &Path, options: &ExportOptions) -> Result<ExportReport> {
    let config_path = model_dir.join("config.json");
    let llava: LlavaConfig = read_json(&config_path)?;
    llava.validate(&config_path)?;
    let cfg = LlamaConfig::from(&llava);
    let checkpoint = Checkpoint::open_model_dir(model_dir, WeightFormat::Auto)?;
    let vocab = read_vocab(model_dir, cfg.vocab_size)?;

    let output_type = options.output_type.unwrap_or(match options.weight_type {
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K => GgmlDType::Q6K,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => GgmlDType::Q8_0,
        other => other,
    });
    let mut params = vec![LlamaParam::Embed];
    for l in 0..cfg.num_hidden_layers {
        params.extend(LlamaParam::of_layer(l));
    }
    params.push(LlamaParam::FinalNorm);
    if !cfg.tie_word_embeddings {
        params.push(LlamaParam::LmHead);
    }

    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(params.len());
    let mut fallbacks = Vec::new();
    for param in params {
        let hf = param.hf_name();
        let w = checkpoint.load(&hf)?.to_dtype(DType::F32)?;
        let w = match param {
            LlamaParam::Q(_) | LlamaParam::K(_) => {
                let heads = if matches!(param, LlamaParam::Q(_)) {
                    cfg.num_attention_heads
                } else {
                    cfg.num_kv_heads
                };
                let (rows, cols) = w.dims2()?;
                let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
                let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
                let moved = reorder_rope_rows(&bytes, heads, cols * 4, false);
                let data: Vec<f32> = moved
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Tensor::from_vec(data, (rows, cols), &Device::Cpu)?
            }
            _ => w,
        };
        let wanted = match param {
            _ if w.rank() == 1 => GgmlDType::F32,
            LlamaParam::LmHead => output_type,
            _ => options.weight_type,
        };
        let t = fitting_type(wanted, *w.dims().last().unwrap_or(&1));
        let name = param.gguf_name();
        if t != wanted {
            fallbacks.push((name.clone(), t));
        }
        let q = QTensor::quantize(&w, t).map_err(|e| ModelError::BadTensor {
            path: checkpoint.origin().to_owned(),
            tensor: hf.clone(),
            msg: format!("cannot quantize to {t:?}: {e}"),
        })?;
        tensors.push((name, q));
    }

    let s = |v: &str| Value::String(v.to_owned());
    let u = |v: usize| Value::U32(v as u32);
    let name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "llama-vid".into());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", Value::String(name)),
        (
            "general.file_type",
            Value::U32(file_type(options.weight_type)),
        ),
        ("general.quantization_version", Value::U32(2)),
        (
            "general.alignment",
            Value::U32(gguf_file::DEFAULT_ALIGNMENT as u32),
        ),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.block_count", u(cfg.num_hidden_layers)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.rope.dimension_count", u(cfg.head_dim())),
        ("llama.attention.head_count", u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("llama.vocab_size", u(cfg.vocab_size)),
        ("tokenizer.ggml.model", s("llama")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vocab.tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(vocab.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(vocab.types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(vocab.bos)),
        ("tokenizer.ggml.eos_token_id", Value::U32(vocab.eos)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(vocab.unk)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let file = File::create(out).map_err(|e| ModelError::io(out, e))?;
    let mut writer = BufWriter::new(file);
    gguf_file::write(&mut writer, &meta_refs, &tensor_refs)
        .map_err(|e| ModelError::bad_file(out, format!("cannot write: {e}")))?;
    std::io::Write::flush(&mut writer).map_err(|e| ModelError::io(out, e))?;
    let bytes = std::fs::metadata(out)
        .map_err(|e| ModelError::io(out, e))?
        .len();
    Ok(ExportReport {
        tensors: tensors.len(),
        bytes,
        fallbacks,
    })
}
