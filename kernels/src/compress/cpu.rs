//! The CPU twin of `cuda/compress.cu`: plain loops in f32 with the kernels' summation orders
//! (see the module documentation of [`super`]).

use candle_core::{DType, Device, Result, Tensor};

use super::{CompressShape, Pooled, BLOCK, WARP};

/// `Σ_w a[w] · b[w]` as a warp computes it: 32 strided partial sums with fused multiply-adds,
/// then the xor butterfly.
pub fn warp_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; WARP];
    for (lane, acc) in lanes.iter_mut().enumerate() {
        let mut w = lane;
        while w < a.len() {
            *acc = a[w].mul_add(b[w], *acc);
            w += WARP;
        }
    }
    let mut offset = WARP / 2;
    while offset > 0 {
        let prev = lanes;
        for (lane, acc) in lanes.iter_mut().enumerate() {
            *acc = prev[lane] + prev[lane ^ offset];
        }
        offset /= 2;
    }
    lanes[0]
}

/// `Σ_n x[n]` as a block of [`BLOCK`] threads computes it: strided partial sums, then the
/// pairwise halving tree.
pub fn block_sum(x: &[f32]) -> f32 {
    let mut partial = [0f32; BLOCK];
    for (t, acc) in partial.iter_mut().enumerate() {
        let mut n = t;
        while n < x.len() {
            *acc += x[n];
            n += BLOCK;
        }
    }
    let mut stride = BLOCK / 2;
    while stride > 0 {
        for t in 0..stride {
            partial[t] += partial[t + stride];
        }
        stride /= 2;
    }
    partial[0]
}

/// The attention weights `A` (B, Q, N), row-major: the attention kernel's output.
pub fn attention(text_queries: &[f32], keys: &[f32], s: CompressShape, scale: f32) -> Vec<f32> {
    let (q_count, n_count, w) = (s.queries, s.patches, s.width);
    let mut out = vec![0f32; s.batch * q_count * n_count];
    for b in 0..s.batch {
        let k = &keys[b * n_count * w..][..n_count * w];
        for q in 0..q_count {
            let query = &text_queries[(b * q_count + q) * w..][..w];
            let row = &mut out[(b * q_count + q) * n_count..][..n_count];
            for (n, score) in row.iter_mut().enumerate() {
                *score = warp_dot(query, &k[n * w..][..w]) * scale;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for e in row.iter_mut() {
                *e = (*e - max).exp();
            }
            let sum = block_sum(row);
            for e in row.iter_mut() {
                *e /= sum;
            }
        }
    }
    out
}

/// Pools the patches with the attention weights: `(context (B, W), content (B, W))`, the
/// pooling kernel's outputs.
pub fn pool(attention: &[f32], patches: &[f32], s: CompressShape) -> (Vec<f32>, Vec<f32>) {
    let (q_count, n_count, w) = (s.queries, s.patches, s.width);
    let mut context = vec![0f32; s.batch * w];
    let mut content = vec![0f32; s.batch * w];
    let mut mean_attention = vec![0f32; n_count];
    for b in 0..s.batch {
        let a = &attention[b * q_count * n_count..][..q_count * n_count];
        for (n, out) in mean_attention.iter_mut().enumerate() {
            let mut sum = 0f32;
            for q in 0..q_count {
                sum += a[q * n_count + n];
            }
            *out = sum / q_count as f32;
        }
        let v = &patches[b * n_count * w..][..n_count * w];
        for col in 0..w {
            let mut ctx = 0f32;
            let mut sum = 0f32;
            for (n, &abar) in mean_attention.iter().enumerate() {
                let x = v[n * w + col];
                ctx = abar.mul_add(x, ctx);
                sum += x;
            }
            context[b * w + col] = ctx;
            content[b * w + col] = sum / n_count as f32;
        }
    }
    (context, content)
}

/// The whole compression on f32 slices: `(context (B, W), content (B, W))`.
pub fn compress(
    text_queries: &[f32],
    keys: &[f32],
    patches: &[f32],
    s: CompressShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(
        text_queries.len(),
        s.batch * s.queries * s.width,
        "text queries"
    );
    assert_eq!(keys.len(), s.batch * s.patches * s.width, "keys");
    assert_eq!(patches.len(), s.batch * s.patches * s.width, "patches");
    let a = attention(text_queries, keys, s, scale);
    pool(&a, patches, s)
}

fn flat_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The twin on CPU tensors of one dtype; outputs in that dtype.
pub fn compress_tensors(
    text_queries: &Tensor,
    keys: &Tensor,
    patches: &Tensor,
    s: CompressShape,
    scale: f32,
) -> Result<Pooled> {
    let dtype = text_queries.dtype();
    let (context, content) = compress(
        &flat_f32(text_queries)?,
        &flat_f32(keys)?,
        &flat_f32(patches)?,
        s,
        scale,
    );
    let wrap = |v: Vec<f32>| -> Result<Tensor> {
        Tensor::from_vec(v, (s.batch, s.width), &Device::Cpu)?.to_dtype(dtype)
    };
    Ok(Pooled {
        context: wrap(context)?,
        content: wrap(content)?,
    })
}
