//! Products of a few activation rows with a large weight matrix (`y = x · Wᵀ` with at most
//! [`MAX_ROWS`] rows of x), the shape of every LLM decode step. They read each weight once and
//! are bound by memory bandwidth, which BLAS libraries do not reach at this size on one or two
//! cores: these kernels stream four weight rows at a time against every activation row, split
//! by columns over the thread pool.
//!
//! One generic block ([`block`]) serves every precision and vector width through [`Lanes`]
//! (how to load, multiply-add and reduce one vector of an operand pair): f32 FMA, bf16
//! `vdpbf16ps`, u8 × s8 `vpdpbusd` on AVX-512, and portable versions of each. [`product`] is the
//! only entry: it picks the version the caller's [`Isa`] proves the CPU can run.

use super::parallel::{for_ranges, SharedMut};
use super::Isa;

/// The most activation rows these kernels take.
pub const MAX_ROWS: usize = 4;
/// Weight rows per parallel task at least (a multiple of 4).
const ROWS_PER_TASK: usize = 64;

/// Activation rows in the weights' operand type: (m, k) row-major.
#[derive(Clone, Copy)]
pub(crate) enum XRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    /// u8 values with a +128 offset, and each row's scale.
    Int8 {
        q: &'a [u8],
        scale: &'a [f32],
    },
}

/// Weight rows: (n, k) row-major.
#[derive(Clone, Copy)]
pub(crate) enum WRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    /// Per-output-channel scales, and `-128 · Σ_k q[j, k]` (removes the activations' offset).
    Int8 {
        q: &'a [i8],
        scale: &'a [f32],
        offset: &'a [i32],
    },
}

/// `out[i, j] = x_i · w_j (+ bias[j])` for the m <= [`MAX_ROWS`] rows of `x`; `out` is (m, n).
/// For int8, `x_i · w_j` is `(Σ_k xq[i, k] · wq[j, k] + offset[j]) · xs[i] · ws[j]`.
///
/// # Panics
/// When the operands' precisions differ or a size does not match.
pub(crate) fn product(
    isa: Isa,
    x: XRows,
    m: usize,
    w: WRows,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!((1..=MAX_ROWS).contains(&m), "{m} rows");
    assert_eq!(out.len(), m * n);
    assert!(bias.is_none_or(|b| b.len() == n));
    let shape = Shape { m, n, k, bias };
    match (x, w) {
        (XRows::F32(x), WRows::F32(w)) => {
            #[cfg(target_arch = "x86_64")]
            if isa.avx512() {
                // SAFETY: `isa` proves the AVX-512 features `avx512` enables.
                return unsafe { drive(avx512::<x86::F32x16>, x, w, shape, &(), out) };
            }
            // SAFETY: the portable block needs no CPU feature.
            unsafe { drive(portable::<scalar::F32>, x, w, shape, &(), out) }
        }
        (XRows::Bf16(x), WRows::Bf16(w)) => {
            #[cfg(target_arch = "x86_64")]
            if isa.avx512_bf16() {
                // SAFETY: `isa` proves AVX-512 BF16, which `avx512_bf16` enables.
                return unsafe { drive(avx512_bf16::<x86::Bf16x32>, x, w, shape, &(), out) };
            }
            // SAFETY: the portable block needs no CPU feature.
            unsafe { drive(portable::<scalar::Bf16>, x, w, shape, &(), out) }
        }
        (
            XRows::Int8 { q: x, scale: xs },
            WRows::Int8 {
                q: w,
                scale: ws,
                offset,
            },
        ) => {
            assert_eq!(xs.len(), m);
            assert_eq!(ws.len(), n);
            assert_eq!(offset.len(), n);
            let scales = Int8Scales { xs, ws, offset };
            #[cfg(target_arch = "x86_64")]
            if isa.avx512_vnni() {
                // SAFETY: `isa` proves AVX-512 VNNI, which `avx512_vnni` enables.
                return unsafe { drive(avx512_vnni::<x86::U8S8x64>, x, w, shape, &scales, out) };
            }
            // SAFETY: the portable block needs no CPU feature.
            unsafe { drive(portable::<scalar::U8S8>, x, w, shape, &scales, out) }
        }
        _ => panic!("activations and weights of different precisions"),
    }
}

#[derive(Clone, Copy)]
struct Shape<'a> {
    m: usize,
    n: usize,
    k: usize,
    bias: Option<&'a [f32]>,
}

