//! The LLaMA decoder (HF `LlamaForCausalLM` layout): RMSNorm, rotate-half RoPE, SwiGLU MLP,
//! tied or untied `lm_head`, KV cache. It takes input embeddings, because LLaMA-VID splices the
//! frame tokens between embedded prompt tokens.
//!
//! The weights come through [`LlamaWeights`], by parameter rather than by file name: the HF
//! checkpoint ([`CheckpointWeights`]) or a GGUF file (`super::gguf`), whose quantized matrices
//! become quantized [`Linear`] layers of this same decoder.
//!
//! A forward pass may carry several sequences at once (a ragged batch: each with its own
//! cache and its own number of new rows, a prefill beside decode steps): the rows of all of
//! them go through every linear layer together (each weight is read once), attention runs per
//! sequence over its own cache and positions.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};

use super::cancel::Cancel;
use super::nn::{fused_llama_layer, linear_no_bias, Linear, LoadContext, SequenceSpan};

use super::config::LlavaConfig;

/// The decoder's hyper-parameters, from `config.json` or a GGUF file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl From<&LlavaConfig> for LlamaConfig {
    fn from(cfg: &LlavaConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads(),
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            max_position_embeddings: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            tie_word_embeddings: cfg.tie_word_embeddings,
        }
    }
}

/// One parameter of the decoder; each weight source maps it to its own tensor name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaParam {
    Embed,
    FinalNorm,
    LmHead,
    InputNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    PostNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl LlamaParam {
    /// The tensor's name in an HF `LlamaForCausalLM` checkpoint.
    pub fn hf_name(self) -> String {
        match self {
            Self::Embed => "model.embed_tokens.weight".into(),
            Self::FinalNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::InputNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
            Self::Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
            Self::K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
            Self::V(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
            Self::O(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
            Self::PostNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            Self::Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
            Self::Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
            Self::Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
        }
    }

    /// The parameters of layer `i`, in file order.
    pub fn of_layer(i: usize) -> [Self; 9] {
        [
            Self::InputNorm(i),
            Self::Q(i),
            Self::K(i),
            Self::V(i),
            Self::O(i),
            Self::PostNorm(i),
            Self::Gate(i),
            Self::Up(i),
            Self::Down(i),
        ]
    }
}

/// Where a [`Llama`] gets its weights. Shapes are (out, in) for matrices, as in PyTorch; Q and
/// K rows in the HF order (rotate-half RoPE). Each source builds its layers with the
/// [`LoadContext`] it was given.
pub trait LlamaWeights {
    /// A linear layer without bias, weight (out_dim, in_dim).
    fn linear(&self, param: LlamaParam, in_dim: usize, out_dim: usize) -> Result<Linear>;
    /// An RMSNorm of width `len`.
    fn rms_norm(&self, param: LlamaParam, len: usize, eps: f64) -> Result<RmsNorm>;
    /// The token embedding (vocab, hidden).
    fn embedding(&self, vocab: usize, hidden: usize) -> Result<TokenEmbedding>;
    /// The context the layers are built with (the tied `lm_head` is built with it too).
    fn context(&self) -> &LoadContext;
}

/// The HF checkpoint's tensors (`model.*` and `lm_head.*` under `vb`), the matrices built as
/// `ctx` says.
pub struct CheckpointWeights<'a> {
    pub vb: VarBuilder<'a>,
    pub ctx: &'a LoadContext,
}

impl LlamaWeights for CheckpointWeights<'_> {
    fn linear(&self, param: LlamaParam, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let name = param.hf_name();
        let prefix = name.strip_suffix(".weight").unwrap_or(&name);
        linear_no_bias(in_dim, out_dim, self.vb.pp(prefix), self.ctx)
    }

    fn rms_norm(&self, param: LlamaParam, len: usize, eps: f64) -> Result<RmsNorm> {
        let name = param.hf_name();
        rms_norm(
            len,
            eps,
            self.vb.pp(name.strip_suffix(".weight").unwrap_or(&name)),
        )
    }

    fn embedding(&self, vocab: usize, hidden: usize) -> Result<TokenEmbedding> {
        let e = embedding(vocab, hidden, self.vb.pp("model.embed_tokens"))?;
        Ok(TokenEmbedding::Dense(e))
    }

    fn context(&self) -> &LoadContext {
        self.ctx
    }
}

