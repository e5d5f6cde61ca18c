//! Products of a few activation rows with a large weight matrix (`y = x · Wᵀ` with at most
//! `MAX_ROWS` rows of x), the shape of every LLM decode step. They read each weight once and
//! are bound by memory bandwidth, which BLAS libraries do not reach at this size on one or two
//! cores; these kernels stream four weight rows at a time with AVX-512 dot-product
//! instructions (`vdpbf16ps` for bf16, `vpdpbusd` for u8 x s8), split over the thread pool.

#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

/// The most activation rows these kernels take.
pub const MAX_ROWS: usize = 4;
/// Weight rows per parallel task (a multiple of 4).
const ROWS_PER_TASK: usize = 64;

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements; the owner outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn tasks(n: usize) -> usize {
    // Enough tasks to balance two to a few threads without drowning in scheduling.
    let threads = rayon::current_num_threads().max(1);
    let by_size = n.div_ceil(ROWS_PER_TASK);
    by_size.min(threads * 8).max(1)
}

/// Splits [0, n) into `parts` ranges whose boundaries are multiples of 4.
fn range(n: usize, parts: usize, i: usize) -> (usize, usize) {
    let per = n.div_ceil(parts).next_multiple_of(4);
    ((i * per).min(n), ((i + 1) * per).min(n))
}

