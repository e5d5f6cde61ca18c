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

/// A vector of partial dot products, and its sum.
trait Accumulator: Copy {
    type Sum;
    unsafe fn zero() -> Self;
    unsafe fn sum(self) -> Self::Sum;
}

/// Turns an activation row's and a weight row's finished dot product into the output (without
/// the bias): f32 sums as they are, int8 sums through the scales.
trait Finish<Sum>: Sync {
    fn finish(&self, sum: Sum, i: usize, j: usize) -> f32;
}

impl Finish<f32> for () {
    #[inline(always)]
    fn finish(&self, sum: f32, _: usize, _: usize) -> f32 {
        sum
    }
}

impl Finish<i32> for Int8Scales<'_> {
    /// Exact in i32 until the offset is removed.
    #[inline(always)]
    fn finish(&self, dot: i32, i: usize, j: usize) -> f32 {
        (dot + self.offset[j]) as f32 * self.xs[i] * self.ws[j]
    }
}

/// One vector width and operand pairing of the few-row kernels.
trait Lanes {
    /// Activation and weight elements (the same size).
    type X: Copy + Sync;
    type W: Copy + Sync;
    /// A vector of either, loaded.
    type V: Copy;
    type Acc: Accumulator;
    /// What turns a finished dot product into the output (scales for int8).
    type Scales<'s>: Finish<<Self::Acc as Accumulator>::Sum>;
    /// Elements of k per vector.
    const STEP: usize;

    /// `STEP` activations from `p` (the first's bytes), or the first `tail` of them (the rest
    /// zero) when `tail > 0`.
    unsafe fn load(p: *const u8, tail: usize) -> Self::V;
    /// The same for weights (different only where their type's bits read differently).
    unsafe fn load_w(p: *const u8, tail: usize) -> Self::V {
        Self::load(p, tail)
    }
    unsafe fn madd(acc: Self::Acc, x: Self::V, w: Self::V) -> Self::Acc;
}

/// No scales: f32 sums are the outputs.
type NoScales<'s> = ();

