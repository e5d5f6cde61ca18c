//! The two tokens of a frame (LLaMA-VID section 6): a text-guided *context* token and a pooled
//! *content* token. Each step is its own method so that it reads like the equation it computes
//! and can be checked against the reference stage by stage.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::nn::{linear, Linear};

use super::cancel::Cancel;
use super::config::ContentPooling;
use super::qformer::{QFormer, QFormerConfig, TextGuidance};

/// `vlm_att_ln` is a plain `nn.LayerNorm`, hence PyTorch's default eps.
const VISION_LN_EPS: f64 = 1e-5;

/// `mm_projector`: `linear` or `mlp2x_gelu` (Linear, GELU, Linear).
pub enum MmProjector {
    Linear(Linear),
    Mlp2xGelu(Linear, Linear),
}

impl MmProjector {
    pub fn new(kind: Option<&str>, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        match kind {
            Some("linear") => Ok(Self::Linear(linear(in_dim, out_dim, vb)?)),
            _ => Ok(Self::Mlp2xGelu(
                linear(in_dim, out_dim, vb.pp("0"))?,
                linear(out_dim, out_dim, vb.pp("2"))?,
            )),
        }
    }
}

impl Module for MmProjector {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(l) => l.forward(x),
            Self::Mlp2xGelu(a, b) => b.forward(&a.forward(x)?.gelu_erf()?),
        }
    }
}

/// Sizes the token generator needs beyond the Q-Former's own.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub qformer: QFormerConfig,
    pub num_queries: usize,
    /// EVA width (`mm_hidden_size`).
    pub vision_width: usize,
    /// LLM width.
    pub llm_width: usize,
    pub grid: usize,
    pub pooling: ContentPooling,
    pub projector_type: Option<String>,
}

/// Everything between the vision features and the LLM: `vlm_att_*`, the Q-Former and the
/// `mm_projector`. `vb` points at the checkpoint's `model.` prefix.
pub struct TokenGenerator {
    vision_norm: LayerNorm,
    query_tokens: Tensor,
    qformer: QFormer,
    text_projector: Linear,
    key_projector: Linear,
    value_projector: Linear,
    mm_projector: MmProjector,
    pooling: ContentPooling,
    grid: usize,
    scale: f64,
}

impl TokenGenerator {
    pub fn new(cfg: &TokenConfig, vb: VarBuilder) -> Result<Self> {
        let (w, h, d) = (
            cfg.vision_width,
            cfg.qformer.bert.hidden_size,
            cfg.llm_width,
        );
        Ok(Self {
            vision_norm: layer_norm(w, VISION_LN_EPS, vb.pp("vlm_att_ln"))?,
            query_tokens: vb.get((1, cfg.num_queries, h), "vlm_att_query")?,
            qformer: QFormer::new(&cfg.qformer, vb.pp("vlm_att_encoder.bert"))?,
            text_projector: linear(h, w, vb.pp("vlm_att_projector"))?,
            key_projector: linear(w, w, vb.pp("vlm_att_key_projector"))?,
            value_projector: linear(w, d, vb.pp("vlm_att_val_projector"))?,
            mm_projector: MmProjector::new(
                cfg.projector_type.as_deref(),
                w,
                d,
                vb.pp("mm_projector"),
            )?,
            pooling: cfg.pooling,
            grid: cfg.grid,
            // One head over the full width.
            scale: (w as f64).powf(-0.5),
        })
    }

    /// Content tokens per frame (1 for the video checkpoints).
    pub fn content_tokens_per_frame(&self) -> usize {
        self.pooling.tokens_per_frame(self.grid)
    }

    /// Prepares the question ids for every frame to come.
    pub fn text_guidance(&self, qformer_ids: &[u32]) -> Result<TextGuidance> {
        self.qformer
            .text_guidance(&self.query_tokens, qformer_ids, None)
    }

    /// `vlm_att_ln(vis)`: the Q-Former's cross-attention input, CLS included.
    pub fn qformer_visual_input(&self, vision_features: &Tensor) -> Result<Tensor> {
        self.vision_norm.forward(vision_features)
    }

    /// Query rows of the Q-Former's last hidden state (B, Q, H).
    pub fn qformer_output(&self, guidance: &TextGuidance, visual_input: &Tensor) -> Result<Tensor> {
        self.qformer.forward(guidance, visual_input)
    }

