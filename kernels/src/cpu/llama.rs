//! One LLaMA decoder layer run on flat f32 buffers: the arithmetic of `llama.rs`'s candle ops
//! (RMSNorm, rotate-half RoPE, causal attention over the KV cache, SwiGLU MLP) without their
//! intermediate tensors.
//!
//! The rows may belong to several sequences (a ragged batch: one sequence's prefill beside
//! other sequences' decode steps): every product multiplies all rows at once, so each weight
//! is read once per step, while attention runs per sequence over its own cache and positions.
//! Attention runs one task per sequence and head; long prefills compute the scores in row
//! blocks that stop at the causal edge. The caches hold f32, or f16 (int8 and bf16
//! models): a decode row reads an f16 cache as it is ([`math::attend_f16_row`]).

use rayon::prelude::*;

use super::blas::{self, Dims, Mat, Out};
use super::parallel::{for_rows, SharedMut};
use super::{convert, math, CpuLinear, Epilogue, Isa, Scratch};

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

/// The elements of a KV cache.
#[derive(Clone, Copy)]
pub enum KvData<'a> {
    F32(&'a [f32]),
    /// IEEE half-precision bits ([`convert::to_f16`]): int8 and bf16 models' caches, of
    /// half the bytes that every decode step reads.
    F16(&'a [u16]),
}

impl KvData<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(d) => d.len(),
            Self::F16(d) => d.len(),
        }
    }
}

/// Keys or values of one layer as the cache holds them: for kv head `h` and position `t`,
/// the `head_dim` values start at `data[offset + h * head_stride + t * token_stride]`.
pub struct CacheView<'a> {
    pub data: KvData<'a>,
    pub offset: usize,
    pub head_stride: usize,
    pub token_stride: usize,
    /// Positions held (cached and new).
    pub len: usize,
}

/// One sequence's rows of a ragged batch: the next `rows` rows of the batch (sequences lie in
/// order), at positions `start..start + rows` of this sequence, whose cache (`keys`, `values`)
/// already holds them.
pub struct SequenceRows<'a> {
    pub rows: usize,
    pub start: usize,
    pub keys: CacheView<'a>,
    pub values: CacheView<'a>,
}

/// Query rows per block of the causal score computation.
const ROW_BLOCK: usize = 128;

impl LlamaLayer<'_> {
    fn isa(&self) -> Isa {
        self.q.kernels().isa()
    }

    /// Attention input: `h = rmsnorm(x)`, then Q, K, V with RoPE applied to Q and K, row `t`
    /// of `x` at position `positions[t]`. Returns (q, k, v), rows of heads·head_dim.
    pub fn qkv(
        &self,
        x: &[f32],
        positions: &[usize],
        cos: &[f32],
        sin: &[f32],
    ) -> (Scratch<f32>, Vec<f32>, Vec<f32>) {
        let len = positions.len();
        let hidden = self.input_norm.len();
        let d = self.head_dim;
        let mut h = Scratch::<f32>::new(len * hidden);
        math::rms_norm(self.isa(), x, self.input_norm, self.eps, &mut h);
        let mut q = Scratch::<f32>::new(len * self.num_heads * d);
        self.q.forward_into(&h, len, &mut q);
        let mut k = vec![0f32; len * self.num_kv_heads * d];
        self.k.forward_into(&h, len, &mut k);
        let mut v = vec![0f32; len * self.num_kv_heads * d];
        self.v.forward_into(&h, len, &mut v);
        rope(&mut q, self.num_heads, d, positions, cos, sin);
        rope(&mut k, self.num_kv_heads, d, positions, cos, sin);
        (q, k, v)
    }

    /// The rest of the layer once every sequence's cache holds this step's keys and values:
    /// attention of each sequence's rows of `q` over its cache, output projection, residual,
    /// MLP, residual; `x` (all the sequences' rows, in order) in place.
    pub fn finish(&self, x: &mut [f32], q: &[f32], sequences: &[SequenceRows]) {
        let hidden = self.input_norm.len();
        let width = self.num_heads * self.head_dim;
        let len: usize = sequences.iter().map(|s| s.rows).sum();
        assert_eq!(
            x.len(),
            len * hidden,
            "rows of x against the sequences' rows"
        );
        let mut att = Scratch::<f32>::new(len * width);
        attention(
            self.isa(),
            q,
            sequences,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            &mut att,
        );
        self.o.forward_with(&att, len, x, Epilogue::Accumulate);
        drop(att);
        let mut h = Scratch::<f32>::new(len * hidden);
        math::rms_norm(self.isa(), x, self.post_norm, self.eps, &mut h);
        let inter = self.gate.out_features();
        let mut g = Scratch::<f32>::new(len * inter);
        self.gate.forward_into(&h, len, &mut g);
        let mut u = Scratch::<f32>::new(len * inter);
        self.up.forward_into(&h, len, &mut u);
        math::silu_mul(self.isa(), &mut g, &u);
        drop(u);
        self.down.forward_with(&g, len, x, Epilogue::Accumulate);
    }
}

