//! The text-guided Q-Former (`vlm_att_encoder`): the LAVIS/InstructBLIP BERT variant whose
//! learned queries read the question and cross-attend to the frame on every other layer.
//! Tensor names follow `model.vlm_att_encoder.bert.*` of the checkpoint.

use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};

use super::cancel::Cancel;
use super::nn::{linear, Linear};

use super::config::BertConfig;

/// Layers `i` with `i % CROSS_ATTENTION_FREQ == 0` attend to the vision features.
const CROSS_ATTENTION_FREQ: usize = 2;
/// BERT's additive mask value for hidden positions (kept for fidelity; see `TextGuidance`).
const MASKED: f64 = -10000.0;

#[derive(Debug, Clone)]
pub struct QFormerConfig {
    pub bert: BertConfig,
    /// Rows of the word embedding: the vocabulary plus `[DEC]`.
    pub vocab_rows: usize,
    /// Width of the vision features it cross-attends to.
    pub encoder_width: usize,
}

/// Multi-head attention of BERT: separate query/key/value projections, scale 1/sqrt(head_dim).
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    num_heads: usize,
}

impl BertAttention {
    fn new(hidden: usize, kv_width: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            query: linear(hidden, hidden, vb.pp("query"))?,
            key: linear(kv_width, hidden, vb.pp("key"))?,
            value: linear(kv_width, hidden, vb.pp("value"))?,
            num_heads,
        })
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.num_heads, c / self.num_heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `rows` attend to `context`; `mask` is an additive (B or 1, 1, 1, context) bias.
    fn forward(&self, rows: &Tensor, context: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = rows.dims3()?;
        let q = self.heads(&self.query.forward(rows)?)?;
        let k = self.heads(&self.key.forward(context)?)?;
        let v = self.heads(&self.value.forward(context)?)?;
        let scale = ((c / self.num_heads) as f64).powf(-0.5);
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))
    }
}

/// `LayerNorm(dense(x) + residual)`, BERT's post-LN output block.
struct AddNorm {
    dense: Linear,
    norm: LayerNorm,
}

impl AddNorm {
    fn new(in_dim: usize, out_dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: linear(in_dim, out_dim, vb.pp("dense"))?,
            norm: layer_norm(out_dim, eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.norm.forward(&(self.dense.forward(x)? + residual)?)
    }
}

/// Feed-forward block: `AddNorm(GELU(intermediate(x)), x)`.
struct FeedForward {
    intermediate: Linear,
    output: AddNorm,
}

impl FeedForward {
    fn new(cfg: &BertConfig, vb: VarBuilder, intermediate: &str, output: &str) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            intermediate: linear(h, i, vb.pp(intermediate).pp("dense"))?,
            output: AddNorm::new(i, h, cfg.layer_norm_eps, vb.pp(output))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = self.intermediate.forward(x)?.gelu_erf()?;
        self.output.forward(&hidden, x)
    }
}

struct QFormerLayer {
    self_attention: BertAttention,
    self_output: AddNorm,
    cross_attention: Option<(BertAttention, AddNorm)>,
    /// FFN of the text rows.
    text_ffn: FeedForward,
    /// FFN of the query rows (separate weights).
    query_ffn: FeedForward,
}