    /// `text_q = vlm_att_projector(qf)` (B, Q, W).
    pub fn text_queries(&self, qformer_output: &Tensor) -> Result<Tensor> {
        self.text_projector.forward(qformer_output)
    }

    /// The raw patch features `V`: CLS dropped when the token count is odd (as the reference
    /// does for `mm_vision_select_feature = patch`), and no layer norm.
    pub fn patches(&self, vision_features: &Tensor) -> Result<Tensor> {
        let n = vision_features.dim(1)?;
        if n % 2 == 1 {
            vision_features.narrow(1, 1, n - 1)
        } else {
            Ok(vision_features.clone())
        }
    }

    /// `K = vlm_att_key_projector(V)` (B, N, W).
    pub fn context_keys(&self, patches: &Tensor) -> Result<Tensor> {
        self.key_projector.forward(patches)
    }

    /// `A = softmax(text_q · Kᵀ / sqrt(W))` over the patches (B, Q, N).
    pub fn context_attention(&self, text_queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
        let scores = (text_queries.matmul(&keys.t()?)? * self.scale)?;
        candle_nn::ops::softmax_last_dim(&scores)
    }

    /// `mean over queries of (A · V)` (B, W): the values are the raw patch features.
    pub fn context_pooled(&self, attention: &Tensor, patches: &Tensor) -> Result<Tensor> {
        attention.matmul(patches)?.mean(1)
    }

    /// `vlm_att_val_projector(pooled)` (B, D).
    pub fn context_tokens(&self, context_pooled: &Tensor) -> Result<Tensor> {
        self.value_projector.forward(context_pooled)
    }

    /// The patch features pooled for the content token(s) (B, k, W).
    pub fn content_pooled(&self, patches: &Tensor) -> Result<Tensor> {
        match self.pooling {
            ContentPooling::Mean => patches.mean_keepdim(1),
            ContentPooling::AllPatches => Ok(patches.clone()),
            ContentPooling::Grid(n) => {
                let (b, count, w) = patches.dims3()?;
                let g = self.grid;
                if count != g * g || !g.is_multiple_of(n) {
                    candle_core::bail!("grid:{n} pooling needs a square patch grid divisible by {n}, got {count} patches");
                }
                let k = g / n;
                patches
                    .reshape((b, g, g, w))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?
                    .avg_pool2d(k)?
                    .flatten_from(2)?
                    .transpose(1, 2)
            }
        }
    }

    /// `mm_projector(pooled)` (B, k, D).
    pub fn content_tokens(&self, content_pooled: &Tensor) -> Result<Tensor> {
        self.mm_projector.forward(content_pooled)
    }

    /// Vision features (B, 1 + N, W) to the frame tokens (B, 1 + k, D): context token first.
    pub fn forward(&self, guidance: &TextGuidance, vision_features: &Tensor) -> Result<Tensor> {
        self.forward_cancellable(guidance, vision_features, Cancel::NEVER)
    }

    /// [`Self::forward`], checking `cancel` between the Q-Former's layers.
    pub fn forward_cancellable(
        &self,
        guidance: &TextGuidance,
        vision_features: &Tensor,
        cancel: Cancel,
    ) -> Result<Tensor> {
        let visual_input = self.qformer_visual_input(vision_features)?;
        let qformer_output = self
            .qformer
            .forward_cancellable(guidance, &visual_input, cancel)?;
        let text_queries = self.text_queries(&qformer_output)?;
        let patches = self.patches(vision_features)?;
        let keys = self.context_keys(&patches)?;
        let (context_pooled, content_pooled) = if patches.device().is_cuda()
            && self.pooling == ContentPooling::Mean
        {
            // One fused kernel for attention, softmax and both poolings (kernels/compress).
            let pooled =
                llamavid_kernels::compress_with_scale(&text_queries, &keys, &patches, self.scale)?;
            (pooled.context, pooled.content.unsqueeze(1)?)
        } else {
            let attention = self.context_attention(&text_queries, &keys)?;
            (
                self.context_pooled(&attention, &patches)?,
                self.content_pooled(&patches)?,
            )
        };
        let context = self.context_tokens(&context_pooled)?;
        let content = self.content_tokens(&content_pooled)?;
        Tensor::cat(&[&context.unsqueeze(1)?, &content], 1)
    }
}
