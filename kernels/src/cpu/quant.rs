//! Linear layers on ggml's block-quantized weights (what GGUF files store), with ggml's own
//! arithmetic, so that a GGUF model gives the numbers llama.cpp gives:
//!
//! * before each product the activations are quantized to ggml's `vec_dot_type` of the weight
//!   type, exactly as ggml's x86 code does it: Q8_0 (per 32 values: `d = max|x|/127`, `x·127/max`
//!   rounded half to even) for Q4_0, Q5_0 and Q8_0 weights; Q8_1 (the same, plus
//!   `s = d·Σq`) for Q4_1 and Q5_1; Q8_K (per 256 values, `-127/max` by the signed extreme,
//!   16-value sums) for the K-quants;
//! * each block's integer dot product is exact (i32), and scaled by the stored f16 scales as
//!   ggml's `vec_dot_*` formulas do (Q4_1: `d_w·d_a·Σ + m_w·s_a`; K-quants: `d_a·(d_w·Σ sc·Σ -
//!   dmin_w·Σ m·bsum)`).
//!
//! What remains different is only the order of f32 sums. Weight rows are independent, so the
//! output columns are split between the threads of the caller's rayon pool.
//!
//! The weights live in a [`super::CpuLinear`] (built by [`super::CpuLinear::ggml`]) and its
//! products take [`super::ProductPath::GgmlBlocks`]: with AVX2, Q4_0, Q4_1, Q8_0, Q4_K and Q6_K
//! run the explicit register-tiled kernels of `x86` (`vpmaddubsw`, or AVX-512 VNNI's
//! `vpdpbusd` for the 32-value types where the model's [`Isa`] has it); Q5_0, Q5_1, Q5_K and
//! every type without AVX2 run [`row_dot`], compiled for the vector level the `Isa` proves.
//! All give the same bits: integer dots are exact, and the f32 part of each output is the same
//! expression, block by block in the same order.

use super::parallel::{self, SharedMut};
use super::{math, Epilogue, Isa};

#[cfg(target_arch = "x86_64")]
mod x86;

/// The block types (ggml's type ids in the comments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockType {
    /// 2: 32 values, f16 scale, 4-bit (q - 8).
    Q4_0,
    /// 3: 32 values, f16 scale and min, 4-bit.
    Q4_1,
    /// 6: 32 values, f16 scale, 5-bit (q - 16).
    Q5_0,
    /// 7: 32 values, f16 scale and min, 5-bit.
    Q5_1,
    /// 8: 32 values, f16 scale, 8-bit.
    Q8_0,
    /// 12: 256 values, 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit.
    Q4K,
    /// 13: 256 values, as Q4_K with a fifth bit.
    Q5K,
    /// 14: 256 values, 16 sub-blocks of 16 with 8-bit scales, 6-bit (q - 32).
    Q6K,
}

