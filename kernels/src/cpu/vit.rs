//! One pre-LN vision-transformer block (EVA's) run on flat f32 buffers: the same arithmetic as
//! the candle op sequence in `eva.rs`, without its intermediate tensors. Layer norms, softmax,
//! GELU and residual adds are single passes over the rows; the attention runs one task per
//! (frame, head), its two products reading Q, K and V in place inside the QKV output.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use super::blas::{self, Dims, Mat, Out};
use super::parallel::SharedMut;
use super::scratch::{Scratch, ScratchElem};
use super::{math, CpuLinear, Epilogue, Isa};

/// Time spent per stage of the fused blocks, for a benchmark's breakdown: kept only when a
/// model is loaded with profiling asked for (then each block adds its stages' nanoseconds).
/// The GELU and the residual adds are fused into the products.
#[derive(Debug, Default)]
pub struct VitProfile {
    nanos: [AtomicU64; 6],
}

impl VitProfile {
    pub const STAGES: [&'static str; 6] = [
        "layer norms",
        "qkv",
        "attention",
        "proj + residual",
        "fc1 + gelu",
        "fc2 + residual",
    ];

    /// Returns and resets the seconds per stage.
    pub fn take(&self) -> [f64; 6] {
        let mut out = [0.0; 6];
        for (o, p) in out.iter_mut().zip(&self.nanos) {
            *o = p.swap(0, Ordering::Relaxed) as f64 * 1e-9;
        }
        out
    }
}

/// Laps of one block's stages into its profile, when it has one.
struct Stopwatch<'a> {
    profile: Option<&'a VitProfile>,
    last: Instant,
}

impl Stopwatch<'_> {
    fn lap(&mut self, stage: usize) {
        if let Some(p) = self.profile {
            let now = Instant::now();
            p.nanos[stage].fetch_add((now - self.last).as_nanos() as u64, Ordering::Relaxed);
            self.last = now;
        }
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
    /// Where to add the stages' times, when profiling.
    pub profile: Option<&'a VitProfile>,
}