/// Token ids to vectors: a dense matrix, or quantized rows (a GGUF file's `token_embd`) that
/// are dequantized only for the ids looked up.
#[derive(Clone)]
pub enum TokenEmbedding {
    Dense(Embedding),
    Quantized(Arc<QTensor>),
}

impl TokenEmbedding {
    /// Ids (S,) to embeddings (S, H).
    fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let ids = Tensor::new(ids, device)?;
        match self {
            Self::Dense(e) => e.forward(&ids),
            Self::Quantized(q) => q.embedding(&ids),
        }
    }

    /// The same matrix as an output layer (tied `lm_head`), built as `ctx` says.
    fn tied_lm_head(&self, ctx: &LoadContext) -> Result<Linear> {
        match self {
            Self::Dense(e) => Ok(ctx.linear(e.embeddings().clone(), None)),
            Self::Quantized(q) => ctx.gguf_linear(q.clone()),
        }
    }
}

/// Rotary tables computed in f32 from the base, never from the checkpoint's rounded `inv_freq`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates (B, heads, S, head_dim) starting at absolute position `start`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let len = x.dim(2)?;
        let cos = self.cos.narrow(0, start, len)?;
        let sin = self.sin.narrow(0, start, len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &LlamaConfig, layer: usize, weights: &dyn LlamaWeights) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let kv = cfg.num_kv_heads * head_dim;
        Ok(Self {
            q_proj: weights.linear(LlamaParam::Q(layer), h, h)?,
            k_proj: weights.linear(LlamaParam::K(layer), h, kv)?,
            v_proj: weights.linear(LlamaParam::V(layer), h, kv)?,
            o_proj: weights.linear(LlamaParam::O(layer), h, h)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim,
        })
    }

    /// Attention of every sequence's rows of `x` (1, R, H) over its own cache: `spans` say
    /// which rows belong to which sequence (in order) and at which positions they sit, and
    /// `caches` (one per span) receive their keys and values.
    fn forward(
        &self,
        x: &Tensor,
        spans: &[SequenceSpan],
        rotary: &Rotary,
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (q_all, k_all, v_all) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        let mut outs = Vec::with_capacity(spans.len());
        let mut first = 0;
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let (len, start) = (span.rows, span.start);
            let heads = |t: &Tensor, heads: usize| {
                t.narrow(1, first, len)?
                    .reshape((1, len, heads, self.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = rotary.apply(&heads(&q_all, self.num_heads)?, start)?;
            let k = rotary.apply(&heads(&k_all, self.num_kv_heads)?, start)?;
            let v = heads(&v_all, self.num_kv_heads)?;
            let (k, v) = cache.write(&k, &v, start)?;
            outs.push(self.attend(&q, &k, &v, start)?);
            first += len;
        }
        let out = match outs.len() {
            1 => outs.pop().expect("one"),
            _ => Tensor::cat(&outs, 1)?,
        };
        self.o_proj.forward(&out)
    }

    /// One sequence's attention: queries (1, heads, S, d) at positions `start..start + S` over
    /// its keys and values (1, kv_heads, start + S, d); (1, S, heads · d).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Result<Tensor> {
        let len = q.dim(2)?;
        let repeat = self.num_heads / self.num_kv_heads;
        let (k, v) = if repeat > 1 {
            (repeat_kv(k, repeat)?, repeat_kv(v, repeat)?)
        } else {
            (k.clone(), v.clone())
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if len > 1 {
            scores = scores.broadcast_add(&causal_mask(len, start, q.dtype(), q.device())?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((1, len, ()))
    }
}

/// (B, kv_heads, S, d) to (B, kv_heads · n, S, d), each head repeated n times in place.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, heads, len, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, heads, n, len, d))?
        .reshape((b, heads * n, len, d))
}

/// Additive mask (len, start + len): new position i sees cached and new positions up to i.
fn causal_mask(len: usize, start: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = start + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, total), device)?.to_dtype(dtype)
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated =
            (candle_nn::ops::silu(&self.gate_proj.forward(x)?)? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, layer: usize, weights: &dyn LlamaWeights) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: weights.rms_norm(LlamaParam::InputNorm(layer), h, eps)?,
            self_attn: SelfAttention::new(cfg, layer, weights)?,
            post_attention_layernorm: weights.rms_norm(LlamaParam::PostNorm(layer), h, eps)?,
            mlp: Mlp {
                gate_proj: weights.linear(LlamaParam::Gate(layer), h, i)?,
                up_proj: weights.linear(LlamaParam::Up(layer), h, i)?,
                down_proj: weights.linear(LlamaParam::Down(layer), i, h)?,
            },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        spans: &[SequenceSpan],
        rotary: &Rotary,
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        // On the CPU, the whole layer runs in our kernels; elsewhere, the candle ops below.
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        let write = |i: usize, k: &Tensor, v: &Tensor| caches[i].write(k, v, spans[i].start);
        if let Some(out) = fused_llama_layer(
            x,
            spans,
            &rotary.cos,
            &rotary.sin,
            &self.input_layernorm,
            &attn.q_proj,
            &attn.k_proj,
            &attn.v_proj,
            &attn.o_proj,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            &self.post_attention_layernorm,
            &mlp.gate_proj,
            &mlp.up_proj,
            &mlp.down_proj,
            write,
        )? {
            return Ok(out);
        }
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, spans, rotary, caches)?;
        let x = (x + attended)?;
        &x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
    }
}

