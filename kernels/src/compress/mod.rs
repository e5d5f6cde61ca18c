//! Two-token compression, fused (LLaMA-VID section 6): for each frame `b`,
//!
//! ```text
//! S[q, n]  = scale · Σ_w text_q[b, q, w] · K[b, n, w]        scale = 1/sqrt(W) by default
//! A[q, n]  = softmax over n of S[q, n]
//! ctx[w]   = mean over q of Σ_n A[q, n] · V[b, n, w]          = Σ_n ā[n] · V[b, n, w]
//! ā[n]     = (Σ_q A[q, n]) / Q
//! cont[w]  = (Σ_n V[b, n, w]) / N
//! ```
//!
//! with `text_q` (B, Q, W) the projected Q-Former queries, `K` (B, N, W) the projected patch keys
//! and `V` (B, N, W) the raw patch features. The small projections around it stay candle matmuls.
//! The query mean is taken on the attention weights before the product with `V`, which is the
//! same quantity (linearity) at a Q-th of the cost.
//!
//! The CPU twin ([`cpu`]) is the definition of the summation orders the kernels use:
//!
//! * **scores**: lane `l` of 32 sums `text_q[w] · K[n, w]` for `w ≡ l (mod 32)` in increasing `w`
//!   with fused multiply-adds; the 32 partial sums are combined by the butterfly
//!   `p[l] += p[l ^ o]` for `o = 16, 8, 4, 2, 1`; the result is multiplied by `scale` (f32).
//! * **softmax**: `m = max_n S`, `e[n] = exp(S[n] - m)`; thread `t` of [`BLOCK`] sums `e[n]`
//!   for `n ≡ t (mod BLOCK)` in increasing `n`, then the BLOCK partial sums are halved pairwise
//!   (`r[t] += r[t + s]` for `s = BLOCK/2, …, 1`); `A[n] = e[n] / sum`.
//! * **pooling**: `ā[n]` sums over `q` in increasing order, then divides by `Q`; `ctx[w]` and the
//!   patch sum accumulate over `n` in increasing order (the former with fused multiply-adds);
//!   `cont[w] = sum / N`.
//!
//! All arithmetic is f32; f16/bf16 inputs are widened on load and the outputs rounded to the
//! input dtype (round to nearest even) at the end. The kernel's `expf` may differ from Rust's
//! `exp` by an ulp or two, so kernel and twin agree to f32 rounding, not bit for bit.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use candle_core::{bail, DType, Device, Result, Tensor};

/// Threads per block of the kernels (and the softmax sum's partition in the twin).
pub const BLOCK: usize = 256;
/// Lanes of the score dot products.
pub const WARP: usize = 32;
/// Largest `N` (patches) the attention kernel keeps in shared memory with the query row.
pub const MAX_SHARED_BYTES: usize = 48 * 1024;

/// Sizes of one compression call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressShape {
    /// Frames.
    pub batch: usize,
    /// Text queries per frame.
    pub queries: usize,
    /// Patches per frame.
    pub patches: usize,
    /// Feature width.
    pub width: usize,
}

impl CompressShape {
    /// Reads and checks the shapes of `text_queries` (B, Q, W), `keys` (B, N, W) and `patches`
    /// (B, N, W).
    pub fn of(text_queries: &Tensor, keys: &Tensor, patches: &Tensor) -> Result<Self> {
        let (b, q, w) = text_queries.dims3()?;
        let (kb, n, kw) = keys.dims3()?;
        let (pb, pn, pw) = patches.dims3()?;
        if (kb, kw) != (b, w) || (pb, pn, pw) != (b, n, w) {
            bail!(
                "compress: text queries {:?}, keys {:?} and patches {:?} do not match \
                 (expected (B, Q, W), (B, N, W), (B, N, W))",
                text_queries.dims(),
                keys.dims(),
                patches.dims()
            );
        }
        if b == 0 || q == 0 || n == 0 || w == 0 {
            bail!("compress: empty input (B {b}, Q {q}, N {n}, W {w})");
        }
        let s = CompressShape {
            batch: b,
            queries: q,
            patches: n,
            width: w,
        };
        if s.batch * s.queries * s.patches > i32::MAX as usize
            || s.batch * s.patches * s.width > i32::MAX as usize
            || s.batch * s.queries * s.width > i32::MAX as usize
        {
            bail!("compress: input too large for 32-bit indexing ({s:?})");
        }
        Ok(s)
    }

    /// Dynamic shared memory of the attention kernel: the query row and the score row.
    pub fn attention_shared_bytes(&self) -> usize {
        4 * (self.width + self.patches + BLOCK)
    }

    /// Dynamic shared memory of the pooling kernel: ā.
    pub fn pool_shared_bytes(&self) -> usize {
        4 * self.patches
    }
}

/// The model's attention scale: one head over the full width, `W^-0.5`.
pub fn default_scale(width: usize) -> f64 {
    (width as f64).powf(-0.5)
}

/// The two pooled vectors per frame, in the input dtype, on the input device.
#[derive(Debug, Clone)]
pub struct Pooled {
    /// `mean over queries of (A · V)` (B, W): feed to `vlm_att_val_projector`.
    pub context: Tensor,
    /// `mean over patches of V` (B, W): feed to `mm_projector` (after `unsqueeze(1)`).
    pub content: Tensor,
}

/// The fused compression with the model's scale ([`default_scale`]). On a CUDA device it runs
/// the kernels of `cuda/compress.cu` (when built with the `cuda` feature), on the CPU the twin.
/// Inputs must share dtype (f32, f16 or bf16) and device; they need not be contiguous.
pub fn compress(text_queries: &Tensor, keys: &Tensor, patches: &Tensor) -> Result<Pooled> {
    let width = text_queries.dims3()?.2;
    compress_with_scale(text_queries, keys, patches, default_scale(width))
}

/// [`compress`] with an explicit score scale.
pub fn compress_with_scale(
    text_queries: &Tensor,
    keys: &Tensor,
    patches: &Tensor,
    scale: f64,
) -> Result<Pooled> {
    let shape = CompressShape::of(text_queries, keys, patches)?;
    let dtype = text_queries.dtype();
    if keys.dtype() != dtype || patches.dtype() != dtype {
        bail!(
            "compress: dtypes differ ({dtype:?}, {:?}, {:?})",
            keys.dtype(),
            patches.dtype()
        );
    }
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("compress: unsupported dtype {dtype:?} (f32, f16 or bf16)");
    }
    let device = text_queries.device();
    if !keys.device().same_device(device) || !patches.device().same_device(device) {
        bail!("compress: inputs are on different devices");
    }
    match device {
        Device::Cpu => cpu::compress_tensors(text_queries, keys, patches, shape, scale as f32),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::compress(dev, text_queries, keys, patches, shape, scale as f32),
        other => bail!(
            "compress: no kernel for {:?} (build with the `cuda` feature for CUDA devices)",
            other.location()
        ),
    }
}