/// `out[i, j] = Σ_k x[i, k] · w[j, k]` (+ `bias[j]`), bf16 inputs, f32 accumulation.
/// `x` is (m, k), `w` (n, k), `out` (m, n); m <= MAX_ROWS.
pub fn bf16(
    x: &[u16],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!((1..=MAX_ROWS).contains(&m));
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    let parts = tasks(n);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|p| {
        let (j0, j1) = range(n, parts, p);
        // Capture the whole `OutPtr` (Send + Sync), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        // SAFETY: the caller checked the CPU features (see `CpuFeatures::reduced_precision`),
        // the slices have the asserted sizes and each task writes only columns j0..j1.
        unsafe {
            match m {
                1 => bf16_block::<1>(x, w, k, n, j0, j1, bias, ptr.0),
                2 => bf16_block::<2>(x, w, k, n, j0, j1, bias, ptr.0),
                3 => bf16_block::<3>(x, w, k, n, j0, j1, bias, ptr.0),
                _ => bf16_block::<4>(x, w, k, n, j0, j1, bias, ptr.0),
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16_block<const M: usize>(
    x: &[u16],
    w: &[u16],
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let full = k / 32;
    let tail = k % 32;
    let tail_mask: __mmask32 = if tail == 0 { 0 } else { (1u32 << tail) - 1 };
    let load = |p: *const u16, masked: bool| -> __m512bh {
        if masked {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                tail_mask,
                p as *const i16,
            ))
        } else {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _))
        }
    };
    let mut j = j0;
    while j < j1 {
        let rows = (j1 - j).min(4);
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        let wrow = |r: usize| w.as_ptr().add((j + r.min(rows - 1)) * k);
        for c in 0..full + (tail > 0) as usize {
            let masked = c == full;
            let off = c * 32;
            let w0 = load(wrow(0).add(off), masked);
            let w1 = load(wrow(1).add(off), masked);
            let w2 = load(wrow(2).add(off), masked);
            let w3 = load(wrow(3).add(off), masked);
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = load(x.as_ptr().add(i * k + off), masked);
                a[0] = _mm512_dpbf16_ps(a[0], xv, w0);
                a[1] = _mm512_dpbf16_ps(a[1], xv, w1);
                a[2] = _mm512_dpbf16_ps(a[2], xv, w2);
                a[3] = _mm512_dpbf16_ps(a[3], xv, w3);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate().take(rows) {
                let b = bias.map_or(0.0, |b| b[j + r]);
                *out.add(i * n + j + r) = _mm512_reduce_add_ps(*v) + b;
            }
        }
        j += rows;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn bf16_block<const M: usize>(
    _: &[u16],
    _: &[u16],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: Option<&[f32]>,
    _: *mut f32,
) {
    unreachable!("reduced-precision kernels are only selected on x86_64")
}

/// `out[i, j] = Σ_k x[i, k] · w[j, k]` (+ `bias[j]`) in f32; m <= MAX_ROWS. Needs AVX-512F.
pub fn f32(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!((1..=MAX_ROWS).contains(&m));
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    let parts = tasks(n);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|p| {
        let (j0, j1) = range(n, parts, p);
        // Capture the whole `OutPtr` (Send + Sync), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        // SAFETY: as for `bf16` (the caller checked AVX-512F).
        unsafe {
            match m {
                1 => f32_block::<1>(x, w, k, n, j0, j1, bias, ptr.0),
                2 => f32_block::<2>(x, w, k, n, j0, j1, bias, ptr.0),
                3 => f32_block::<3>(x, w, k, n, j0, j1, bias, ptr.0),
                _ => f32_block::<4>(x, w, k, n, j0, j1, bias, ptr.0),
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f32_block<const M: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let full = k / 16;
    let tail = k % 16;
    let tail_mask: __mmask16 = if tail == 0 {
        0
    } else {
        ((1u32 << tail) - 1) as u16
    };
    let load = |p: *const f32, masked: bool| -> __m512 {
        if masked {
            _mm512_maskz_loadu_ps(tail_mask, p)
        } else {
            _mm512_loadu_ps(p)
        }
    };
    let mut j = j0;
    while j < j1 {
        let rows = (j1 - j).min(4);
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        let wrow = |r: usize| w.as_ptr().add((j + r.min(rows - 1)) * k);
        for c in 0..full + (tail > 0) as usize {
            let masked = c == full;
            let off = c * 16;
            let w0 = load(wrow(0).add(off), masked);
            let w1 = load(wrow(1).add(off), masked);
            let w2 = load(wrow(2).add(off), masked);
            let w3 = load(wrow(3).add(off), masked);
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = load(x.as_ptr().add(i * k + off), masked);
                a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                a[2] = _mm512_fmadd_ps(xv, w2, a[2]);
                a[3] = _mm512_fmadd_ps(xv, w3, a[3]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate().take(rows) {
                let b = bias.map_or(0.0, |b| b[j + r]);
                *out.add(i * n + j + r) = _mm512_reduce_add_ps(*v) + b;
            }
        }
        j += rows;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn f32_block<const M: usize>(
    _: &[f32],
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: Option<&[f32]>,
    _: *mut f32,
) {
    unreachable!("the f32 small-batch kernel is only selected on x86_64")
}

/// `out[i, j] = (Σ_k xq[i, k] · wq[j, k] + offset[j]) · xs[i] · ws[j] + bias[j]` where `xq` holds
/// u8 values with a +128 offset and `offset[j] = -128 · Σ_k wq[j, k]` removes it.
pub fn int8(
    xq: &[u8],
    xs: &[f32],
    m: usize,
    wq: &[i8],
    ws: &[f32],
    offset: &[i32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!((1..=MAX_ROWS).contains(&m));
    assert_eq!(xq.len(), m * k);
    assert_eq!(xs.len(), m);
    assert_eq!(wq.len(), n * k);
    assert_eq!(ws.len(), n);
    assert_eq!(offset.len(), n);
    assert_eq!(out.len(), m * n);
    let parts = tasks(n);
    let ptr = OutPtr(out.as_mut_ptr());
    let w = Int8Weights {
        wq,
        ws,
        offset,
        bias,
    };
    (0..parts).into_par_iter().for_each(|p| {
        let (j0, j1) = range(n, parts, p);
        // Capture the whole `OutPtr` (Send + Sync), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        // SAFETY: as for `bf16`.
        unsafe {
            match m {
                1 => int8_block::<1>(xq, xs, &w, k, n, j0, j1, ptr.0),
                2 => int8_block::<2>(xq, xs, &w, k, n, j0, j1, ptr.0),
                3 => int8_block::<3>(xq, xs, &w, k, n, j0, j1, ptr.0),
                _ => int8_block::<4>(xq, xs, &w, k, n, j0, j1, ptr.0),
            }
        }
    });
}

struct Int8Weights<'a> {
    wq: &'a [i8],
    ws: &'a [f32],
    offset: &'a [i32],
    bias: Option<&'a [f32]>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_block<const M: usize>(
    xq: &[u8],
    xs: &[f32],
    w: &Int8Weights,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let full = k / 64;
    let tail = k % 64;
    let tail_mask: __mmask64 = if tail == 0 { 0 } else { (1u64 << tail) - 1 };
    let load = |p: *const i8, masked: bool| -> __m512i {
        if masked {
            _mm512_maskz_loadu_epi8(tail_mask, p)
        } else {
            _mm512_loadu_si512(p as *const _)
        }
    };
    let mut j = j0;
    while j < j1 {
        let rows = (j1 - j).min(4);
        let mut acc = [[_mm512_setzero_si512(); 4]; M];
        let wrow = |r: usize| w.wq.as_ptr().add((j + r.min(rows - 1)) * k);
        for c in 0..full + (tail > 0) as usize {
            let masked = c == full;
            let off = c * 64;
            let w0 = load(wrow(0).add(off), masked);
            let w1 = load(wrow(1).add(off), masked);
            let w2 = load(wrow(2).add(off), masked);
            let w3 = load(wrow(3).add(off), masked);
            for (i, a) in acc.iter_mut().enumerate() {
                // Masked-out bytes load as 0 in x, so they add nothing.
                let xv = load(xq.as_ptr().add(i * k + off) as *const i8, masked);
                a[0] = _mm512_dpbusd_epi32(a[0], xv, w0);
                a[1] = _mm512_dpbusd_epi32(a[1], xv, w1);
                a[2] = _mm512_dpbusd_epi32(a[2], xv, w2);
                a[3] = _mm512_dpbusd_epi32(a[3], xv, w3);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate().take(rows) {
                let jr = j + r;
                let dot = _mm512_reduce_add_epi32(*v) + w.offset[jr];
                let b = w.bias.map_or(0.0, |b| b[jr]);
                *out.add(i * n + jr) = dot as f32 * xs[i] * w.ws[jr] + b;
            }
        }
        j += rows;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn int8_block<const M: usize>(
    _: &[u8],
    _: &[f32],
    _: &Int8Weights,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
) {
    unreachable!("reduced-precision kernels are only selected on x86_64")
}