impl VitBlock<'_> {
    /// `x` holds `batch` sequences of `tokens` rows of the block's width; updated in place:
    /// `x += attn(norm1(x)); x += fc2(gelu(fc1(norm2(x))))`.
    pub fn forward(&self, x: &mut [f32], batch: usize, tokens: usize) {
        let width = self.norm1.weight.len();
        let rows = batch * tokens;
        assert_eq!(x.len(), rows * width);
        let isa = self.qkv.kernels().isa();
        let mut t = Stopwatch {
            profile: self.profile,
            last: Instant::now(),
        };
        let mut h = Scratch::<f32>::new(rows * width);
        math::layer_norm(
            isa,
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
        // Reduced-precision blocks also run the attention's two products in bf16 where MKL's
        // bf16 GEMM may run (the one rule for it: native bf16 on an Intel CPU, and no AMX
        // behind our back).
        // Without AVX-512 BF16 that GEMM widens to f32 and ran slower than f32 itself (the
        // vision tower's attention on AVX2: 0.151 s a frame in bf16 against 0.132 s in f32).
        let shape = AttentionShape {
            batch,
            tokens,
            width,
            heads: self.num_heads,
            scale: self.scale,
        };
        let bf16 = self.qkv.weight_type() != super::WeightType::F32
            && self
                .qkv
                .kernels()
                .mkl_reduced_precision(super::WeightType::Bf16);
        attention(isa, &qkv, shape, bf16, &mut h);
        t.lap(2);
        drop(qkv);
        self.proj.forward_with(&h, rows, x, Epilogue::Accumulate);
        t.lap(3);
        math::layer_norm(
            isa,
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

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Model width (heads × head size).
    pub width: usize,
    pub heads: usize,
    /// Multiplies the scores (head_dim^-1/2).
    pub scale: f32,
}

/// Multi-head self-attention over `qkv` (rows of [q | k | v], each `width` wide, heads
/// contiguous inside each): writes the heads' outputs side by side into `out` (rows of width).
/// One task per (sequence, head); its two products read Q, K and V in place. With `bf16` (and
/// the `mkl` feature) both products run in bf16 on MKL's AMX kernels, f32 accumulation and f32
/// softmax: Q, K, V are converted once, the probabilities per task.
pub fn attention(isa: Isa, qkv: &[f32], shape: AttentionShape, bf16: bool, out: &mut [f32]) {
    assert_eq!(qkv.len(), shape.batch * shape.tokens * 3 * shape.width);
    assert_eq!(out.len(), shape.batch * shape.tokens * shape.width);
    #[cfg(feature = "mkl")]
    if bf16 {
        let mut qkv_b = Scratch::<u16>::new(qkv.len());
        super::convert::to_bf16(isa, qkv, &mut qkv_b);
        return attend::<Bf16Operands>(isa, &qkv_b, shape, out);
    }
    let _ = bf16;
    attend::<F32Operands>(isa, qkv, shape, out)
}

/// The element type of the attention's two products.
trait Operands {
    type T: ScratchElem + Sync;

    /// Calls `f` with the probabilities in the products' type.
    fn with_probs(isa: Isa, probs: &[f32], f: impl FnOnce(&[Self::T]));

    /// `C = A · op(B)` on the calling thread.
    ///
    /// # Safety
    /// As for [`blas::sgemm`].
    unsafe fn product(d: Dims, a: Mat<Self::T>, b: Mat<Self::T>, c: Out);
}

struct F32Operands;

impl Operands for F32Operands {
    type T = f32;

    fn with_probs(_: Isa, probs: &[f32], f: impl FnOnce(&[f32])) {
        f(probs)
    }

    unsafe fn product(d: Dims, a: Mat<f32>, b: Mat<f32>, c: Out) {
        blas::sgemm(d, a, b, c, false)
    }
}

#[cfg(feature = "mkl")]
struct Bf16Operands;

#[cfg(feature = "mkl")]
impl Operands for Bf16Operands {
    type T = u16;

    fn with_probs(isa: Isa, probs: &[f32], f: impl FnOnce(&[u16])) {
        let mut bits = Scratch::<u16>::new(probs.len());
        super::convert::to_bf16(isa, probs, &mut bits);
        f(&bits)
    }

    unsafe fn product(d: Dims, a: Mat<u16>, b: Mat<u16>, c: Out) {
        super::mkl::gemm(d, a, b, c, 0.0)
    }
}

fn attend<O: Operands>(isa: Isa, qkv: &[O::T], shape: AttentionShape, out: &mut [f32]) {
    let AttentionShape {
        batch,
        tokens,
        width,
        heads,
        scale,
    } = shape;
    let d = width / heads;
    let ld = 3 * width;
    let out_ptr = SharedMut::new(out);
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let base = b * tokens * ld + h * d;
        let mut scores = Scratch::<f32>::new(tokens * tokens);
        // SAFETY: Q, K, V are `tokens` rows of `d` at row stride `ld` inside `qkv` (its size
        // is checked by `attention`); the output block (rows of this sequence, columns of this
        // head) is written by this task only.
        unsafe {
            let at = |part: usize| qkv.as_ptr().add(base + part * width);
            O::product(
                Dims {
                    m: tokens,
                    n: tokens,
                    k: d,
                },
                Mat::rows(at(0), ld),
                Mat::columns(at(1), ld),
                Out {
                    ptr: scores.as_mut_ptr(),
                    ld: tokens,
                },
            );
            for row in scores.chunks_mut(tokens) {
                math::softmax_row(isa, row, scale);
            }
            let o = out_ptr.get().add(b * tokens * width + h * d);
            O::with_probs(isa, &scores, |probs| {
                O::product(
                    Dims {
                        m: tokens,
                        n: d,
                        k: tokens,
                    },
                    Mat::rows(probs.as_ptr(), tokens),
                    Mat::rows(at(2), ld),
                    Out { ptr: o, ld: width },
                )
            });
        }
    });
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
        let shape = AttentionShape {
            batch,
            tokens,
            width,
            heads,
            scale: ((width / heads) as f32).powf(-0.5),
        };
        // bf16 rounds Q, K, V and the probabilities to 8 significant bits.
        let modes = Isa::available()
            .into_iter()
            .flat_map(|isa| [(isa, false, 1e-5), (isa, true, 2e-2)]);
        for (isa, bf16, bound) in modes {
            let mut out = vec![f32::NAN; batch * tokens * width];
            attention(isa, &qkv, shape, bf16, &mut out);
            let err = out
                .iter()
                .zip(&exact)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(
                err < bound,
                "{isa} bf16={bf16}: attention error {err} (bound {bound})"
            );
        }
    }
}
