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
                false,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q·kᵀ·scale)·v per (frame, head) in f64.
    fn reference(qkv: &[f32], batch: usize, tokens: usize, width: usize, heads: usize) -> Vec<f64> {
        let d = width / heads;
        let scale = (d as f64).powf(-0.5);
        let at = |b: usize, t: usize, part: usize, h: usize, i: usize| {
            qkv[(b * tokens + t) * 3 * width + part * width + h * d + i] as f64
        };
        let mut out = vec![0f64; batch * tokens * width];
        for b in 0..batch {
            for h in 0..heads {
                for t in 0..tokens {
                    let scores: Vec<f64> = (0..tokens)
                        .map(|s| {
                            (0..d)
                                .map(|i| at(b, t, 0, h, i) * at(b, s, 1, h, i))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for i in 0..d {
                        out[(b * tokens + t) * width + h * d + i] =
                            (0..tokens).map(|s| e[s] / sum * at(b, s, 2, h, i)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_in_f32_and_bf16_match_the_formula() {
        let (batch, tokens, width, heads) = (2, 19, 48, 3);
        let qkv: Vec<f32> = (0..batch * tokens * 3 * width)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 * 2.0 - 1.0)
            .collect();
        let exact = reference(&qkv, batch, tokens, width, heads);
        let scale = ((width / heads) as f32).powf(-0.5);
        // bf16 rounds Q, K, V and the probabilities to 8 significant bits.
        type Attend = fn(&[f32], usize, usize, usize, usize, f32, &mut [f32]);
        let modes: [(Attend, f64); 2] = [(attention, 1e-5), (attention_bf16, 2e-2)];
        for (attend, bound) in modes {
            let mut out = vec![f32::NAN; batch * tokens * width];
            attend(&qkv, batch, tokens, width, heads, scale, &mut out);
            let err = out
                .iter()
                .zip(&exact)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(err < bound, "attention error {err} (bound {bound})");
        }
    }
}