/// Declares a [`Lanes`] type from its element types, vector, accumulator, scales, step, load
/// and multiply-add (the table of every pairing the kernels support).
macro_rules! lanes {
    ($(#[$m:meta])* $name:ident {
        x: $x:ty, w: $w:ty, vector: $v:ty, acc: $acc:ty, scales: $s:ident, step: $step:expr,
        load($p:ident, $tail:ident) $load:block
        $(load_w($pw:ident, $tw:ident) $load_w:block)?
        madd($a:ident, $xv:ident, $wv:ident) $madd:block
    }) => {
        $(#[$m])*
        pub struct $name;
        impl Lanes for $name {
            type X = $x;
            type W = $w;
            type V = $v;
            type Acc = $acc;
            type Scales<'s> = $s<'s>;
            const STEP: usize = $step;
            #[inline(always)]
            unsafe fn load($p: *const u8, $tail: usize) -> $v $load
            $(
                #[inline(always)]
                unsafe fn load_w($pw: *const u8, $tw: usize) -> $v $load_w
            )?
            #[inline(always)]
            unsafe fn madd($a: $acc, $xv: $v, $wv: $v) -> $acc $madd
        }
    };
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
        let mut acc = [[L::Acc::zero(); 4]; M];
        // Rows past the end repeat the last one (their sums are not stored).
        let wrow = |r: usize| w.add((j + r.min(rows - 1)) * k);
        for c in 0..full + (tail > 0) as usize {
            let len = if c == full { tail } else { 0 };
            let off = c * L::STEP;
            // No closure around the loads: a closure would not inherit the wrapper's target
            // features, and the intrinsics would become calls.
            let wv = [
                L::load_w(wrow(0).add(off) as *const u8, len),
                L::load_w(wrow(1).add(off) as *const u8, len),
                L::load_w(wrow(2).add(off) as *const u8, len),
                L::load_w(wrow(3).add(off) as *const u8, len),
            ];
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = L::load(x.add(i * k + off) as *const u8, len);
                for (a, &wv) in a.iter_mut().zip(&wv) {
                    *a = L::madd(*a, xv, wv);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, &v) in a.iter().enumerate().take(rows) {
                let b = bias.map_or(0.0, |b| b[j + r]);
                *out.add(i * n + j + r) = scales.finish(v.sum(), i, j + r) + b;
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
    use super::{Accumulator, Int8Scales, Lanes, NoScales};

    const STEP: usize = 8;

    #[inline(always)]
    unsafe fn load<T: Copy, V: Copy + Default>(
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

    #[inline(always)]
    fn madd<V: Copy + std::ops::Mul<Output = V> + std::ops::AddAssign>(
        mut acc: [V; STEP],
        x: [V; STEP],
        w: [V; STEP],
    ) -> [V; STEP] {
        for i in 0..STEP {
            acc[i] += x[i] * w[i];
        }
        acc
    }

    impl<V: Copy + Default + std::iter::Sum> Accumulator for [V; STEP] {
        type Sum = V;
        #[inline(always)]
        unsafe fn zero() -> Self {
            [V::default(); STEP]
        }
        #[inline(always)]
        unsafe fn sum(self) -> V {
            self.into_iter().sum()
        }
    }

    lanes!(F32 {
        x: f32, w: f32, vector: [f32; STEP], acc: [f32; STEP], scales: NoScales, step: STEP,
        load(p, tail) { load(p as *const f32, tail, |v| v) }
        madd(acc, x, w) { madd(acc, x, w) }
    });

    lanes!(Bf16 {
        x: u16, w: u16, vector: [f32; STEP], acc: [f32; STEP], scales: NoScales, step: STEP,
        load(p, tail) { load(p as *const u16, tail, crate::cpu::convert::bf16_to_f32) }
        madd(acc, x, w) { madd(acc, x, w) }
    });

    lanes!(U8S8 {
        x: u8, w: i8, vector: [i32; STEP], acc: [i32; STEP], scales: Int8Scales, step: STEP,
        // u8 activations, s8 weights.
        load(p, tail) { load(p, tail, i32::from) }
        load_w(p, tail) { load(p as *const i8, tail, i32::from) }
        madd(acc, x, w) { madd(acc, x, w) }
    });
}

/// AVX-512 lanes. Their methods are `#[inline(always)]` without features of their own: they
/// only ever run inlined into the `#[target_feature]` wrappers above.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Accumulator, Int8Scales, Lanes, NoScales};

    #[inline(always)]
    fn mask(tail: usize) -> u64 {
        (1u64 << tail) - 1
    }

    impl Accumulator for __m512 {
        type Sum = f32;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
    }

    impl Accumulator for __m512i {
        type Sum = i32;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn sum(self) -> i32 {
            _mm512_reduce_add_epi32(self)
        }
    }

    lanes!(F32x16 {
        x: f32, w: f32, vector: __m512, acc: __m512, scales: NoScales, step: 16,
        load(p, tail) {
            if tail == 0 {
                _mm512_loadu_ps(p as *const f32)
            } else {
                _mm512_maskz_loadu_ps(mask(tail) as __mmask16, p as *const f32)
            }
        }
        madd(acc, x, w) { _mm512_fmadd_ps(x, w, acc) }
    });

    lanes!(Bf16x32 {
        x: u16, w: u16, vector: __m512bh, acc: __m512, scales: NoScales, step: 32,
        load(p, tail) {
            let v = if tail == 0 {
                _mm512_loadu_si512(p as *const _)
            } else {
                _mm512_maskz_loadu_epi16(mask(tail) as __mmask32, p as *const i16)
            };
            std::mem::transmute::<__m512i, __m512bh>(v)
        }
        madd(acc, x, w) { _mm512_dpbf16_ps(acc, x, w) }
    });

    lanes!(U8S8x64 {
        x: u8, w: i8, vector: __m512i, acc: __m512i, scales: Int8Scales, step: 64,
        // Masked-out bytes load as 0, so they add nothing.
        load(p, tail) {
            if tail == 0 {
                _mm512_loadu_si512(p as *const _)
            } else {
                _mm512_maskz_loadu_epi8(mask(tail), p as *const i8)
            }
        }
        madd(acc, x, w) { _mm512_dpbusd_epi32(acc, x, w) }
    });
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
