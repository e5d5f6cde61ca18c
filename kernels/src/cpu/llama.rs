//! One LLaMA decoder layer run on flat f32 buffers: the arithmetic of `llama.rs`'s candle ops
//! (RMSNorm, rotate-half RoPE, causal attention over the KV cache, SwiGLU MLP) without their
//! intermediate tensors. Attention runs one task per head; long prefills compute the scores
//! in row blocks that stop at the causal edge.

use rayon::prelude::*;

use super::{math, CpuLinear, Epilogue, Scratch, SharedMut};

/// The weights of one layer.
pub struct LlamaLayer<'a> {
    pub input_norm: &'a [f32],
    pub post_norm: &'a [f32],
    pub eps: f32,
    pub q: &'a CpuLinear,
    pub k: &'a CpuLinear,
    pub v: &'a CpuLinear,
    pub o: &'a CpuLinear,
    pub gate: &'a CpuLinear,
    pub up: &'a CpuLinear,
    pub down: &'a CpuLinear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Keys or values of one layer as the cache holds them: for kv head `h` and position `t`,
/// the `head_dim` values start at `data[offset + h * head_stride + t * token_stride]`.
pub struct CacheView<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub head_stride: usize,
    pub token_stride: usize,
    /// Positions held (cached and new).
    pub len: usize,
}

/// Query rows per block of the causal score computation.
const ROW_BLOCK: usize = 128;

impl LlamaLayer<'_> {
    /// Attention input: `h = rmsnorm(x)`, then Q, K, V with RoPE applied to Q and K for
    /// positions `start..start + len`. Returns (q, k, v), rows of heads·head_dim.
    pub fn qkv(
        &self,
        x: &[f32],
        len: usize,
        start: usize,
        cos: &[f32],
        sin: &[f32],
    ) -> (Scratch<f32>, Vec<f32>, Vec<f32>) {
        let hidden = self.input_norm.len();
        let d = self.head_dim;
        let mut h = Scratch::<f32>::new(len * hidden);
        math::rms_norm(x, self.input_norm, self.eps, &mut h);
        let mut q = Scratch::<f32>::new(len * self.num_heads * d);
        self.q.forward_into(&h, len, &mut q);
        let mut k = vec![0f32; len * self.num_kv_heads * d];
        self.k.forward_into(&h, len, &mut k);
        let mut v = vec![0f32; len * self.num_kv_heads * d];
        self.v.forward_into(&h, len, &mut v);
        rope(&mut q, self.num_heads, d, start, cos, sin);
        rope(&mut k, self.num_kv_heads, d, start, cos, sin);
        (q, k, v)
    }

    /// The rest of the layer once the cache holds this step's keys and values: attention of
    /// `q` over `keys`/`values`, output projection, residual, MLP, residual; `x` in place.
    pub fn finish(
        &self,
        x: &mut [f32],
        len: usize,
        start: usize,
        q: &[f32],
        keys: &CacheView,
        values: &CacheView,
    ) {
        let hidden = self.input_norm.len();
        let width = self.num_heads * self.head_dim;
        let mut att = Scratch::<f32>::new(len * width);
        attention(
            q,
            len,
            start,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            keys,
            values,
            &mut att,
        );
        self.o.forward_with(&att, len, x, Epilogue::Accumulate);
        drop(att);
        let mut h = Scratch::<f32>::new(len * hidden);
        math::rms_norm(x, self.post_norm, self.eps, &mut h);
        let inter = self.gate.out_features();
        let mut g = Scratch::<f32>::new(len * inter);
        self.gate.forward_into(&h, len, &mut g);
        let mut u = Scratch::<f32>::new(len * inter);
        self.up.forward_into(&h, len, &mut u);
        math::silu_mul(&mut g, &u);
        drop(u);
        self.down.forward_with(&g, len, x, Epilogue::Accumulate);
    }
}

/// Rotate-half RoPE in place on rows of `heads · d` for positions `start..`; `cos`/`sin` are
/// the tables (positions, d/2).
fn rope(x: &mut [f32], heads: usize, d: usize, start: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    math::for_rows(x, heads * d, |t, row| {
        let pos = start + t;
        let (c, s) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for head in row.chunks_mut(d) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    });
}

/// Causal attention: query row `i` (position `start + i`) sees cached positions
/// `0..=start + i`. `q` and `out` have rows of heads·d; heads share kv heads in groups.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &[f32],
    len: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    keys: &CacheView,
    values: &CacheView,
    out: &mut [f32],
) {
    let width = heads * d;
    let group = heads / kv_heads;
    let scale = (d as f32).powf(-0.5);
    let out_ptr = SharedMut(out.as_mut_ptr());
    let blocks = len.div_ceil(ROW_BLOCK);
    (0..heads * blocks).into_par_iter().for_each(|task| {
        let (h, block) = (task / blocks, task % blocks);
        let kv = h / group;
        let r0 = block * ROW_BLOCK;
        let r1 = (r0 + ROW_BLOCK).min(len);
        let rows = r1 - r0;
        // Keys this block can see.
        let seen = start + r1;
        let k = &keys.data[keys.offset + kv * keys.head_stride..];
        let v = &values.data[values.offset + kv * values.head_stride..];
        let mut scores = Scratch::<f32>::new(rows * seen);
        // Capture the whole pointer wrapper (Send + Sync), not its raw field.
        #[allow(clippy::redundant_locals)]
        // SAFETY: q rows r0..r1 of this head (row stride `width`), `seen` key and value rows
        // (stride token_stride) inside the cache, scores (rows, seen); the output rows r0..r1
        // and columns of head h are written by this task only.
        unsafe {
            super::sgemm_single(
                rows,
                seen,
                d,
                q.as_ptr().add(r0 * width + h * d),
                width,
                k.as_ptr(),
                keys.token_stride,
                true,
                false,
                scores.as_mut_ptr(),
                seen,
            );
            for (i, row) in scores.chunks_mut(seen).enumerate() {
                let visible = start + r0 + i + 1;
                math::softmax_row(&mut row[..visible], scale);
                row[visible..].fill(0.0);
            }
            super::sgemm_single(
                rows,
                d,
                seen,
                scores.as_ptr(),
                seen,
                v.as_ptr(),
                values.token_stride,
                false,
                false,
                out_ptr.get().add(r0 * width + h * d),
                width,
            );
        }
    });
}
