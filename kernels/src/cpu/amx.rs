//! int8 products of a few activation rows (a batched decode step: 1 to [`MAX_ROWS`] rows; the
//! dispatch in `linear` sends 2 to 16 here) on AMX tiles, bound by the bandwidth that streams
//! the weights rather than by multiply-adds.
//!
//! The int8 weights are (n, k) row-major, one output channel per row: 16 channels × 64 bytes
//! of k at stride k are already an AMX *A* tile, loaded straight from the weights (no
//! repacking). The activations (u8 with the +128 offset, (m, k) row-major) are packed once per
//! product into the *B* layout: for each 64-byte step of k, 16 tile rows of m columns × 4
//! bytes. `tdpbsud` (A signed, B unsigned) accumulates `Σ_k (x + 128) · w` exactly in the i32
//! C tile (16 channels × m rows): the sums of the `vpdpbusd` kernel, finished with the same
//! f32 arithmetic (offset, scales, bias), so the outputs equal the portable kernel's bit for
//! bit. Where a block has fewer than 16 channels or a step fewer than 64 bytes of k, the tile
//! is staged through a zeroed buffer (the packed activations are zero past k).
//!
//! Rust has no AMX intrinsics: the tile instructions are inline assembly on fixed registers
//! (tmm0 C, tmm4 B, tmm5 A; tmm1..tmm3 and tmm6 are configured for C and A tiles of a wider
//! blocking, unused for now), every tile operation of a call inside [`task`],
//! which configures the tiles first and releases them last. It runs only through an [`Isa`]
//! whose [`Isa::amx_tiles`] proves the CPU, the OS and this process's permission.

use super::linear::Epilogue;
use super::parallel::{for_ranges, SharedMut};
use super::scratch::Scratch;
use super::{math, Isa};

/// The most activation rows one product takes: a C tile holds 16 columns of i32.
pub const MAX_ROWS: usize = 16;
/// Output channels per tile (the rows of an A tile).
const CHANNELS: usize = 16;
/// Bytes of k per tile step (an A tile's row, 16 B tile rows of 4 bytes).
const STEP: usize = 64;
/// Output channels per parallel task at least (a multiple of [`CHANNELS`]).
const CHANNELS_PER_TASK: usize = 64;
/// How far ahead in each weight row the kernel prefetches.
const PREFETCH_BYTES: usize = 1024;

/// Whether [`product`] may run on `isa`.
pub fn available(isa: Isa) -> bool {
    // The finish runs on AVX-512 (every AMX CPU has it; the ISA proves it all the same).
    cfg!(target_arch = "x86_64") && isa.amx_tiles() && isa.avx512()
}

/// The int8 operands of one product, as [`super::gemv`] takes them.
pub(crate) struct Int8Product<'a> {
    /// (m, k) u8 with the +128 offset, and each row's scale.
    pub x: &'a [u8],
    pub xs: &'a [f32],
    /// (n, k) row-major, per-channel scales and `-128 · Σ_k w[j, k]`.
    pub w: &'a [i8],
    pub ws: &'a [f32],
    pub offset: &'a [i32],
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub bias: Option<&'a [f32]>,
}