impl BlockType {
    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_K",
            Self::Q5K => "q5_K",
            Self::Q6K => "q6_K",
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Round half to even, as `_mm256_round_ps(_MM_ROUND_NEAREST)` and ggml's `nearest_int`.
#[inline(always)]
fn round_even(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// The activation rows of one product, quantized for a weight type's dot products.
pub(super) struct QuantActs {
    m: usize,
    k: usize,
    /// (m, k), row-major.
    q: Vec<i8>,
    /// Per block (32 values for Q8_0/Q8_1, 256 for Q8_K) and row, block-major (`d[b·m + i]`), so
    /// that the rows of a register tile have their scales side by side.
    d: Vec<f32>,
    /// Q8_1: `d·Σq` per block, rounded to f16 as ggml stores it; block-major like `d`.
    s: Vec<f32>,
    /// Q8_0/Q8_1: `Σq` per block, block-major (takes Q4_0's offset of 8 out of a dot product of
    /// the raw nibbles).
    sums: Vec<i32>,
    /// Q8_K: the sums of each 16 values, row-major (`bsums[(i·blocks + b)·16 + g]`).
    bsums: Vec<i16>,
    /// `q` rearranged for the x86 kernels' 8-row tiles (empty unless they asked for it).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    interleaved: Vec<i8>,
}

/// The activation format a weight type's dot products take (ggml's `vec_dot_type`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ActFormat {
    Q8_0,
    Q8_1,
    Q8K,
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

impl QuantActs {
    /// The rows of `x` (m, k) quantized to `format`.
    fn new(isa: Isa, format: ActFormat, x: &[f32], m: usize, k: usize) -> Self {
        let per = if format == ActFormat::Q8K { 256 } else { 32 };
        let blocks = k / per;
        let mut acts = QuantActs {
            m,
            k,
            q: vec![0; m * k],
            d: vec![0.0; m * blocks],
            s: vec![
                0.0;
                if format == ActFormat::Q8_1 {
                    m * blocks
                } else {
                    0
                }
            ],
            sums: vec![
                0;
                if format == ActFormat::Q8K {
                    0
                } else {
                    m * blocks
                }
            ],
            bsums: vec![
                0;
                if format == ActFormat::Q8K {
                    m * blocks * 16
                } else {
                    0
                }
            ],
            interleaved: Vec::new(),
        };
        quantize_rows(isa, format, isa.avx2(), x, &mut acts);
        acts
    }
}

super::isa_fn! {
    /// The rows of `x` into `acts`, compiled for the vector level `isa` proves (the rounding
    /// becomes `vroundps` instead of a libm call per value; the same operations, the same bits).
    fn quantize_rows(format: ActFormat, has_avx2: bool, x: &[f32], acts: &mut QuantActs) {
        let (m, k) = (acts.m, acts.k);
        let per = if format == ActFormat::Q8K { 256 } else { 32 };
        let blocks = k / per;
        for (i, (xr, qr)) in x
            .chunks_exact(k)
            .zip(acts.q.chunks_exact_mut(k))
            .take(m)
            .enumerate()
        {
            for (b, (xs, qs)) in xr.chunks_exact(per).zip(qr.chunks_exact_mut(per)).enumerate() {
                let at = b * m + i;
                match format {
                    ActFormat::Q8_0 | ActFormat::Q8_1 => {
                        let (xs, qs) = (xs.try_into().unwrap(), qs.try_into().unwrap());
                        #[cfg(target_arch = "x86_64")]
                        let (d, sum) = if has_avx2 {
                            // SAFETY: `has_avx2` says the CPU has it.
                            unsafe { x86::quantize_q8_32(xs, qs) }
                        } else {
                            quantize_q8_32(xs, qs)
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let (d, sum) = {
                            let _ = has_avx2;
                            quantize_q8_32(xs, qs)
                        };
                        acts.d[at] = f16_round(d);
                        acts.sums[at] = sum;
                        if format == ActFormat::Q8_1 {
                            acts.s[at] = f16_round(d * sum as f32);
                        }
                    }
                    ActFormat::Q8K => {
                        let bs = &mut acts.bsums[(i * blocks + b) * 16..][..16];
                        acts.d[at] = quantize_q8_k(xs, qs.try_into().unwrap(), bs);
                    }
                }
            }
        }
    }
}

/// ggml's x86 `quantize_row_q8_0` / `quantize_row_q8_1` for one block of 32: the values in
/// `q`, returns `d` (before its rounding to f16) and `Σq`.
#[inline(always)]
fn quantize_q8_32(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        let r = round_even(v * id);
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

/// ggml's `quantize_row_q8_K_ref` (x86 uses the reference) for one block of 256: the values
/// in `q`, the sums of each 16 in `bsums`, returns `d`.
#[inline(always)]
fn quantize_q8_k(x: &[f32], q: &mut [i8; 256], bsums: &mut [i16]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = round_even(iscale * v).min(127) as i8;
    }
    for (s, group) in bsums.iter_mut().zip(q.chunks_exact(16)) {
        // At most 16 · 127 in magnitude.
        *s = group.iter().map(|&q| q as i16).sum();
    }
    1.0 / iscale
}

#[inline(always)]
fn dot32(w: &[i8; 32], a: &[i8]) -> i32 {
    let mut s = 0i32;
    for i in 0..32 {
        s += w[i] as i32 * a[i] as i32;
    }
    s
}

#[inline(always)]
fn dot16(w: &[i8], a: &[i8]) -> i32 {
    let mut s = 0i32;
    for i in 0..16 {
        s += w[i] as i32 * a[i] as i32;
    }
    s
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as i32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32,
        )
    }
}

/// The 4-bit values of a 32-value block: low nibbles are values 0..16, high ones 16..32.
#[inline(always)]
fn nibbles32(qs: &[u8], offset: i8) -> [i8; 32] {
    let mut w = [0i8; 32];
    for j in 0..16 {
        w[j] = (qs[j] & 0xF) as i8 - offset;
        w[j + 16] = (qs[j] >> 4) as i8 - offset;
    }
    w
}

/// The 5-bit values of a Q5_0/Q5_1 block (fifth bits in `qh`, bit j for value j).
#[inline(always)]
fn fives32(qh: u32, qs: &[u8], offset: i8) -> [i8; 32] {
    let mut w = [0i8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        w[j] = ((qs[j] & 0xF) | h0) as i8 - offset;
        w[j + 16] = ((qs[j] >> 4) | h1) as i8 - offset;
    }
    w
}

/// Dot product of one weight row (its blocks) with quantized activation row `i`: the portable
/// reference of the explicit x86 kernels ([`x86`]), whose per-block f32 arithmetic is the same
/// expression in the same block order.
#[inline(always)]
fn row_dot(t: BlockType, w: &[u8], acts: &QuantActs, i: usize) -> f32 {
    let bytes = t.block_bytes();
    let (m, k) = (acts.m, acts.k);
    let row = &acts.q[i * k..(i + 1) * k];
    let blocks = k / t.block_values();
    let mut sum = 0f32;
    for (b, blk) in w.chunks_exact(bytes).enumerate() {
        let (da, at) = (acts.d[b * m + i], b * m + i);
        match t {
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 => {
                let aq = &row[b * 32..b * 32 + 32];
                let vals = match t {
                    BlockType::Q4_0 => nibbles32(&blk[2..18], 8),
                    BlockType::Q5_0 => fives32(
                        u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
                        &blk[6..22],
                        16,
                    ),
                    _ => {
                        let mut v = [0i8; 32];
                        for (o, &q) in v.iter_mut().zip(&blk[2..34]) {
                            *o = q as i8;
                        }
                        v
                    }
                };
                sum += f16_at(blk, 0) * da * dot32(&vals, aq) as f32;
            }
            BlockType::Q4_1 | BlockType::Q5_1 => {
                let aq = &row[b * 32..b * 32 + 32];
                let vals = if t == BlockType::Q4_1 {
                    nibbles32(&blk[4..20], 0)
                } else {
                    fives32(
                        u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]),
                        &blk[8..24],
                        0,
                    )
                };
                sum += f16_at(blk, 0) * da * dot32(&vals, aq) as f32 + f16_at(blk, 2) * acts.s[at];
            }
            BlockType::Q4K | BlockType::Q5K => {
                let (scales, qh, qs) = if t == BlockType::Q4K {
                    (&blk[4..16], &[][..], &blk[16..144])
                } else {
                    (&blk[4..16], &blk[16..48], &blk[48..176])
                };
                let aq = &row[b * 256..b * 256 + 256];
                let bs = &acts.bsums[(i * blocks + b) * 16..][..16];
                let (mut isum, mut msum) = (0i32, 0i32);
                for chunk in 0..4 {
                    let ql = &qs[chunk * 32..chunk * 32 + 32];
                    for half in 0..2 {
                        let sb = chunk * 2 + half;
                        let mut v = [0i8; 32];
                        for l in 0..32 {
                            let nib = if half == 0 { ql[l] & 0xF } else { ql[l] >> 4 };
                            let high = if qh.is_empty() {
                                0
                            } else {
                                ((qh[l] >> sb) & 1) << 4
                            };
                            v[l] = (nib | high) as i8;
                        }
                        let (sc, m) = scale_min_k4(sb, scales);
                        isum += sc * dot32(&v, &aq[sb * 32..sb * 32 + 32]);
                        msum += m * (bs[2 * sb] as i32 + bs[2 * sb + 1] as i32);
                    }
                }
                sum += f16_at(blk, 0) * da * isum as f32 - f16_at(blk, 2) * da * msum as f32;
            }
            BlockType::Q6K => {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let aq = &row[b * 256..b * 256 + 256];
                let mut isum = 0i32;
                for chunk in 0..2 {
                    let (ql, qh) = (&ql[chunk * 64..], &qh[chunk * 32..]);
                    let mut v = [[0i8; 32]; 4];
                    for l in 0..32 {
                        v[0][l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                        v[1][l] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        v[2][l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        v[3][l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    }
                    for (part, vals) in v.iter().enumerate() {
                        let base = chunk * 128 + part * 32;
                        for h in 0..2 {
                            let scale = sc[chunk * 8 + part * 2 + h] as i8 as i32;
                            isum += scale
                                * dot16(
                                    &vals[h * 16..h * 16 + 16],
                                    &aq[base + h * 16..base + h * 16 + 16],
                                );
                        }
                    }
                }
                sum += f16_at(blk, 208) * da * isum as f32;
            }
        }
    }
    sum
}

/// Where a product's results go: `out` (m, n), `y + bias[j]` stored or added.
#[derive(Clone, Copy)]
struct Target<'a> {
    out: SharedMut<f32>,
    n: usize,
    bias: Option<&'a [f32]>,
    accumulate: bool,
}

impl Target<'_> {
    /// Output (i, j) receives the dot product `y` of activation row i and weight row j.
    ///
    /// # Safety
    /// (i, j) lies in the (m, n) output and no other task writes it.
    #[inline(always)]
    unsafe fn put(&self, i: usize, j: usize, y: f32) {
        let y = y + self.bias.map_or(0.0, |b| b[j]);
        let o = self.out.get().add(i * self.n + j);
        *o = if self.accumulate { *o + y } else { y };
    }
}

