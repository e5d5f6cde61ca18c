//! The language model from a GGUF file (llama.cpp's format, `llama` architecture), read through
//! `candle_core::quantized::gguf_file`: block-quantized matrices (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
//! Q6_K, ...) stay quantized in [`Linear`] layers of the same [`Llama`] decoder; f32, f16 and
//! bf16 tensors become f32.
//!
//! Before anything is read, [`GgufLlama::open`] checks the header: the architecture, the
//! hyper-parameters in the metadata, and every tensor the decoder needs (present, of a type we
//! read, of the shape the metadata implies, inside the file). Every refusal names the file and
//! the tensor or key.
//!
//! llama.cpp's converter reorders the rows of Q and K within each head, because its RoPE
//! rotates adjacent pairs (x₂ᵢ, x₂ᵢ₊₁) where HF's rotates x_i with x_{i+d/2}. The reorder is
//! undone here row by row on the stored blocks (rows are independent in every ggml type), so
//! the weights stay bit-exact and the decoder keeps one RoPE.

pub mod export;
mod header;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, RmsNorm};
use llamavid_kernels::cpu::{CpuKernels, Isa, IsaLimit};

use super::llama::{Llama, LlamaConfig, LlamaParam, LlamaWeights, TokenEmbedding};
use super::nn::{Linear, LoadContext, Precision};
use super::{ModelError, Result};
use crate::sync::lock;

/// The ggml types this loader reads (the ones candle reads and multiplies).
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
                                   Q4_K, Q5_K, Q6_K";

impl LlamaParam {
    /// The tensor's name in a llama.cpp GGUF file.
    pub fn gguf_name(self) -> String {
        match self {
            Self::Embed => "token_embd.weight".into(),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::InputNorm(i) => format!("blk.{i}.attn_norm.weight"),
            Self::Q(i) => format!("blk.{i}.attn_q.weight"),
            Self::K(i) => format!("blk.{i}.attn_k.weight"),
            Self::V(i) => format!("blk.{i}.attn_v.weight"),
            Self::O(i) => format!("blk.{i}.attn_output.weight"),
            Self::PostNorm(i) => format!("blk.{i}.ffn_norm.weight"),
            Self::Gate(i) => format!("blk.{i}.ffn_gate.weight"),
            Self::Up(i) => format!("blk.{i}.ffn_up.weight"),
            Self::Down(i) => format!("blk.{i}.ffn_down.weight"),
        }
    }
}

/// Rows of a Q or K matrix between llama.cpp's order and HF's: within each head of `d` rows,
/// GGUF row `2i + j` is HF row `j·d/2 + i`. `to_hf` undoes the converter's reorder; the
/// exporter applies it. Works on raw rows of `row_bytes` bytes (any ggml type).
pub(crate) fn reorder_rope_rows(
    data: &[u8],
    heads: usize,
    row_bytes: usize,
    to_hf: bool,
) -> Vec<u8> {
    let rows = data.len() / row_bytes;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let gguf = h * d + 2 * i + j;
                let hf = h * d + j * half + i;
                let (from, to) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    out
}

/// A GGUF file's header, checked for a LLaMA decoder, and the file to read tensors from.
pub struct GgufLlama {
    path: PathBuf,
    content: Content,
    file: Mutex<BufReader<File>>,
    config: LlamaConfig,
}

impl std::fmt::Debug for GgufLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufLlama")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}

fn meta_usize(value: &Value) -> Option<usize> {
    match *value {
        Value::U8(v) => Some(v as usize),
        Value::U16(v) => Some(v as usize),
        Value::U32(v) => Some(v as usize),
        Value::U64(v) => usize::try_from(v).ok(),
        Value::I8(v) => usize::try_from(v).ok(),
        Value::I16(v) => usize::try_from(v).ok(),
        Value::I32(v) => usize::try_from(v).ok(),
        Value::I64(v) => usize::try_from(v).ok(),
        _ => None,
    }
}

fn meta_f64(value: &Value) -> Option<f64> {
    match *value {
        Value::F32(v) => Some(v as f64),
        Value::F64(v) => Some(v),
        _ => None,
    }
}