/// `out[i, j] = (Σ_k x[i, k] · w[j, k] + offset[j]) · xs[i] · ws[j] (+ bias[j])`, then the
/// epilogue; `out` is (m, n). The threads split the output channels.
///
/// # Panics
/// When `isa` does not prove AMX ([`available`]), `m` is not in 1..=[`MAX_ROWS`], or a size
/// does not match.
pub(crate) fn product(isa: Isa, p: &Int8Product, out: &mut [f32], epilogue: Epilogue) {
    assert!(available(isa), "AMX products on {isa}");
    let Int8Product { m, n, k, .. } = *p;
    assert!((1..=MAX_ROWS).contains(&m), "{m} rows");
    assert!(k > 0);
    assert_eq!(p.x.len(), m * k);
    assert_eq!(p.xs.len(), m);
    assert_eq!(p.w.len(), n * k);
    assert_eq!(p.ws.len(), n);
    assert_eq!(p.offset.len(), n);
    assert!(p.bias.is_none_or(|b| b.len() == n));
    assert_eq!(out.len(), m * n);
    let mut packed = Scratch::<u8>::new(k.div_ceil(STEP) * STEP * m);
    let shared = SharedMut::new(out);
    let accumulate = epilogue == Epilogue::Accumulate;
    // SAFETY: as below; `packed` has the size `pack_activations` fills.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        pack_activations(p.x, m, k, &mut packed)
    };
    #[cfg(target_arch = "x86_64")]
    for_ranges(n, CHANNELS, CHANNELS_PER_TASK, |j0, j1| {
        // SAFETY: `available` proved the tile instructions, AVX-512 and the permission; the sizes
        // are checked above; each task writes only columns j0..j1 of the output.
        unsafe { task(p, &packed, j0, j1, shared, accumulate) }
    });
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (shared, accumulate, &mut packed);
    if epilogue == Epilogue::Gelu {
        math::gelu(isa, out);
    }
}

/// The activations in the B-tile layout: for every 4-byte group g of k (k padded with zeros
/// to whole steps), the m rows' groups side by side: `packed[(g · m + i) · 4 + e] =
/// x[i, 4g + e]`. A step's B tile is then 16 rows of `4m` bytes, contiguous. Each step is a
/// transpose of (m rows × 16 groups) u32, rows past m and bytes past k loaded as zeros.
///
/// # Safety
/// AVX-512 F/BW/VL/DQ; `x` is (m, k) with 1 <= m <= 16, `packed` holds `k.div_ceil(64) · 64 ·
/// m` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn pack_activations(x: &[u8], m: usize, k: usize, packed: &mut [u8]) {
    use std::arch::x86_64::*;

    debug_assert!(m <= MAX_ROWS && x.len() == m * k);
    debug_assert_eq!(packed.len(), k.div_ceil(STEP) * STEP * m);
    let lanes: __mmask16 = ((1u32 << m) - 1) as __mmask16;
    let dst = packed.as_mut_ptr();
    for s in 0..k.div_ceil(STEP) {
        let from = s * STEP;
        let bytes = (k - from).min(STEP);
        let in_k: __mmask64 = if bytes == STEP {
            !0
        } else {
            (1u64 << bytes) - 1
        };
        let rows: [__m512i; 16] = std::array::from_fn(|i| {
            if i < m {
                _mm512_maskz_loadu_epi8(in_k, x.as_ptr().add(i * k + from) as *const i8)
            } else {
                _mm512_setzero_si512()
            }
        });
        // Group g of this step, the m rows' words side by side.
        for (g, column) in transpose(rows).iter().enumerate() {
            let at = dst.add(((s * 16 + g) * m) * 4) as *mut i32;
            _mm512_mask_storeu_epi32(at, lanes, *column);
        }
    }
}

/// `ldtilecfg`'s operand (palette 1): bytes, then each register's row width and row count.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of tmm0..tmm15 (only tmm0..tmm7 exist).
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// C tiles tmm0..tmm3 (16 channels × m i32), B tile tmm4 (16 rows × 4m bytes), A tiles
    /// tmm5..tmm6 (16 channels × 64 bytes). The kernel uses tmm0, tmm4 and tmm5.
    fn for_rows(m: usize) -> Self {
        let mut c = Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..4 {
            c.colsb[t] = (4 * m) as u16;
            c.rows[t] = CHANNELS as u8;
        }
        c.colsb[4] = (4 * m) as u16;
        c.rows[4] = (STEP / 4) as u8;
        for t in 5..7 {
            c.colsb[t] = STEP as u16;
            c.rows[t] = CHANNELS as u8;
        }
        c
    }
}