/// What one task computes: columns `j0..j1` of every output row.
struct Tile<'a, X, W> {
    x: &'a [X],
    w: &'a [W],
    shape: Shape<'a>,
    j0: usize,
    j1: usize,
    out: SharedMut<f32>,
}

/// Turns the int8 dot products into outputs.
struct Int8Scales<'a> {
    xs: &'a [f32],
    ws: &'a [f32],
    offset: &'a [i32],
}

/// One vector width and operand pairing of the few-row kernels.
trait Lanes {
    type X: Copy + Sync;
    type W: Copy + Sync;
    type XV: Copy;
    type WV: Copy;
    type Acc: Copy;
    /// What turns a finished dot product into the output (scales for int8).
    type Scales<'s>: Sync;
    /// Elements of k per vector.
    const STEP: usize;

    unsafe fn zero() -> Self::Acc;
    /// `STEP` elements from `p`, or the first `tail` of them (the rest zero) when `tail > 0`.
    unsafe fn load_x(p: *const Self::X, tail: usize) -> Self::XV;
    unsafe fn load_w(p: *const Self::W, tail: usize) -> Self::WV;
    unsafe fn madd(acc: Self::Acc, x: Self::XV, w: Self::WV) -> Self::Acc;
    /// The output of activation row `i` and weight row `j` (without the bias).
    unsafe fn finish(acc: Self::Acc, i: usize, j: usize, scales: &Self::Scales<'_>) -> f32;
}

/// The output of an int8 dot product: exact in i32 until the offset is removed.
#[inline(always)]
fn int8_output(dot: i32, i: usize, j: usize, s: &Int8Scales) -> f32 {
    (dot + s.offset[j]) as f32 * s.xs[i] * s.ws[j]
}

/// Splits the columns over the pool and runs `kernel` on each range.
///
/// # Safety
/// `kernel` must be safe to run on this CPU.
unsafe fn drive<X: Sync, W: Sync, S: Sync>(
    kernel: unsafe fn(&Tile<X, W>, &S),
    x: &[X],
    w: &[W],
    shape: Shape,
    scales: &S,
    out: &mut [f32],
) {
    assert_eq!(x.len(), shape.m * shape.k);
    assert_eq!(w.len(), shape.n * shape.k);
    let out = SharedMut::new(out);
    for_ranges(shape.n, 4, ROWS_PER_TASK, |j0, j1| {
        let tile = Tile {
            x,
            w,
            shape,
            j0,
            j1,
            out,
        };
        // SAFETY: the caller vouches for the CPU; the sizes are checked above and each task
        // writes only its columns j0..j1.
        unsafe { kernel(&tile, scales) }
    });
}

/// Four weight rows at a time against the `M` activation rows.
#[inline(always)]
unsafe fn block<L: Lanes, const M: usize>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    let Shape { n, k, bias, .. } = t.shape;
    let (full, tail) = (k / L::STEP, k % L::STEP);
    let (x, w, out) = (t.x.as_ptr(), t.w.as_ptr(), t.out.get());
    let mut j = t.j0;
    while j < t.j1 {
        let rows = (t.j1 - j).min(4);
        let mut acc = [[L::zero(); 4]; M];
        // Rows past the end repeat the last one (their sums are not stored).
        let wrow = |r: usize| w.add((j + r.min(rows - 1)) * k);
        for c in 0..full + (tail > 0) as usize {
            let len = if c == full { tail } else { 0 };
            let off = c * L::STEP;
            let wv = [0, 1, 2, 3].map(|r| L::load_w(wrow(r).add(off), len));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = L::load_x(x.add(i * k + off), len);
                for (a, &wv) in a.iter_mut().zip(&wv) {
                    *a = L::madd(*a, xv, wv);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, &v) in a.iter().enumerate().take(rows) {
                let b = bias.map_or(0.0, |b| b[j + r]);
                *out.add(i * n + j + r) = L::finish(v, i, j + r, scales) + b;
            }
        }
        j += rows;
    }
}

/// [`block`] for the tile's row count.
#[inline(always)]
unsafe fn rows<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    match t.shape.m {
        1 => block::<L, 1>(t, scales),
        2 => block::<L, 2>(t, scales),
        3 => block::<L, 3>(t, scales),
        _ => block::<L, 4>(t, scales),
    }
}