impl QFormerLayer {
    fn new(cfg: &QFormerConfig, index: usize, vb: VarBuilder) -> Result<Self> {
        let b = &cfg.bert;
        let (h, heads, eps) = (b.hidden_size, b.num_attention_heads, b.layer_norm_eps);
        let cross_attention = if index.is_multiple_of(CROSS_ATTENTION_FREQ) {
            let vb = vb.pp("crossattention");
            Some((
                BertAttention::new(h, cfg.encoder_width, heads, vb.pp("self"))?,
                AddNorm::new(h, h, eps, vb.pp("output"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            self_attention: BertAttention::new(h, h, heads, vb.pp("attention.self"))?,
            self_output: AddNorm::new(h, h, eps, vb.pp("attention.output"))?,
            cross_attention,
            text_ffn: FeedForward::new(b, vb.clone(), "intermediate", "output")?,
            query_ffn: FeedForward::new(b, vb, "intermediate_query", "output_query")?,
        })
    }

    /// `x` is `[queries ; text]` (B, Q + L, H). When `keep_text` is false the text rows are
    /// dropped from the output (the last layer: nothing reads them).
    fn forward(
        &self,
        x: &Tensor,
        num_queries: usize,
        vision: &Tensor,
        mask: Option<&Tensor>,
        keep_text: bool,
    ) -> Result<Tensor> {
        let attended = self.self_attention.forward(x, x, mask)?;
        let x = self.self_output.forward(&attended, x)?;
        let len = x.dim(1)?;
        let mut queries = x.narrow(1, 0, num_queries)?;
        if let Some((attention, output)) = &self.cross_attention {
            let attended = attention.forward(&queries, vision, None)?;
            queries = output.forward(&attended, &queries)?;
        }
        let queries = self.query_ffn.forward(&queries)?;
        if !keep_text || len == num_queries {
            return Ok(queries);
        }
        let text = self
            .text_ffn
            .forward(&x.narrow(1, num_queries, len - num_queries)?)?;
        Tensor::cat(&[&queries, &text], 1)
    }
}

/// The question as the Q-Former sees it, prepared once per prompt: the embedded and
/// normalised `[queries ; text]` sequence that every frame starts from.
#[derive(Clone, Debug)]
pub struct TextGuidance {
    /// (1, Q + L, H).
    pub(crate) embeddings: Tensor,
    pub(crate) num_queries: usize,
    /// Additive attention bias (1, 1, 1, Q + L), `None` when every position is valid.
    pub(crate) mask: Option<Tensor>,
}

pub struct QFormer {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embedding_norm: LayerNorm,
    layers: Vec<QFormerLayer>,
    max_positions: usize,
}

impl QFormer {
    /// `vb` points at `model.vlm_att_encoder.bert`.
    pub fn new(cfg: &QFormerConfig, vb: VarBuilder) -> Result<Self> {
        let b = &cfg.bert;
        let emb = vb.pp("embeddings");
        let layers = (0..b.num_hidden_layers)
            .map(|i| QFormerLayer::new(cfg, i, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_rows, b.hidden_size, emb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                b.max_position_embeddings,
                b.hidden_size,
                emb.pp("position_embeddings"),
            )?,
            embedding_norm: layer_norm(b.hidden_size, b.layer_norm_eps, emb.pp("LayerNorm"))?,
            layers,
            max_positions: b.max_position_embeddings,
        })
    }

    /// Embeds the question ids (`[CLS] … [SEP]`, positions from 0) behind the learned query
    /// tokens (1, Q, H), which get no position embedding; both go through the embedding norm.
    /// `attention_mask` holds 1 for valid text positions (the queries are always valid).
    pub fn text_guidance(
        &self,
        query_tokens: &Tensor,
        text_ids: &[u32],
        attention_mask: Option<&[u32]>,
    ) -> Result<TextGuidance> {
        let device = query_tokens.device();
        let len = text_ids.len();
        if len > self.max_positions {
            candle_core::bail!(
                "question is {len} tokens long, the Q-Former takes at most {}",
                self.max_positions
            );
        }
        let ids = Tensor::new(text_ids, device)?.unsqueeze(0)?;
        let positions = Tensor::arange(0u32, len as u32, device)?.unsqueeze(0)?;
        let text = (self.word_embeddings.forward(&ids)?
            + self.position_embeddings.forward(&positions)?)?;
        let sequence = Tensor::cat(&[query_tokens, &text.to_dtype(query_tokens.dtype())?], 1)?;
        let embeddings = self.embedding_norm.forward(&sequence)?;
        let num_queries = query_tokens.dim(1)?;
        let mask = match attention_mask {
            Some(m) if m.contains(&0) => {
                let bias: Vec<f32> = std::iter::repeat_n(1u32, num_queries)
                    .chain(m.iter().copied())
                    .map(|v| (1.0 - v as f64) as f32 * MASKED as f32)
                    .collect();
                let n = bias.len();
                Some(Tensor::from_vec(bias, (1, 1, 1, n), device)?.to_dtype(query_tokens.dtype())?)
            }
            _ => None,
        };
        Ok(TextGuidance {
            embeddings,
            num_queries,
            mask,
        })
    }

    /// The query rows of the last hidden state (B, Q, H) for vision features (B, N, W) that
    /// already went through `vlm_att_ln`.
    pub fn forward(&self, guidance: &TextGuidance, vision: &Tensor) -> Result<Tensor> {
        self.forward_cancellable(guidance, vision, Cancel::NEVER)
    }

    /// [`Self::forward`], checking `cancel` before every layer.
    pub fn forward_cancellable(
        &self,
        guidance: &TextGuidance,
        vision: &Tensor,
        cancel: Cancel,
    ) -> Result<Tensor> {
        let b = vision.dim(0)?;
        let (_, len, hidden) = guidance.embeddings.dims3()?;
        let mut x = guidance
            .embeddings
            .broadcast_as((b, len, hidden))?
            .contiguous()?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            cancel.check()?;
            x = layer.forward(
                &x,
                guidance.num_queries,
                vision,
                guidance.mask.as_ref(),
                i != last,
            )?;
        }
        x.narrow(1, 0, guidance.num_queries)
    }
}