super::isa_fn! {
    /// Output columns `j0..j1` of every row by the portable block dots ([`row_dot`]), compiled
    /// for the vector level `isa` proves (for the types without explicit x86 kernels).
    fn columns(
        t: BlockType,
        w: &[u8],
        row_bytes: usize,
        acts: &QuantActs,
        cols: (usize, usize),
        target: Target,
    ) {
        for j in cols.0..cols.1 {
            let wr = &w[j * row_bytes..(j + 1) * row_bytes];
            for i in 0..acts.m {
                // SAFETY: column j belongs to this task.
                unsafe { target.put(i, j, row_dot(t, wr, acts, i)) };
            }
        }
    }
}

/// Block-quantized weights of a linear layer: n rows of k values in blocks of one type, as
/// the GGUF file stores them (held by a [`super::CpuLinear`]).
pub(crate) struct BlockWeights {
    t: BlockType,
    data: Vec<u8>,
}

impl BlockWeights {
    /// `data` must hold `n` rows of `k` values in blocks of `t`.
    pub(crate) fn new(t: BlockType, n: usize, k: usize, data: Vec<u8>) -> Result<Self, String> {
        if !k.is_multiple_of(t.block_values()) {
            return Err(format!("{k} columns do not split into {t:?} blocks"));
        }
        let expected = n * k / t.block_values() * t.block_bytes();
        if data.len() != expected {
            return Err(format!(
                "{t:?} ({n}, {k}) needs {expected} bytes, got {}",
                data.len()
            ));
        }
        Ok(Self { t, data })
    }