/// One layer's keys and values for one sequence: (1, kv_heads, capacity, head_dim) buffers,
/// taken from the model's [`KvBuffers`] on first use and given back to them when the cache is
/// dropped. A forward writes its rows after the sequence's committed length and the cache
/// commits them only once the whole forward succeeded, so a failed or cancelled pass leaves
/// the sequence as it was.
struct LayerCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    capacity: usize,
    buffers: Arc<KvBuffers>,
}

impl Drop for LayerCache {
    fn drop(&mut self) {
        for buffer in [self.keys.take(), self.values.take()].into_iter().flatten() {
            self.buffers.give_back(buffer);
        }
    }
}

/// The most bytes of key and value buffers [`KvBuffers`] keeps for later caches.
const KV_BUFFERS_KEPT_BYTES: usize = 512 << 20;

/// Key and value buffers of dropped caches, for the next caches to write into. A new buffer
/// is memory the kernel has to map and zero page by page on first touch: four captions'
/// caches cost a quarter of a four-caption prefill that way on a CPU (measured on the
/// cpu-bench model: 9 ms of 30 ms per layer). Reused buffers hold old values past the
/// positions written, and nothing reads them: every view of a cache ends at its length.
/// Keeps at most [`KV_BUFFERS_KEPT_BYTES`] (the memory of the largest batch of captions
/// decoded so far stays reserved up to that).
#[derive(Default)]
struct KvBuffers {
    free: std::sync::Mutex<Vec<Tensor>>,
}

impl KvBuffers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tensor>> {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A (1, heads, positions >= `capacity`, d) buffer like `like`: the smallest kept one that
    /// fits, else a new one.
    fn take(&self, like: &Tensor, capacity: usize) -> Result<Tensor> {
        let (b, heads, _, d) = like.dims4()?;
        let fits = |t: &Tensor| {
            t.dtype() == like.dtype()
                && t.device().same_device(like.device())
                && t.dims4()
                    .is_ok_and(|(tb, th, tc, td)| (tb, th, td) == (b, heads, d) && tc >= capacity)
        };
        let mut free = self.lock();
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, t)| fits(t))
            .min_by_key(|(_, t)| t.dim(2).unwrap_or(usize::MAX))
            .map(|(i, _)| i);
        match best {
            Some(i) => Ok(free.swap_remove(i)),
            None => {
                drop(free);
                Tensor::zeros((b, heads, capacity, d), like.dtype(), like.device())
            }
        }
    }

    fn give_back(&self, buffer: Tensor) {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut free = self.lock();
        let kept: usize = free.iter().map(bytes).sum();
        if kept + bytes(&buffer) <= KV_BUFFERS_KEPT_BYTES {
            free.push(buffer);
        }
    }
}

impl LayerCache {
    /// Writes `k`, `v` (1, kv_heads, n, d) at positions `at..at + n`; views of `0..at + n`.
    fn write(&mut self, k: &Tensor, v: &Tensor, at: usize) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        if at + n > self.capacity {
            candle_core::bail!(
                "the KV cache holds {} positions, {} asked for",
                self.capacity,
                at + n
            );
        }
        let (capacity, buffers) = (self.capacity, &self.buffers);
        let write = |buffer: &mut Option<Tensor>, src: &Tensor| -> Result<Tensor> {
            if buffer.is_none() {
                *buffer = Some(buffers.take(src, capacity)?);
            }
            let buffer = buffer.as_ref().expect("allocated");
            buffer.slice_set(&src.contiguous()?, 2, at)?;
            buffer.narrow(2, 0, at + n)
        };
        Ok((write(&mut self.keys, k)?, write(&mut self.values, v)?))
    }
}

