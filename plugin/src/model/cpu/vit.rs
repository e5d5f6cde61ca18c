//! One pre-LN vision-transformer block (EVA's) run on flat f32 buffers: the same arithmetic as
//! the candle op sequence in `eva.rs`, without its intermediate tensors. Layer norms, softmax,
//! GELU and residual adds are single passes over the rows; the attention runs one task per
//! (frame, head), its two products reading Q, K and V in place inside the QKV output.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use super::{math, CpuLinear, Epilogue, Scratch, SharedMut};

/// Nanoseconds spent per stage of the fused blocks since the last `take_profile` (for the
/// benchmark's breakdown). The GELU and the residual adds are fused into the products.
static PROFILE: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
pub const PROFILE_STAGES: [&str; 6] = [
    "layer norms",
    "qkv",
    "attention",
    "proj + residual",
    "fc1 + gelu",
    "fc2 + residual",
];

/// Returns and resets the per-stage seconds of the fused ViT blocks.
pub fn take_profile() -> [f64; 6] {
    let mut out = [0.0; 6];
    for (o, p) in out.iter_mut().zip(&PROFILE) {
        *o = p.swap(0, Ordering::Relaxed) as f64 * 1e-9;
    }
    out
}

struct Stopwatch(Instant);

impl Stopwatch {
    fn lap(&mut self, stage: usize) {
        let now = Instant::now();
        PROFILE[stage].fetch_add((now - self.0).as_nanos() as u64, Ordering::Relaxed);
        self.0 = now;
    }
}

/// A layer norm's parameters.
pub struct Norm<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub eps: f32,
}

/// The weights of one block.
pub struct VitBlock<'a> {
    pub norm1: Norm<'a>,
    pub qkv: &'a CpuLinear,
    pub proj: &'a CpuLinear,
    pub norm2: Norm<'a>,
    pub fc1: &'a CpuLinear,
    pub fc2: &'a CpuLinear,
    pub num_heads: usize,
    /// Multiplies the attention scores (head_dim^-1/2).
    pub scale: f32,
}

impl VitBlock<'_> {
    /// `x` holds `batch` sequences of `tokens` rows of the block's width; updated in place:
    /// `x += attn(norm1(x)); x += fc2(gelu(fc1(norm2(x))))`.
    pub fn forward(&self, x: &mut [f32], batch: usize, tokens: usize) {
        let width = self.norm1.weight.len();
        let rows = batch * tokens;
        assert_eq!(x.len(), rows * width);
        let mut t = Stopwatch(Instant::now());
        let mut h = Scratch::<f32>::new(rows * width);
        math::layer_norm(
            x,
            self.norm1.weight,
            self.norm1.bias,
            self.norm1.eps,
            &mut h,
        );
        t.lap(0);
        let mut qkv = Scratch::<f32>::new(rows * 3 * width);
        self.qkv.forward_into(&h, rows, &mut qkv);
        t.lap(1);
        // Reduced-precision blocks also run the attention's two products in bf16.
        let attend = match self.qkv {
            CpuLinear::F32(_) => attention,
            _ => attention_bf16,
        };
        attend(
            &qkv,
            batch,
            tokens,
            width,
            self.num_heads,
            self.scale,
            &mut h,
        );
        t.lap(2);
        drop(qkv);
        self.proj.forward_with(&h, rows, x, Epilogue::Accumulate);
        t.lap(3);
        math::layer_norm(
            x,
            self.norm2.weight,
            self.norm2.bias,
            self.norm2.eps,
            &mut h,
        );
        t.lap(0);
        let mut mid = Scratch::<f32>::new(rows * self.fc1.out_features());
        self.fc1.forward_with(&h, rows, &mut mid, Epilogue::Gelu);
        t.lap(4);
        self.fc2.forward_with(&mid, rows, x, Epilogue::Accumulate);
        t.lap(5);
    }
}

/// Multi-head self-attention over `qkv` (rows of [q | k | v], each `width` wide, heads
/// contiguous inside each): writes the heads' outputs side by side into `out` (rows of width).
pub fn attention(
    qkv: &[f32],
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = width / heads;
    let ld = 3 * width;
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let base = b * tokens * ld + h * d;
        let q = qkv[base..].as_ptr();
        let k = qkv[base + width..].as_ptr();
        let v = qkv[base + 2 * width..].as_ptr();
        let mut scores = Scratch::<f32>::new(tokens * tokens);
        // Capture the whole pointer wrapper (Send + Sync), not its raw field.
        #[allow(clippy::redundant_locals)]
        // SAFETY: Q, K, V are `tokens` rows of `d` at row stride `ld` inside `qkv`; the output
        // block (rows of this frame, columns of this head) is written by this task only.
        unsafe {
            super::sgemm_single(
                tokens,
                tokens,
                d,
                q,
                ld,
                k,
                ld,
                true,
                scores.as_mut_ptr(),
                tokens,
            );
            for row in scores.chunks_mut(tokens) {
                math::softmax_row(row, scale);
            }
            let o = out_ptr.get().add(b * tokens * width + h * d);
            super::sgemm_single(
                tokens,
                d,
                tokens,
                scores.as_ptr(),
                tokens,
                v,
                ld,
                false,
                o,
                width,
            );
        }
    });
}

/// [`attention`] with both products in bf16 on MKL's AMX kernels (f32 accumulation, f32
/// softmax): Q, K, V are converted once, the probabilities per task. Without MKL it is
/// [`attention`].
pub fn attention_bf16(
    qkv: &[f32],
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(not(feature = "mkl"))]
    attention(qkv, batch, tokens, width, heads, scale, out);
    #[cfg(feature = "mkl")]
    {
        let d = width / heads;
        let ld = 3 * width;
        let mut qkv_b = Scratch::<u16>::new(qkv.len());
        super::convert::to_bf16(qkv, &mut qkv_b);
        let qkv_b = &*qkv_b;
        let out_ptr = SharedMut(out.as_mut_ptr());
        (0..batch * heads).into_par_iter().for_each(|task| {
            let (b, h) = (task / heads, task % heads);
            let base = b * tokens * ld + h * d;
            let mut scores = Scratch::<f32>::new(tokens * tokens);
            let mut probs = Scratch::<u16>::new(tokens * tokens);
            // SAFETY: as in `attention`, on the bf16 copy of `qkv`.
            unsafe {
                let q = qkv_b.as_ptr().add(base);
                let k = qkv_b.as_ptr().add(base + width);
                let v = qkv_b.as_ptr().add(base + 2 * width);
                super::mkl::bf16_strided(
                    tokens,
                    tokens,
                    d,
                    q,
                    ld,
                    k,
                    ld,
                    true,
                    scores.as_mut_ptr(),
                    tokens,
                );
                for row in scores.chunks_mut(tokens) {
                    math::softmax_row(row, scale);
                }
                super::convert::to_bf16(&scores, &mut probs);
                let o = out_ptr.get().add(b * tokens * width + h * d);
                super::mkl::bf16_strided(
                    tokens,
                    d,
                    tokens,
                    probs.as_ptr(),
                    tokens,
                    v,
                    ld,
                    false,
                    o,
                    width,
                );
            }
        });
    }
}