unsafe fn portable<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    rows::<L>(t, scales)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn avx512<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    rows::<L>(t, scales)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
unsafe fn avx512_bf16<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    rows::<L>(t, scales)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
unsafe fn avx512_vnni<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    rows::<L>(t, scales)
}

/// Portable lanes: eight elements in plain arrays (the compiler vectorises them for its
/// baseline). bf16 products are exact in f32 (8-bit significands); int8 sums exact in i32.
mod scalar {
    use super::{int8_output, Int8Scales, Lanes};

    const STEP: usize = 8;

    #[inline(always)]
    unsafe fn load<T: Copy + Default, V: Copy + Default>(
        p: *const T,
        tail: usize,
        f: impl Fn(T) -> V,
    ) -> [V; STEP] {
        let len = if tail == 0 { STEP } else { tail };
        let mut v = [V::default(); STEP];
        for (i, v) in v.iter_mut().enumerate().take(len) {
            *v = f(*p.add(i));
        }
        v
    }

    pub struct F32;
    impl Lanes for F32 {
        type X = f32;
        type W = f32;
        type XV = [f32; STEP];
        type WV = [f32; STEP];
        type Acc = [f32; STEP];
        type Scales<'s> = ();
        const STEP: usize = STEP;
        #[inline(always)]
        unsafe fn zero() -> Self::Acc {
            [0.0; STEP]
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32, tail: usize) -> Self::XV {
            load(p, tail, |v| v)
        }
        #[inline(always)]
        unsafe fn load_w(p: *const f32, tail: usize) -> Self::WV {
            load(p, tail, |v| v)
        }
        #[inline(always)]
        unsafe fn madd(mut acc: Self::Acc, x: Self::XV, w: Self::WV) -> Self::Acc {
            for i in 0..STEP {
                acc[i] += x[i] * w[i];
            }
            acc
        }
        #[inline(always)]
        unsafe fn finish(acc: Self::Acc, _: usize, _: usize, _: &()) -> f32 {
            acc.iter().sum()
        }
    }

    pub struct Bf16;
    impl Lanes for Bf16 {
        type X = u16;
        type W = u16;
        type XV = [f32; STEP];
        type WV = [f32; STEP];
        type Acc = [f32; STEP];
        type Scales<'s> = ();
        const STEP: usize = STEP;
        #[inline(always)]
        unsafe fn zero() -> Self::Acc {
            [0.0; STEP]
        }
        #[inline(always)]
        unsafe fn load_x(p: *const u16, tail: usize) -> Self::XV {
            load(p, tail, crate::cpu::convert::bf16_to_f32)
        }
        #[inline(always)]
        unsafe fn load_w(p: *const u16, tail: usize) -> Self::WV {
            load(p, tail, crate::cpu::convert::bf16_to_f32)
        }
        #[inline(always)]
        unsafe fn madd(acc: Self::Acc, x: Self::XV, w: Self::WV) -> Self::Acc {
            F32::madd(acc, x, w)
        }
        #[inline(always)]
        unsafe fn finish(acc: Self::Acc, _: usize, _: usize, _: &()) -> f32 {
            acc.iter().sum()
        }
    }

    pub struct U8S8;
    impl Lanes for U8S8 {
        type X = u8;
        type W = i8;
        type XV = [i32; STEP];
        type WV = [i32; STEP];
        type Acc = [i32; STEP];
        type Scales<'s> = Int8Scales<'s>;
        const STEP: usize = STEP;
        #[inline(always)]
        unsafe fn zero() -> Self::Acc {
            [0; STEP]
        }
        #[inline(always)]
        unsafe fn load_x(p: *const u8, tail: usize) -> Self::XV {
            load(p, tail, i32::from)
        }
        #[inline(always)]
        unsafe fn load_w(p: *const i8, tail: usize) -> Self::WV {
            load(p, tail, i32::from)
        }
        #[inline(always)]
        unsafe fn madd(mut acc: Self::Acc, x: Self::XV, w: Self::WV) -> Self::Acc {
            for i in 0..STEP {
                acc[i] += x[i] * w[i];
            }
            acc
        }
        #[inline(always)]
        unsafe fn finish(acc: Self::Acc, i: usize, j: usize, s: &Int8Scales) -> f32 {
            int8_output(acc.iter().sum(), i, j, s)
        }
    }
}