/// Output channels `j0..j1` (j0 a multiple of 16): blocks of 16 channels, each streaming its
/// weight rows in 64-byte steps against the packed activations, then finished into the
/// output.
///
/// # Safety
/// The CPU runs AMX-TILE, AMX-INT8 and AVX-512 F/BW/VL/DQ, and this process holds the tile
/// permission; the operands' sizes match `p`, `packed` is [`pack_activations`]' layout for
/// them, and no other task writes columns `j0..j1` of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn task(
    p: &Int8Product,
    packed: &[u8],
    j0: usize,
    j1: usize,
    out: SharedMut<f32>,
    accumulate: bool,
) {
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    let Int8Product { m, k, .. } = *p;
    let (full_steps, tail) = (k / STEP, k % STEP);
    let b_stride = 4 * m;
    let config = TileConfig::for_rows(m);
    asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
    let w = p.w.as_ptr();
    let b = packed.as_ptr();
    // A partial tile (fewer channels or bytes of k than a whole one), zero elsewhere.
    let mut staged = Staged([0; CHANNELS * STEP]);
    let mut sums = Sums([0; CHANNELS * CHANNELS]);
    let mut j = j0;
    while j < j1 {
        let channels = (j1 - j).min(CHANNELS);
        let a = w.add(j * k);
        asm!("tilezero tmm0", options(nostack, nomem));
        if channels == CHANNELS {
            for s in 0..full_steps {
                for c in 0..CHANNELS {
                    // A prefetch never faults, so it may run past the row's end.
                    let ahead = a.wrapping_add(c * k + s * STEP + PREFETCH_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                }
                asm!(
                    "tileloadd tmm4, [{b} + {ldb}*1]",
                    "tileloadd tmm5, [{a} + {lda}*1]",
                    "tdpbsud tmm0, tmm5, tmm4",
                    b = in(reg) b.add(s * STEP * m),
                    ldb = in(reg) b_stride,
                    a = in(reg) a.add(s * STEP),
                    lda = in(reg) k,
                    options(nostack, readonly),
                );
            }
        } else {
            // The last block of fewer channels: every step staged.
            for s in 0..full_steps {
                staged.fill(a, channels, k, s * STEP, STEP);
                asm!(
                    "tileloadd tmm4, [{b} + {ldb}*1]",
                    "tileloadd tmm5, [{a} + {lda}*1]",
                    "tdpbsud tmm0, tmm5, tmm4",
                    b = in(reg) b.add(s * STEP * m),
                    ldb = in(reg) b_stride,
                    a = in(reg) staged.0.as_ptr(),
                    lda = in(reg) STEP,
                    options(nostack, readonly),
                );
            }
        }
        if tail > 0 {
            staged.fill(a, channels, k, full_steps * STEP, tail);
            asm!(
                "tileloadd tmm4, [{b} + {ldb}*1]",
                "tileloadd tmm5, [{a} + {lda}*1]",
                "tdpbsud tmm0, tmm5, tmm4",
                b = in(reg) b.add(full_steps * STEP * m),
                ldb = in(reg) b_stride,
                a = in(reg) staged.0.as_ptr(),
                lda = in(reg) STEP,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c} + {cs}*1], tmm0",
            c = in(reg) sums.0.as_mut_ptr(),
            cs = in(reg) CHANNELS * 4,
            options(nostack),
        );
        finish(p, &sums, j, channels, out.get(), accumulate);
        j += channels;
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// A tile of 16 rows × 64 bytes, aligned to cache lines.
#[repr(C, align(64))]
struct Staged([i8; CHANNELS * STEP]);

impl Staged {
    /// Bytes `from..from + len` of `channels` weight rows (at stride `k` from `a`), zeros in
    /// the rest of each row and in the rows past `channels`.
    ///
    /// # Safety
    /// `a` points at `channels` rows of `k` bytes, and `from + len <= k`.
    #[inline(always)]
    unsafe fn fill(&mut self, a: *const i8, channels: usize, k: usize, from: usize, len: usize) {
        for (c, row) in self.0.chunks_exact_mut(STEP).enumerate() {
            if c < channels {
                let src = std::slice::from_raw_parts(a.add(c * k + from), len);
                row[..len].copy_from_slice(src);
                row[len..].fill(0);
            } else {
                row.fill(0);
            }
        }
    }
}

/// A C tile as stored: channel c's sums for the activation rows at `[c · 16 ..]`.
#[repr(C, align(64))]
struct Sums([i32; CHANNELS * CHANNELS]);

/// The outputs of `channels` channels from `j`: the C tile transposed (16 × 16 i32, channels
/// across the lanes), then per activation row the `vpdpbusd` kernel's f32 arithmetic on the
/// same integer sums in the same order (convert, × xs, × ws, + bias, then + the residual),
/// so the results are identical; each row's 16 outputs are one (masked) store.
///
/// # Safety
/// AVX-512 F/BW/VL/DQ; `out` is the (m, n) output, columns `j..j + channels` this task's
/// alone.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish(
    p: &Int8Product,
    sums: &Sums,
    j: usize,
    channels: usize,
    out: *mut f32,
    accumulate: bool,
) {
    use std::arch::x86_64::*;

    let rows: [__m512i; CHANNELS] =
        std::array::from_fn(|c| _mm512_load_si512(sums.0.as_ptr().add(c * CHANNELS) as *const _));
    let columns = transpose(rows);
    let mask: __mmask16 = if channels == CHANNELS {
        !0
    } else {
        (1u16 << channels) - 1
    };
    let offset = _mm512_maskz_loadu_epi32(mask, p.offset.as_ptr().add(j));
    let ws = _mm512_maskz_loadu_ps(mask, p.ws.as_ptr().add(j));
    let bias = match p.bias {
        Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(j)),
        None => _mm512_setzero_ps(),
    };
    for (i, &xs) in p.xs.iter().enumerate() {
        let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(columns[i], offset));
        let y = _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(xs)), ws);
        let mut y = _mm512_add_ps(y, bias);
        let o = out.add(i * p.n + j);
        if accumulate {
            y = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), y);
        }
        _mm512_mask_storeu_ps(o, mask, y);
    }
}