    pub(crate) fn block_type(&self) -> BlockType {
        self.t
    }

    pub(crate) fn bytes(&self) -> usize {
        self.data.len()
    }

    /// `y = x · Wᵀ + b` for `x` (m, k), then `out` (m, n) receives `y` as `epilogue` says.
    /// The activations are quantized once; each weight row is read once and multiplied with
    /// every activation row while it is in cache (so a batch of decode rows shares the read).
    pub(crate) fn product(
        &self,
        isa: Isa,
        x: &[f32],
        (m, n, k): (usize, usize, usize),
        bias: Option<&[f32]>,
        out: &mut [f32],
        epilogue: Epilogue,
    ) {
        let format = match self.t {
            BlockType::Q4_1 | BlockType::Q5_1 => ActFormat::Q8_1,
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 => ActFormat::Q8_0,
            BlockType::Q4K | BlockType::Q5K | BlockType::Q6K => ActFormat::Q8K,
        };
        let acts = QuantActs::new(isa, format, x, m, k);
        let row_bytes = k / self.t.block_values() * self.t.block_bytes();
        let target = Target {
            out: SharedMut::new(out),
            n,
            bias,
            accumulate: epilogue == Epilogue::Accumulate,
        };
        #[cfg(target_arch = "x86_64")]
        let explicit = isa.avx2() && x86::handles(self.t);
        #[cfg(not(target_arch = "x86_64"))]
        let explicit = false;
        #[cfg(target_arch = "x86_64")]
        let acts = if explicit {
            x86::prepared(self.t, acts)
        } else {
            acts
        };
        // Weight rows are independent: column ranges in parallel, several per thread (rows of
        // unequal cost on a busy machine), in multiples of the x86 kernels' 8-column tiles, and
        // each worth ~2^17 multiply-adds at least: a decode step's small products (SmolLM2's
        // 576 × 576) take tens of microseconds, where a task more costs about one.
        let min_columns = (1usize << 17).div_ceil(m.max(1) * k.max(1)).max(8);
        parallel::for_ranges(n, 8, min_columns, |j0, j1| {
            #[cfg(target_arch = "x86_64")]
            if explicit {
                // SAFETY: `isa` proves AVX2 (and VNNI where `x86::columns` uses it); columns
                // j0..j1 belong to this task.
                return unsafe {
                    x86::columns(isa, self.t, &self.data, row_bytes, &acts, (j0, j1), target)
                };
            }
            let _ = explicit;
            columns(isa, self.t, &self.data, row_bytes, &acts, (j0, j1), target);
        });
        if epilogue == Epilogue::Gelu {
            math::gelu(isa, out);
        }
    }