impl GgufLlama {
    /// Reads and checks the header of `path` (no tensor data yet).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                what: "GGUF language model",
                path: path.to_owned(),
                hint: "point llm-gguf at a llama.cpp GGUF file".into(),
            });
        }
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| header::explain(path, e))?;
        let config = Self::read_config(path, &content)?;
        let this = Self {
            path: path.to_owned(),
            content,
            file: Mutex::new(reader),
            config,
        };
        this.check_tensors()?;
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoder's hyper-parameters, from the metadata (tied output when the file has no
    /// `output.weight`; vocabulary from `token_embd`).
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The metadata value under `key`.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// The ggml type of every tensor, by name.
    pub fn tensor_types(&self) -> HashMap<&str, GgmlDType> {
        self.content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name.as_str(), info.ggml_dtype))
            .collect()
    }

    fn read_config(path: &Path, content: &Content) -> Result<LlamaConfig> {
        let bad = |msg: String| ModelError::bad_file(path, msg);
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(arch)) => arch.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "general.architecture is not a string: {other:?}"
                )))
            }
            None => {
                return Err(bad(
                    "general.architecture is missing: not a llama.cpp model file".into(),
                ))
            }
        };
        if arch != "llama" {
            return Err(bad(format!(
                "architecture `{arch}` is not supported (only `llama`: LLaMA, Vicuna, SmolLM2, \
                 TinyLlama and their kin)"
            )));
        }
        let key = |name: &str| format!("llama.{name}");
        let uint = |name: &str| -> Result<Option<usize>> {
            match content.metadata.get(&key(name)) {
                None => Ok(None),
                Some(v) => meta_usize(v)
                    .map(Some)
                    .ok_or_else(|| bad(format!("metadata {}: not an integer: {v:?}", key(name)))),
            }
        };
        let float = |name: &str| -> Result<Option<f64>> {
            match content.metadata.get(&key(name)) {
                None => Ok(None),
                Some(v) => meta_f64(v)
                    .map(Some)
                    .ok_or_else(|| bad(format!("metadata {}: not a number: {v:?}", key(name)))),
            }
        };
        let required = |name: &str| -> Result<usize> {
            match uint(name)? {
                Some(v) if v > 0 => Ok(v),
                Some(_) => Err(bad(format!("metadata {} is 0", key(name)))),
                None => Err(bad(format!("metadata {} is missing", key(name)))),
            }
        };
        let hidden = required("embedding_length")?;
        let heads = required("attention.head_count")?;
        let kv_heads = uint("attention.head_count_kv")?.unwrap_or(heads);
        if !hidden.is_multiple_of(heads) || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "{} heads and {kv_heads} kv heads do not divide embedding_length {hidden}",
                heads
            )));
        }
        let head_dim = hidden / heads;
        if let Some(rot) = uint("rope.dimension_count")? {
            if rot != head_dim {
                return Err(bad(format!(
                    "llama.rope.dimension_count {rot} differs from the head size {head_dim}: \
                     partial rotary embeddings are not supported"
                )));
            }
        }
        if let Some(kind) = content.metadata.get("llama.rope.scaling.type") {
            if !matches!(kind, Value::String(s) if s == "none") {
                return Err(bad(format!("rope scaling {kind:?} is not supported")));
            }
        }
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(bad(
                "tensor `rope_freqs.weight`: scaled rotary frequencies (Llama 3.1 style) are not supported".into(),
            ));
        }
        // The vocabulary is the embedding's rows (or the output layer's, when the embedding
        // comes from elsewhere).
        let rows = |name: &str| {
            content
                .tensor_infos
                .get(name)
                .and_then(|t| t.shape.dims2().ok())
                .map(|(rows, _)| rows)
        };
        let vocab = match rows("token_embd.weight").or_else(|| rows("output.weight")) {
            Some(rows) => rows,
            None => uint("vocab_size")?.ok_or_else(|| ModelError::BadTensor {
                path: path.to_owned(),
                tensor: "token_embd.weight".into(),
                msg: "missing (and no output.weight or llama.vocab_size to size the vocabulary)"
                    .into(),
            })?,
        };
        let eps = float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            bad("metadata llama.attention.layer_norm_rms_epsilon is missing".into())
        })?;
        Ok(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: required("feed_forward_length")?,
            num_hidden_layers: required("block_count")?,
            num_attention_heads: heads,
            num_kv_heads: kv_heads,
            rms_norm_eps: eps,
            rope_theta: float("rope.freq_base")?.unwrap_or(10000.0),
            max_position_embeddings: required("context_length")?,
            vocab_size: vocab,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        })
    }

    /// The tensors the decoder reads, with their shapes (candle order: (out, in)).
    fn expected(&self) -> Vec<(LlamaParam, Vec<usize>)> {
        let c = &self.config;
        let (h, i, kv) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_kv_heads * c.head_dim(),
        );
        let mut out = vec![(LlamaParam::FinalNorm, vec![h])];
        // Without an output layer the embedding is also the output (tied), so it must be
        // here; otherwise it may come from the LLaMA-VID checkpoint.
        if c.tie_word_embeddings || self.content.tensor_infos.contains_key("token_embd.weight") {
            out.push((LlamaParam::Embed, vec![c.vocab_size, h]));
        }
        if !c.tie_word_embeddings {
            out.push((LlamaParam::LmHead, vec![c.vocab_size, h]));
        }
        for l in 0..c.num_hidden_layers {
            out.extend([
                (LlamaParam::InputNorm(l), vec![h]),
                (LlamaParam::Q(l), vec![h, h]),
                (LlamaParam::K(l), vec![kv, h]),
                (LlamaParam::V(l), vec![kv, h]),
                (LlamaParam::O(l), vec![h, h]),
                (LlamaParam::PostNorm(l), vec![h]),
                (LlamaParam::Gate(l), vec![i, h]),
                (LlamaParam::Up(l), vec![i, h]),
                (LlamaParam::Down(l), vec![h, i]),
            ]);
        }
        out
    }

    fn bad_tensor(&self, tensor: &str, msg: impl Into<String>) -> ModelError {
        ModelError::BadTensor {
            path: self.path.clone(),
            tensor: tensor.to_owned(),
            msg: msg.into(),
        }
    }

    fn check_tensors(&self) -> Result<()> {
        let file_len = std::fs::metadata(&self.path)
            .map_err(|e| ModelError::io(&self.path, e))?
            .len();
        for (param, shape) in self.expected() {
            let name = param.gguf_name();
            let Some(info) = self.content.tensor_infos.get(&name) else {
                return Err(self.bad_tensor(&name, "missing from the file"));
            };
            if info.shape.dims() != shape.as_slice() {
                return Err(self.bad_tensor(
                    &name,
                    format!(
                        "shape {:?}, expected {shape:?} from the metadata (rows, columns)",
                        info.shape.dims()
                    ),
                ));
            }
            if matches!(info.ggml_dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
                return Err(self.bad_tensor(
                    &name,
                    format!(
                        "type {:?} is an activation type, not a weight type (supported: {SUPPORTED_TYPES})",
                        info.ggml_dtype
                    ),
                ));
            }
            let block = info.ggml_dtype.block_size();
            let columns = *shape.last().unwrap_or(&0);
            if !columns.is_multiple_of(block) {
                return Err(self.bad_tensor(
                    &name,
                    format!(
                        "{columns} columns are not a multiple of the {:?} block of {block}",
                        info.ggml_dtype
                    ),
                ));
            }
            let bytes = (info.shape.elem_count() / block * info.ggml_dtype.type_size()) as u64;
            let end = self.content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(self.bad_tensor(
                    &name,
                    format!(
                        "its data ends at byte {end} but the file has {file_len}: the file is truncated"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.bad_tensor(name, "missing from the file"))
    }

    /// Reads one tensor onto `device`, Q and K rows in the HF order.
    pub fn tensor(&self, param: LlamaParam, device: &Device) -> Result<QTensor> {
        let name = param.gguf_name();
        let info = self.info(&name)?;
        let read = || -> candle_core::Result<QTensor> {
            let mut file = lock(&self.file);
            let heads = match param {
                LlamaParam::Q(_) => self.config.num_attention_heads,
                LlamaParam::K(_) => self.config.num_kv_heads,
                _ => return info.read(&mut *file, self.content.tensor_data_offset, device),
            };
            let stored = info.read(&mut *file, self.content.tensor_data_offset, &Device::Cpu)?;
            let (rows, _) = stored.shape().dims2()?;
            let data = stored.data()?;
            let hf = reorder_rope_rows(&data, heads, data.len() / rows, true);
            let storage = QStorage::from_data(hf.into(), device, stored.dtype())?;
            QTensor::new(storage, stored.shape().clone())
        };
        read().map_err(|e| self.bad_tensor(&name, format!("unreadable: {e}")))
    }

    /// A weight source for [`Llama::from_weights`], its layers built as `ctx` says;
    /// `fallback` provides the token embedding when the file has none.
    pub fn weights<'a>(
        &'a self,
        dtype: DType,
        device: &'a Device,
        ctx: &'a LoadContext,
        fallback: Option<&'a dyn LlamaWeights>,
    ) -> GgufWeights<'a> {
        GgufWeights {
            file: self,
            dtype,
            device,
            ctx,
            fallback,
        }
    }

    /// The whole decoder from this file, its layers built as `ctx` says; activations in f32
    /// on `device`. Run it (and the model) in the thread pool that is to compute.
    pub fn load(&self, ctx: &LoadContext, device: &Device) -> Result<Llama> {
        let weights = self.weights(DType::F32, device, ctx, None);
        Ok(Llama::from_weights(
            &self.config,
            &weights,
            DType::F32,
            device,
        )?)
    }
}