/// Keys and values of every layer for one sequence being generated.
pub struct LlamaCache {
    layers: Vec<LayerCache>,
    /// Positions committed: written by forward passes that completed.
    len: usize,
    capacity: usize,
}

impl LlamaCache {
    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Makes the `rows` positions a forward wrote after the committed ones part of the cache.
    pub(crate) fn commit(&mut self, rows: usize) {
        self.len = (self.len + rows).min(self.capacity);
    }

    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies of every layer's keys and values at positions `0..len` (each (1, kv_heads, len,
    /// d)), for [`LlamaCache::start_with`] in other caches of the same model.
    pub(crate) fn copy_positions(&self, len: usize) -> Result<Vec<(Tensor, Tensor)>> {
        if len > self.len {
            candle_core::bail!("the cache holds {} positions, {len} asked for", self.len);
        }
        // `copy` after `contiguous`: a view that is contiguous already would share the
        // buffer, which goes back to the model's free buffers with this cache.
        let copy = |t: &Option<Tensor>| match t {
            Some(t) => t.narrow(2, 0, len)?.contiguous()?.copy(),
            None => candle_core::bail!("a layer of the cache was never written"),
        };
        self.layers
            .iter()
            .map(|layer| Ok((copy(&layer.keys)?, copy(&layer.values)?)))
            .collect()
    }

    /// Starts this empty cache with keys and values from [`LlamaCache::copy_positions`] of
    /// another cache of the same model: they become its first positions.
    pub(crate) fn start_with(&mut self, layers: &[(Tensor, Tensor)]) -> Result<()> {
        if self.len != 0 || layers.len() != self.layers.len() {
            candle_core::bail!(
                "keys and values of {} layers for a cache of {} layers holding {} positions",
                layers.len(),
                self.layers.len(),
                self.len
            );
        }
        let Some((first, _)) = layers.first() else {
            return Ok(());
        };
        let rows = first.dim(2)?;
        for (cache, (k, v)) in self.layers.iter_mut().zip(layers) {
            cache.write(k, v, 0)?;
        }
        self.commit(rows);
        Ok(())
    }
}

/// Which logits a forward pass computes: the `lm_head` over 32000 rows is the costliest
/// single product of a decode step, so only the rows that are read get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    LastPosition,
    AllPositions,
}

pub struct Llama {
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    /// The final norm and `lm_head`; `None` when only the embeddings were loaded.
    head: Option<(RmsNorm, Linear)>,
    rotary: Rotary,
    max_positions: usize,
    hidden: usize,
    device: Device,
    kv_buffers: Arc<KvBuffers>,
}