/// Rotate-half RoPE in place on rows of `heads · d`, row `t` at position `positions[t]`;
/// `cos`/`sin` are the tables (positions, d/2).
fn rope(x: &mut [f32], heads: usize, d: usize, positions: &[usize], cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for_rows(x, heads * d, |t, row| {
        let pos = positions[t];
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

/// Causal attention of each sequence's rows over its own cache: its query row `i` (position
/// `start + i`) sees its cached positions `0..=start + i`. `q` and `out` have rows of heads·d,
/// the sequences' rows in order; heads share kv heads in groups. One task per sequence, head
/// and block of rows.
fn attention(
    isa: Isa,
    q: &[f32],
    sequences: &[SequenceRows],
    heads: usize,
    kv_heads: usize,
    d: usize,
    out: &mut [f32],
) {
    let width = heads * d;
    let group = heads / kv_heads;
    let scale = (d as f32).powf(-0.5);
    let total: usize = sequences.iter().map(|s| s.rows).sum();
    assert!(q.len() == total * width && out.len() == total * width);
    let out_ptr = SharedMut::new(out);
    // (sequence, its first row in the batch, the block's first and end rows in the sequence).
    let mut blocks = Vec::new();
    let mut first = 0;
    for (s, seq) in sequences.iter().enumerate() {
        for r0 in (0..seq.rows).step_by(ROW_BLOCK) {
            blocks.push((s, first, r0, (r0 + ROW_BLOCK).min(seq.rows)));
        }
        first += seq.rows;
    }
    (0..heads * blocks.len()).into_par_iter().for_each(|task| {
        let (h, (s, first, r0, r1)) = (task / blocks.len(), blocks[task % blocks.len()]);
        let SequenceRows {
            start,
            keys,
            values,
            ..
        } = &sequences[s];
        let start = *start;
        let kv = h / group;
        let rows = r1 - r0;
        // Keys this block can see.
        let seen = start + r1;
        let head = |c: &CacheView| -> usize {
            let at = c.offset + kv * c.head_stride;
            assert!(seen <= c.len && at + (seen - 1) * c.token_stride + d <= c.data.len());
            at
        };
        let (k_at, v_at) = (head(keys), head(values));
        let (q_row, out_row) = (first + r0, first + r0);
        // A decode step's row over an f16 cache: read as it is.
        if let (1, KvData::F16(k), KvData::F16(v)) = (rows, keys.data, values.data) {
            if keys.token_stride == values.token_stride {
                let mut scores = Scratch::<f32>::new(seen);
                let q = &q[q_row * width + h * d..][..d];
                // SAFETY: the output row's columns of head h, written by this task only.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(out_row * width + h * d), d)
                };
                let (k, v, ld) = (&k[k_at..], &v[v_at..], keys.token_stride);
                if math::attend_f16_row(isa, q, k, v, ld, scale, &mut scores, out) {
                    return;
                }
            }
        }
        // Otherwise on f32 rows: the cache's own, or an f16 cache's widened into a scratch
        // (which then stays in cache for the products).
        let f32_rows = |c: &CacheView, at: usize| -> (Option<Scratch<f32>>, *const f32, usize) {
            match c.data {
                KvData::F32(data) => (None, data[at..].as_ptr(), c.token_stride),
                KvData::F16(data) => {
                    let mut wide = Scratch::<f32>::new(seen * d);
                    if c.token_stride == d {
                        // A cache's own layout: the rows lie end to end, one conversion.
                        convert::f16_to_f32(isa, &data[at..at + seen * d], &mut wide);
                    } else {
                        for (t, row) in wide.chunks_mut(d).enumerate() {
                            let from = at + t * c.token_stride;
                            convert::f16_to_f32(isa, &data[from..from + d], row);
                        }
                    }
                    let ptr = wide.as_ptr();
                    (Some(wide), ptr, d)
                }
            }
        };
        let (_k_wide, k, k_ld) = f32_rows(keys, k_at);
        let (_v_wide, v, v_ld) = f32_rows(values, v_at);
        let mut scores = Scratch::<f32>::new(rows * seen);
        // SAFETY: q rows q_row..q_row + rows of this head (row stride `width`, inside q as
        // checked above), `seen` key and value rows (at their strides) inside the cache
        // (checked by `head`) or its widened scratch (alive to the end of the task), scores (rows,
        // seen); the output rows and columns of head h of this block are written by this task
        // only.
        unsafe {
            blas::sgemm(
                Dims {
                    m: rows,
                    n: seen,
                    k: d,
                },
                Mat::rows(q.as_ptr().add(q_row * width + h * d), width),
                Mat::columns(k, k_ld),
                Out {
                    ptr: scores.as_mut_ptr(),
                    ld: seen,
                },
                false,
            );
            for (i, row) in scores.chunks_mut(seen).enumerate() {
                let visible = start + r0 + i + 1;
                math::softmax_row(isa, &mut row[..visible], scale);
                row[visible..].fill(0.0);
            }
            blas::sgemm(
                Dims {
                    m: rows,
                    n: d,
                    k: seen,
                },
                Mat::rows(scores.as_ptr(), seen),
                Mat::rows(v, v_ld),
                Out {
                    ptr: out_ptr.get().add(out_row * width + h * d),
                    ld: width,
                },
                false,
            );
        }
    });
}