    /// The weights as f32 (n, k), decoded from the blocks (for checks).
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        dequantize(self.t, &self.data)
    }
}

/// Blocks of `t` decoded to f32, in order.
pub fn dequantize(t: BlockType, data: &[u8]) -> Vec<f32> {
    let bytes = t.block_bytes();
    let values = t.block_values();
    let mut out = vec![0f32; data.len() / bytes * values];
    for (b, blk) in data.chunks_exact(bytes).enumerate() {
        let o = &mut out[b * values..(b + 1) * values];
        match t {
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 => {
                let d = f16_at(blk, 0);
                let v = match t {
                    BlockType::Q4_0 => nibbles32(&blk[2..18], 8),
                    BlockType::Q5_0 => fives32(
                        u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
                        &blk[6..22],
                        16,
                    ),
                    _ => std::array::from_fn(|i| blk[2 + i] as i8),
                };
                for (o, v) in o.iter_mut().zip(v) {
                    *o = d * v as f32;
                }
            }
            BlockType::Q4_1 | BlockType::Q5_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let v = if t == BlockType::Q4_1 {
                    nibbles32(&blk[4..20], 0)
                } else {
                    fives32(
                        u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]),
                        &blk[8..24],
                        0,
                    )
                };
                for (o, v) in o.iter_mut().zip(v) {
                    *o = d * v as f32 + m;
                }
            }
            BlockType::Q4K | BlockType::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (scales, qh, qs) = if t == BlockType::Q4K {
                    (&blk[4..16], &[][..], &blk[16..144])
                } else {
                    (&blk[4..16], &blk[16..48], &blk[48..176])
                };
                for sb in 0..8 {
                    let (sc, m) = scale_min_k4(sb, scales);
                    let ql = &qs[(sb / 2) * 32..(sb / 2) * 32 + 32];
                    for l in 0..32 {
                        let nib = if sb % 2 == 0 { ql[l] & 0xF } else { ql[l] >> 4 };
                        let high = if qh.is_empty() {
                            0
                        } else {
                            ((qh[l] >> sb) & 1) << 4
                        };
                        o[sb * 32 + l] = d * sc as f32 * (nib | high) as f32 - dmin * m as f32;
                    }
                }
            }
            BlockType::Q6K => {
                let (ql, qh, sc, d) = (
                    &blk[0..128],
                    &blk[128..192],
                    &blk[192..208],
                    f16_at(blk, 208),
                );
                for chunk in 0..2 {
                    let (ql, qh) = (&ql[chunk * 64..], &qh[chunk * 32..]);
                    for l in 0..32 {
                        let q = [
                            ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32,
                            ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
                            ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
                            ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
                        ];
                        for (part, q) in q.into_iter().enumerate() {
                            let s = sc[chunk * 8 + part * 2 + l / 16] as i8 as f32;
                            o[chunk * 128 + part * 32 + l] = d * s * q as f32;
                        }
                    }
                }
            }
        }
    }
    out
}