/// The transpose of a 16 × 16 i32 matrix held as 16 row vectors: 32-bit, then 64-bit
/// interleaves, then two rounds of 128-bit lane shuffles.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;

    // a[2i], a[2i + 1]: rows 2i and 2i + 1 interleaved (low and high pairs of each lane).
    let mut a = r;
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + q], lane l: column 4l + q of rows 4i..4i + 4.
    let mut b = a;
    for i in 0..4 {
        let (a0, a1, a2, a3) = (a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]);
        b[4 * i] = _mm512_unpacklo_epi64(a0, a2);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a0, a2);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a1, a3);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a1, a3);
    }
    // Column 4l + q: lane l of b[q], b[4 + q], b[8 + q], b[12 + q].
    let mut t = b;
    for q in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0x88>(b[q], b[4 + q]);
        let c1 = _mm512_shuffle_i32x4::<0xdd>(b[q], b[4 + q]);
        let d0 = _mm512_shuffle_i32x4::<0x88>(b[8 + q], b[12 + q]);
        let d1 = _mm512_shuffle_i32x4::<0xdd>(b[8 + q], b[12 + q]);
        t[q] = _mm512_shuffle_i32x4::<0x88>(c0, d0);
        t[4 + q] = _mm512_shuffle_i32x4::<0x88>(c1, d1);
        t[8 + q] = _mm512_shuffle_i32x4::<0xdd>(c0, d0);
        t[12 + q] = _mm512_shuffle_i32x4::<0xdd>(c1, d1);
    }
    t
}
