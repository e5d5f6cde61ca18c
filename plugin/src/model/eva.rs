//! EVA-ViT-G as LLaMA-VID uses it (LAVIS `eva_vit_g.pth`): patch embedding, CLS and absolute
//! positions, pre-LN blocks, no final norm. Tensor names follow the LAVIS state dict.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use llamavid_kernels::cpu::vit::VitProfile;

use super::cancel::Cancel;
use super::nn::{fused_vit_block, linear, Linear, LoadContext};

/// Sizes of the tower. Width, patch size, grid and MLP width come from the weights; the head
/// count and the number of blocks used are not stored anywhere (see `VisionOverrides`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaConfig {
    pub width: usize,
    pub patch_size: usize,
    /// Patches per side of the square grid the position embedding was trained for.
    pub grid: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
}

impl EvaConfig {
    pub const LN_EPS: f64 = 1e-6;

    pub fn image_size(&self) -> usize {
        self.grid * self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.grid * self.grid
    }
}

/// `Conv2d(3, width, kernel = stride = patch)`, computed as one matrix product over the
/// non-overlapping patches (the same sums, without an im2col pass).
struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: usize,
}

impl PatchEmbed {
    fn new(cfg: &EvaConfig, vb: VarBuilder) -> Result<Self> {
        let p = cfg.patch_size;
        let weight = vb.get((cfg.width, 3, p, p), "proj.weight")?;
        let weight = weight.reshape((cfg.width, 3 * p * p))?.t()?.contiguous()?;
        let bias = vb.get(cfg.width, "proj.bias")?;
        Ok(Self {
            weight,
            bias,
            patch: p,
        })
    }

    /// (B, 3, H, W) pixels to (B, patches, width), patches in row-major order.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        // One product per frame: the matrix library picks its blocking (and so the order of
        // its sums) from the row count, and a frame's features must not change in the last
        // bit with the frames batched beside it: reduced-precision blocks round them again,
        // and one flipped rounding grew to 4e-2 in an int8 tower's output.
        let frames = (0..b)
            .map(|i| patches.get(i)?.matmul(&self.weight))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&frames, 0)?.broadcast_add(&self.bias)
    }
}

struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &EvaConfig, vb: VarBuilder, ctx: &LoadContext) -> Result<Self> {
        let w = cfg.width;
        let qkv_weight = vb.get((3 * w, w), "qkv.weight")?;
        // The key has no bias: the reference builds [q_bias ; 0 ; v_bias].
        let q_bias = vb.get(w, "q_bias")?;
        let v_bias = vb.get(w, "v_bias")?;
        let qkv_bias = Tensor::cat(&[&q_bias, &q_bias.zeros_like()?, &v_bias], 0)?;
        let head_dim = w / cfg.num_heads;
        Ok(Self {
            qkv: ctx.linear(qkv_weight, Some(qkv_bias)),
            proj: linear(w, w, vb.pp("proj"), ctx)?,
            num_heads: cfg.num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, w) = x.dims3()?;
        let h = self.num_heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, h, w / h))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * self.scale)?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w))?;
        self.proj.forward(&out)
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &EvaConfig, vb: VarBuilder, ctx: &LoadContext) -> Result<Self> {
        let w = cfg.width;
        Ok(Self {
            norm1: layer_norm(w, EvaConfig::LN_EPS, vb.pp("norm1"))?,
            attn: Attention::new(cfg, vb.pp("attn"), ctx)?,
            norm2: layer_norm(w, EvaConfig::LN_EPS, vb.pp("norm2"))?,
            mlp: Mlp {
                fc1: linear(w, cfg.mlp_hidden, vb.pp("mlp.fc1"), ctx)?,
                fc2: linear(cfg.mlp_hidden, w, vb.pp("mlp.fc2"), ctx)?,
            },
        })
    }

    fn forward(&self, x: &Tensor, profile: Option<&VitProfile>) -> Result<Tensor> {
        // On the CPU, the whole block runs in our kernels (no intermediate tensors; reduced
        // precision when the model was loaded so); elsewhere, the candle ops below.
        let attn = &self.attn;
        if let Some(out) = fused_vit_block(
            x,
            &self.norm1,
            &attn.qkv,
            &attn.proj,
            attn.num_heads,
            attn.scale,
            &self.norm2,
            &self.mlp.fc1,
            &self.mlp.fc2,
            profile,
        )? {
            return Ok(out);
        }
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

/// The vision tower: pixels (B, 3, S, S) to features (B, 1 + patches, width), CLS first.
pub struct EvaVit {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    cfg: EvaConfig,
    profile: Option<Arc<VitProfile>>,
}

impl EvaVit {
    pub fn new(cfg: &EvaConfig, vb: VarBuilder, ctx: &LoadContext) -> Result<Self> {
        let w = cfg.width;
        // The tower only ever runs whole frames (1 + patches rows each): its f32 weights can
        // live in the packed layout of the CPU's matrix library.
        let packed = ctx.packed_for(1 + cfg.num_patches());
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}")), &packed))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(cfg, vb.pp("patch_embed"))?,
            cls_token: vb.get((1, 1, w), "cls_token")?,
            pos_embed: vb.get((1, cfg.num_patches() + 1, w), "pos_embed")?,
            blocks,
            cfg: cfg.clone(),
            profile: ctx.vit_profile().cloned(),
        })
    }

    /// The first block's QKV projection (to say which kernels the tower's products take).
    pub fn first_qkv(&self) -> Option<&Linear> {
        self.blocks.first().map(|b| &b.attn.qkv)
    }

    /// The stage times of the fused blocks, when the model was loaded with profiling.
    pub fn profile(&self) -> Option<&VitProfile> {
        self.profile.as_deref()
    }

    pub fn config(&self) -> &EvaConfig {
        &self.cfg
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.forward_cancellable(pixels, Cancel::NEVER)
    }

    /// [`Self::forward`], checking `cancel` before every block.
    pub fn forward_cancellable(&self, pixels: &Tensor, cancel: Cancel) -> Result<Tensor> {
        let patches = self.patch_embed.forward(pixels)?;
        let b = patches.dim(0)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.width))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            cancel.check()?;
            x = block.forward(&x, self.profile.as_deref())?;
        }
        Ok(x)
    }
}