/// The context a GGUF decoder loaded on its own (tools, tests, benchmarks) runs with: our
/// CPU kernels up to `limit` (block products need no AMX, so it is never asked for), f32 for
/// the file's f32/f16 matrices.
pub fn cpu_context(limit: IsaLimit) -> LoadContext {
    let isa = Isa::detect(limit).narrow(IsaLimit::Avx512);
    LoadContext::cpu(Precision::F32, CpuKernels::new(isa))
}

/// [`LlamaWeights`] read from a [`GgufLlama`].
pub struct GgufWeights<'a> {
    file: &'a GgufLlama,
    /// Of the activations: the f32/f16/bf16 tensors (norms, dense embeddings) are converted.
    dtype: DType,
    device: &'a Device,
    ctx: &'a LoadContext,
    fallback: Option<&'a dyn LlamaWeights>,
}

fn to_candle(e: ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl GgufWeights<'_> {
    fn dense(&self, param: LlamaParam) -> candle_core::Result<Tensor> {
        let q = self.file.tensor(param, self.device).map_err(to_candle)?;
        q.dequantize(self.device)?.to_dtype(self.dtype)
    }
}

impl LlamaWeights for GgufWeights<'_> {
    fn linear(&self, param: LlamaParam, _in: usize, _out: usize) -> candle_core::Result<Linear> {
        let q = self.file.tensor(param, self.device).map_err(to_candle)?;
        self.ctx.gguf_linear(Arc::new(q))
    }

    fn context(&self) -> &LoadContext {
        self.ctx
    }

    fn rms_norm(&self, param: LlamaParam, _len: usize, eps: f64) -> candle_core::Result<RmsNorm> {
        Ok(RmsNorm::new(self.dense(param)?, eps))
    }

    fn embedding(&self, vocab: usize, hidden: usize) -> candle_core::Result<TokenEmbedding> {
        let name = LlamaParam::Embed.gguf_name();
        match self.file.content.tensor_infos.get(&name) {
            None => match self.fallback {
                Some(fallback) => fallback.embedding(vocab, hidden),
                None => Err(to_candle(
                    self.file.bad_tensor(&name, "missing from the file"),
                )),
            },
            Some(info) => match info.ggml_dtype {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Ok(TokenEmbedding::Dense(
                    Embedding::new(self.dense(LlamaParam::Embed)?, hidden),
                )),
                _ => {
                    let q = self.file.tensor(LlamaParam::Embed, self.device);
                    Ok(TokenEmbedding::Quantized(Arc::new(q.map_err(to_candle)?)))
                }
            },
        }
    }
}