/// AVX-512 lanes. Their methods are `#[inline(always)]` without features of their own: they
/// only ever run inlined into the `#[target_feature]` wrappers above.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{int8_output, Int8Scales, Lanes};

    #[inline(always)]
    fn mask(tail: usize) -> u64 {
        (1u64 << tail) - 1
    }

    pub struct F32x16;
    impl Lanes for F32x16 {
        type X = f32;
        type W = f32;
        type XV = __m512;
        type WV = __m512;
        type Acc = __m512;
        type Scales<'s> = ();
        const STEP: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32, tail: usize) -> __m512 {
            if tail == 0 {
                _mm512_loadu_ps(p)
            } else {
                _mm512_maskz_loadu_ps(mask(tail) as __mmask16, p)
            }
        }
        #[inline(always)]
        unsafe fn load_w(p: *const f32, tail: usize) -> __m512 {
            Self::load_x(p, tail)
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512, x: __m512, w: __m512) -> __m512 {
            _mm512_fmadd_ps(x, w, acc)
        }
        #[inline(always)]
        unsafe fn finish(acc: __m512, _: usize, _: usize, _: &()) -> f32 {
            _mm512_reduce_add_ps(acc)
        }
    }

    pub struct Bf16x32;
    impl Lanes for Bf16x32 {
        type X = u16;
        type W = u16;
        type XV = __m512bh;
        type WV = __m512bh;
        type Acc = __m512;
        type Scales<'s> = ();
        const STEP: usize = 32;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_x(p: *const u16, tail: usize) -> __m512bh {
            let v = if tail == 0 {
                _mm512_loadu_si512(p as *const _)
            } else {
                _mm512_maskz_loadu_epi16(mask(tail) as __mmask32, p as *const i16)
            };
            std::mem::transmute::<__m512i, __m512bh>(v)
        }
        #[inline(always)]
        unsafe fn load_w(p: *const u16, tail: usize) -> __m512bh {
            Self::load_x(p, tail)
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512, x: __m512bh, w: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(acc, x, w)
        }
        #[inline(always)]
        unsafe fn finish(acc: __m512, _: usize, _: usize, _: &()) -> f32 {
            _mm512_reduce_add_ps(acc)
        }
    }

    pub struct U8S8x64;
    impl Lanes for U8S8x64 {
        type X = u8;
        type W = i8;
        type XV = __m512i;
        type WV = __m512i;
        type Acc = __m512i;
        type Scales<'s> = Int8Scales<'s>;
        const STEP: usize = 64;
        #[inline(always)]
        unsafe fn zero() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn load_x(p: *const u8, tail: usize) -> __m512i {
            // Masked-out bytes load as 0, so they add nothing.
            Self::load_w(p as *const i8, tail)
        }
        #[inline(always)]
        unsafe fn load_w(p: *const i8, tail: usize) -> __m512i {
            if tail == 0 {
                _mm512_loadu_si512(p as *const _)
            } else {
                _mm512_maskz_loadu_epi8(mask(tail), p)
            }
        }
        #[inline(always)]
        unsafe fn madd(acc: __m512i, x: __m512i, w: __m512i) -> __m512i {
            _mm512_dpbusd_epi32(acc, x, w)
        }
        #[inline(always)]
        unsafe fn finish(acc: __m512i, i: usize, j: usize, s: &Int8Scales) -> f32 {
            int8_output(_mm512_reduce_add_epi32(acc), i, j, s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_rows_match_the_f64_product_on_every_isa() {
        // k with a tail for every vector width, n not a multiple of 4.
        let (n, k) = (23, 77);
        let value = |i: usize| ((i * 7919) % 211) as f32 / 105.0 - 1.0;
        let w: Vec<f32> = (0..n * k).map(value).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1).collect();
        for m in 1..=MAX_ROWS {
            let x: Vec<f32> = (0..m * k).map(|i| value(i + 5)).collect();
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; m * n];
                product(
                    isa,
                    XRows::F32(&x),
                    m,
                    WRows::F32(&w),
                    n,
                    k,
                    Some(&bias),
                    &mut out,
                );
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                            .sum::<f64>()
                            + bias[j] as f64;
                        let got = out[i * n + j] as f64;
                        assert!((got - exact).abs() < 1e-4, "{isa} m={m} ({i}, {j})");
                    }
                }
            }
        }
    }
}
