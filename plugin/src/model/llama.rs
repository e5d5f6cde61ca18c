//! The LLaMA decoder (HF `LlamaForCausalLM` layout): RMSNorm, rotate-half RoPE, SwiGLU MLP,
//! untied `lm_head`, KV cache. It takes input embeddings, because LLaMA-VID splices the frame
//! tokens between embedded prompt tokens.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};

use super::cancel::Cancel;
use super::nn::{fused_llama_layer, linear_no_bias, Linear};

use super::config::LlavaConfig;

/// Rotary tables computed in f32 from the base, never from the checkpoint's rounded `inv_freq`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &LlavaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let head_dim = cfg.hidden_size / cfg.num_attention_heads;
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
    fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_attention_heads;
        let kv = cfg.num_kv_heads() * head_dim;
        Ok(Self {
            q_proj: linear_no_bias(h, h, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(h, kv, vb.pp("k_proj"))?,
            v_proj: linear_no_bias(h, kv, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(h, h, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads(),
            head_dim,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rotary: &Rotary,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| {
            t.reshape((b, len, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rotary.apply(&split(self.q_proj.forward(x)?, self.num_heads)?, start)?;
        let k = rotary.apply(&split(self.k_proj.forward(x)?, self.num_kv_heads)?, start)?;
        let v = split(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let (k, v) = cache.append(&k, &v)?;
        let repeat = self.num_heads / self.num_kv_heads;
        let (k, v) = if repeat > 1 {
            (repeat_kv(&k, repeat)?, repeat_kv(&v, repeat)?)
        } else {
            (k, v)
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if len > 1 {
            scores = scores.broadcast_add(&causal_mask(len, start, x.dtype(), x.device())?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, len, ()))?;
        self.o_proj.forward(&out)
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
    fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: rms_norm(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(
                h,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp {
                gate_proj: linear_no_bias(h, i, mlp.pp("gate_proj"))?,
                up_proj: linear_no_bias(h, i, mlp.pp("up_proj"))?,
                down_proj: linear_no_bias(i, h, mlp.pp("down_proj"))?,
            },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rotary: &Rotary,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        // On the CPU, the whole layer runs in our kernels; elsewhere, the candle ops below.
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        if let Some(out) = fused_llama_layer(
            x,
            start,
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
            cache,
        )? {
            return Ok(out);
        }
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, start, rotary, cache)?;
        let x = (x + attended)?;
        &x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
    }
}

/// Keys and values of every layer for one sequence being generated.
pub struct LlamaCache {
    layers: Vec<KvCache>,
    len: usize,
}

impl LlamaCache {
    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    /// The final norm and `lm_head`; `None` when only the embeddings were loaded.
    head: Option<(RmsNorm, Linear)>,
    rotary: Rotary,
    max_positions: usize,
    hidden: usize,
}

impl Llama {
    /// `vb` points at the checkpoint root (`model.*` and `lm_head.*`).
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let model = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, h, model.pp("embed_tokens"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(h, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, model.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            head: Some((rms_norm(h, cfg.rms_norm_eps, model.pp("norm"))?, lm_head)),
            rotary: Rotary::new(cfg, vb.dtype(), vb.device())?,
            max_positions: cfg.max_position_embeddings,
            hidden: h,
        })
    }

    /// The token embedding table alone, for a language model that runs elsewhere: `embed`
    /// works, `forward` refuses.
    pub fn embeddings_only(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            embed_tokens: embedding(cfg.vocab_size, h, vb.pp("model").pp("embed_tokens"))?,
            layers: Vec::new(),
            head: None,
            rotary: Rotary::new(cfg, vb.dtype(), vb.device())?,
            max_positions: cfg.max_position_embeddings,
            hidden: h,
        })
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

    /// A cache for sequences of up to `capacity` positions (allocated on first use).
    pub fn new_cache(&self, capacity: usize) -> LlamaCache {
        let capacity = capacity.clamp(1, self.max_positions);
        LlamaCache {
            layers: (0..self.layers.len())
                .map(|_| KvCache::new(2, capacity))
                .collect(),
            len: 0,
        }
    }

    /// Token ids (S,) to embeddings (1, S, H).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, self.embed_tokens.embeddings().device())?;
        self.embed_tokens.forward(&ids)?.unsqueeze(0)
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

    /// [`Self::forward`], checking `cancel` before every layer. A cancelled pass leaves the
    /// cache part-filled: the sequence cannot go on.
    pub fn forward_cancellable(
        &self,
        embeddings: &Tensor,
        cache: &mut LlamaCache,
        logits_for: LogitsFor,
        hidden_states: Option<&mut Vec<Tensor>>,
        cancel: Cancel,
    ) -> Result<Tensor> {
        let Some((norm, lm_head)) = &self.head else {
            candle_core::bail!("the language model's decoder was not loaded (embeddings only)");
        };
        let len = embeddings.dim(1)?;
        let start = cache.len;
        if start + len > self.max_positions {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's {} (shorten the window or the caption)",
                start + len,
                self.max_positions
            );
        }
        let mut collected = hidden_states;
        let mut x = embeddings.clone();
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            cancel.check()?;
            if let Some(states) = collected.as_deref_mut() {
                states.push(x.clone());
            }
            x = layer.forward(&x, start, &self.rotary, layer_cache)?;
        }
        cache.len += len;
        let x = match logits_for {
            LogitsFor::LastPosition => x.narrow(1, len - 1, 1)?,
            LogitsFor::AllPositions => x,
        };
        let x = norm.forward(&x)?;
        if let Some(states) = collected {
            states.push(x.clone());
        }
        lm_head.forward(&x)?.to_dtype(DType::F32)
    }
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