impl Llama {
    /// `vb` points at the checkpoint root (`model.*` and `lm_head.*`).
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder, ctx: &LoadContext) -> Result<Self> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let weights = CheckpointWeights { vb, ctx };
        Self::from_weights(&cfg.into(), &weights, dtype, &device)
    }

    /// Builds the decoder from any weight source; `dtype` and `device` are those of the
    /// activations (and of the rotary tables).
    pub fn from_weights(
        cfg: &LlamaConfig,
        weights: &dyn LlamaWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_tokens = weights.embedding(cfg.vocab_size, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.tied_lm_head(weights.context())?
        } else {
            weights.linear(LlamaParam::LmHead, h, cfg.vocab_size)?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, weights))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            head: Some((
                weights.rms_norm(LlamaParam::FinalNorm, h, cfg.rms_norm_eps)?,
                lm_head,
            )),
            rotary: Rotary::new(cfg, dtype, device)?,
            max_positions: cfg.max_position_embeddings,
            hidden: h,
            device: device.clone(),
            kv_buffers: Arc::default(),
        })
    }

    /// The token embedding table alone, for a language model that runs elsewhere: `embed`
    /// works, `forward` refuses.
    pub fn embeddings_only(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed = embedding(cfg.vocab_size, h, vb.pp("model").pp("embed_tokens"))?;
        Ok(Self {
            embed_tokens: TokenEmbedding::Dense(embed),
            layers: Vec::new(),
            head: None,
            rotary: Rotary::new(&cfg.into(), vb.dtype(), vb.device())?,
            max_positions: cfg.max_position_embeddings,
            hidden: h,
            device: vb.device().clone(),
            kv_buffers: Arc::default(),
        })
    }

    /// The first layer's query projection and the `lm_head` (to say which kernels the
    /// products take), when the decoder is loaded.
    pub fn sample_layers(&self) -> Option<(&Linear, &Linear)> {
        let first = self.layers.first()?;
        Some((&first.self_attn.q_proj, &self.head.as_ref()?.1))
    }

    /// Whether the decoder (layers, norm, `lm_head`) is loaded.
    pub fn has_decoder(&self) -> bool {
        self.head.is_some()
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// A cache for sequences of up to `capacity` positions (its buffers taken on first use).
    pub fn new_cache(&self, capacity: usize) -> LlamaCache {
        let capacity = capacity.clamp(1, self.max_positions);
        LlamaCache {
            layers: (0..self.layers.len())
                .map(|_| LayerCache {
                    keys: None,
                    values: None,
                    capacity,
                    buffers: self.kv_buffers.clone(),
                })
                .collect(),
            len: 0,
            capacity,
        }
    }

    /// Token ids (S,) to embeddings (1, S, H).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let dtype = self.rotary.cos.dtype();
        self.embed_tokens
            .forward(ids, &self.device)?
            .to_dtype(dtype)?
            .unsqueeze(0)
    }

    /// Runs embeddings (1, S, H) at the positions after the cache's, extending the cache.
    /// Returns logits (1, S or 1, vocab) and, when asked, every hidden state as HF reports
    /// them (the embeddings, the output of each layer but the last, the final normed state).
    pub fn forward(
        &self,
        embeddings: &Tensor,
        cache: &mut LlamaCache,
        logits_for: LogitsFor,
        hidden_states: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        self.forward_cancellable(embeddings, cache, logits_for, hidden_states, Cancel::NEVER)
    }

    /// [`Self::forward`], checking `cancel` before every layer. A cancelled or failed pass
    /// leaves the cache as it was.
    pub fn forward_cancellable(
        &self,
        embeddings: &Tensor,
        cache: &mut LlamaCache,
        logits_for: LogitsFor,
        hidden_states: Option<&mut Vec<Tensor>>,
        cancel: Cancel,
    ) -> Result<Tensor> {
        let mut steps = [SequenceStep { embeddings, cache }];
        let mut logits = self.forward_rows(&mut steps, logits_for, hidden_states, cancel)?;
        commit(&mut steps);
        Ok(logits.pop().expect("one sequence"))
    }

    /// One forward of several sequences at once (a ragged batch): each step's embeddings
    /// (1, S_i, H) run at the positions after its own cache's, and the caches are extended.
    /// Returns each sequence's logits (1, 1 or S_i, vocab). Every linear layer multiplies the
    /// rows of all sequences together; attention stays within each sequence. `cancel` is
    /// checked before every layer; a cancelled or failed pass leaves every cache as it was.
    pub fn forward_batch(
        &self,
        steps: &mut [SequenceStep<'_>],
        logits_for: LogitsFor,
        cancel: Cancel,
    ) -> Result<Vec<Tensor>> {
        let logits = self.forward_rows(steps, logits_for, None, cancel)?;
        commit(steps);
        Ok(logits)
    }

    /// [`Self::forward_batch`] without extending the caches: the new rows are written after
    /// each cache's length, and `commit` makes them part of it (for callers that have more
    /// to do, which may fail, before the step counts).
    pub(crate) fn forward_rows(
        &self,
        steps: &mut [SequenceStep<'_>],
        logits_for: LogitsFor,
        hidden_states: Option<&mut Vec<Tensor>>,
        cancel: Cancel,
    ) -> Result<Vec<Tensor>> {
        let Some((norm, lm_head)) = &self.head else {
            candle_core::bail!("the language model's decoder was not loaded (embeddings only)");
        };
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let mut spans = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            let (batch, len, hidden) = step.embeddings.dims3()?;
            if batch != 1 || hidden != self.hidden || len == 0 {
                candle_core::bail!(
                    "a sequence's input embeddings are (1, S > 0, {}), got {:?}",
                    self.hidden,
                    step.embeddings.dims()
                );
            }
            let start = step.cache.len;
            if start + len > self.max_positions {
                candle_core::bail!(
                    "sequence of {} positions exceeds the model's {} (shorten the window or the caption)",
                    start + len,
                    self.max_positions
                );
            }
            spans.push(SequenceSpan { rows: len, start });
        }
        let mut collected = hidden_states;
        let mut x = match steps {
            [one] => one.embeddings.clone(),
            _ => Tensor::cat(&steps.iter().map(|s| s.embeddings).collect::<Vec<_>>(), 1)?,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            cancel.check()?;
            if let Some(states) = collected.as_deref_mut() {
                states.push(x.clone());
            }
            let mut caches: Vec<&mut LayerCache> =
                steps.iter_mut().map(|s| &mut s.cache.layers[l]).collect();
            x = layer.forward(&x, &spans, &self.rotary, &mut caches)?;
        }
        // The rows whose logits are read: each sequence's last, or all of them.
        let x = match logits_for {
            LogitsFor::AllPositions => x,
            LogitsFor::LastPosition if spans.len() == 1 => x.narrow(1, spans[0].rows - 1, 1)?,
            LogitsFor::LastPosition => {
                let mut end = 0u32;
                let last: Vec<u32> = spans
                    .iter()
                    .map(|s| {
                        end += s.rows as u32;
                        end - 1
                    })
                    .collect();
                x.index_select(&Tensor::new(last.as_slice(), x.device())?, 1)?
            }
        };
        let x = norm.forward(&x)?;
        if let Some(states) = collected {
            states.push(x.clone());
        }
        let logits = lm_head.forward(&x)?.to_dtype(DType::F32)?;
        if spans.len() == 1 {
            return Ok(vec![logits]);
        }
        let mut first = 0;
        spans
            .iter()
            .map(|s| {
                let rows = match logits_for {
                    LogitsFor::AllPositions => s.rows,
                    LogitsFor::LastPosition => 1,
                };
                let part = logits.narrow(1, first, rows);
                first += rows;
                part
            })
            .collect()
    }
}

/// One sequence's part of a batched forward: its new rows and its cache.
pub struct SequenceStep<'a> {
    /// (1, S, H): a prefill of S rows, or a decode step's one row.
    pub embeddings: &'a Tensor,
    pub cache: &'a mut LlamaCache,
}

/// Makes the rows a forward wrote part of each sequence's cache.
fn commit(steps: &mut [SequenceStep<'_>]) {
    for step in steps {
        step.cache.commit(step.embeddings.dim(1).unwrap_or(0));
    }
}

/// The greedy continuation of `prompt`: `max_new` ids (EOS does not stop it, like llama.cpp's
/// `ignore_eos`), with the logits (vocab,) that chose each of them (the first row is the
/// prefill's last position). Ties go to the lowest id.
pub fn greedy_continuation(
    llm: &Llama,
    prompt: &[u32],
    max_new: usize,
) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt has no tokens");
    }
    let mut cache = llm.new_cache(prompt.len() + max_new);
    let mut logits = llm.forward(
        &llm.embed(prompt)?,
        &mut cache,
        LogitsFor::LastPosition,
        None,
    )?;
    let (mut ids, mut rows) = (Vec::with_capacity(max_new), Vec::with_capacity(max_new));
    while ids.len() < max_new {
        let row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let best = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32;
        rows.push(row);
        ids.push(best);
        if ids.len() < max_new {
            logits = llm.forward(
                &llm.embed(&[best])?,
                &mut cache,
                LogitsFor::LastPosition,
                None,
            )?;
        }
    }
    Ok((ids, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_only_future_positions() -> Result<()> {
        let mask = causal_mask(2, 3, DType::F32, &Device::Cpu)?;
        let rows: Vec<Vec<f32>> = mask.to_vec2()?;
        assert_eq!(rows[0][..4], [0.0; 4]);
        assert!(rows[0][4].is_infinite());
        assert_eq!(rows[1], vec![0.0; 5]);
        Ok(())
    }

    #[test]
    fn repeat_kv_repeats_each_head_in_place() -> Result<()> {
        let x = Tensor::arange(0f32, 4., &Device::Cpu)?.reshape((1, 2, 2, 1))?;
        let r: Vec<f32> = repeat_kv(&x, 2)?.flatten_all()?.to_vec1()?;
        assert_eq!(r, vec![0., 1., 0., 1., 2., 3., 2., 3.]);
        Ok(())
    }
}
