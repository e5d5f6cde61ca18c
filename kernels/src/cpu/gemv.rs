//! Products of a few activation rows with a large weight matrix (`y = x · Wᵀ` with at most
//! [`MAX_ROWS`] rows of x), the shape of every LLM decode step. They read each weight once and
//! are bound by memory bandwidth, which BLAS libraries do not reach at this size on one or two
//! cores: these kernels stream four weight rows at a time against every activation row, split
//! by columns over the thread pool.
//!
//! One generic block ([`block`]) serves every precision and vector width through [`Lanes`]
//! (how to load, multiply-add and reduce one vector of an operand pair): f32 FMA, bf16
//! `vdpbf16ps`, u8 × s8 `vpdpbusd` on AVX-512, their AVX2 versions (int8: `vpmaddubsw` on
//! 7-bit weights, or with `vpsignb` on sign and magnitude for 8-bit ones, both exact), and
//! portable versions of each. [`product`] is
//! the only entry: it picks the version the caller's [`Isa`] proves the CPU can run.

use std::mem::MaybeUninit;

use super::linear::{Epilogue, WeightType};
use super::parallel::{for_ranges, for_tiles, SharedMut};
use super::scratch::Scratch;
use super::{math, Isa};

/// The most activation rows these kernels take: a decode step of up to 8 captions together
/// (the scheduler's default batch). At 8 rows MKL's int8 GEMM, which packs the weights on
/// every call, took 0.76 ms per 5632 × 2048 product from memory.
pub const MAX_ROWS: usize = 8;
/// Activation rows per kernel call in a [`Schedule::Tiles`] tile.
const TILE_ROWS: usize = 4;
/// How far ahead in each weight row the kernels prefetch. With more than one activation row
/// the hardware prefetcher alone falls behind (four rows of int8 from memory: 0.55 ms against
/// 0.49 ms with it, per 5632 × 2048 product; one row is unchanged at 0.37 ms).
const PREFETCH_BYTES: usize = 1024;
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
    /// Values in [-levels, levels], per-output-channel scales, and `-128 · Σ_k q[j, k]`
    /// (removes the activations' offset).
    Int8 {
        q: &'a [i8],
        levels: i8,
        scale: &'a [f32],
        offset: &'a [i32],
    },
}

/// Which lanes run the products of one precision on an [`Isa`]: the widest that the `Isa`
/// proves the CPU runs. [`product`] runs exactly this choice; [`kernel`] names it for the
/// dispatch point's report and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Plain Rust for the compiler's baseline.
    Portable,
    /// 256-bit AVX2 + FMA: f32 FMA; bf16 widened to f32 by a shift, then FMA; int8 by
    /// `vpmaddubsw` on 7-bit weights, or `vpsignb` and `vpmaddubsw` on sign and magnitude for
    /// 8-bit ones (exact either way: no pair sum can saturate).
    Avx2,
    /// 512-bit f32 FMA.
    Avx512,
    /// `vdpbf16ps`.
    Avx512Bf16,
    /// `vpdpbusd`.
    Avx512Vnni,
}

impl Kernel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Avx512Bf16 => "avx512-bf16",
            Self::Avx512Vnni => "avx512-vnni",
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lanes [`product`] runs for weights of `kind` on `isa`.
pub fn kernel(isa: Isa, kind: WeightType) -> Kernel {
    if !cfg!(target_arch = "x86_64") {
        return Kernel::Portable;
    }
    match kind {
        WeightType::F32 if isa.avx512() => Kernel::Avx512,
        WeightType::Bf16 if isa.avx512_bf16() => Kernel::Avx512Bf16,
        WeightType::Int8 if isa.avx512_vnni() => Kernel::Avx512Vnni,
        _ if isa.avx2() => Kernel::Avx2,
        _ => Kernel::Portable,
    }
}

/// How [`product`] walks the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// At most [`MAX_ROWS`] rows: the columns split over the pool, every weight read once.
    Columns,
    /// Any number of rows: tiles of at most `row_block` rows (the threads split the columns),
    /// each walked in chunks of [`TILE_COLUMNS`] weight rows (kept in cache) against groups of
    /// [`TILE_ROWS`] activation rows; the GELU of each tile applied while it is in cache.
    Tiles { row_block: usize },
}

/// Weight rows per chunk of a [`Schedule::Tiles`] tile: 64 rows of k = 1408 are 90 KB in int8,
/// 180 KB in bf16, resident in L2 while every activation row group of the tile passes.
const TILE_COLUMNS: usize = 64;

/// `out[i, j] = x_i · w_j (+ bias[j])` for the m rows of `x` ((m, k), m <= [`MAX_ROWS`] for
/// [`Schedule::Columns`]), then the epilogue; `out` is (m, n). For int8, `x_i · w_j` is
/// `(Σ_k xq[i, k] · wq[j, k] + offset[j]) · xs[i] · ws[j]`. Runs the lanes of
/// [`kernel`]`(isa, ..)`.
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
    epilogue: Epilogue,
    schedule: Schedule,
) {
    assert!(
        m >= 1 && (m <= MAX_ROWS || schedule != Schedule::Columns),
        "{m} rows"
    );
    assert_eq!(out.len(), m * n);
    assert!(bias.is_none_or(|b| b.len() == n));
    let shape = Shape {
        m,
        n,
        k,
        bias,
        accumulate: epilogue == Epilogue::Accumulate,
    };
    let run = Run {
        isa,
        shape,
        gelu: epilogue == Epilogue::Gelu,
        schedule,
    };
    // SAFETY (every arm): `kernel` returns a kernel only when `isa` proves each feature its
    // wrapper enables: Avx512 the AVX-512 set, Avx512Bf16 and Avx512Vnni that set with BF16 or
    // VNNI, Avx2 AVX2 + FMA + F16C (and the AVX2 lanes use nothing else); the portable
    // wrapper needs no feature.
    match (x, w) {
        (XRows::F32(x), WRows::F32(w)) => unsafe {
            match kernel(isa, WeightType::F32) {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => run.drive(avx512::<x86::F32x16>, x, w, &(), out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => run.drive(avx2::<x86_avx2::F32x8>, x, w, &(), out),
                _ => run.drive(portable::<scalar::F32>, x, w, &(), out),
            }
        },
        (XRows::Bf16(x), WRows::Bf16(w)) => unsafe {
            match kernel(isa, WeightType::Bf16) {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Bf16 => run.drive(avx512_bf16::<x86::Bf16x32>, x, w, &(), out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => run.drive(avx2::<x86_avx2::Bf16x8>, x, w, &(), out),
                _ => run.drive(portable::<scalar::Bf16>, x, w, &(), out),
            }
        },
        (
            XRows::Int8 { q: x, scale: xs },
            WRows::Int8 {
                q: w,
                levels,
                scale: ws,
                offset,
            },
        ) => {
            assert_eq!(xs.len(), m);
            assert_eq!(ws.len(), n);
            assert_eq!(offset.len(), n);
            let scales = Int8Scales { xs, ws, offset };
            unsafe {
                match kernel(isa, WeightType::Int8) {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Vnni => {
                        run.drive(avx512_vnni::<x86::U8S8x64>, x, w, &scales, out)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 if levels <= x86_avx2::U8S7_LEVELS => {
                        run.drive(avx2::<x86_avx2::U8S7x32>, x, w, &scales, out)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => {
                        let mut signed = Scratch::<u16>::new(m * k);
                        x86_avx2::sign_magnitude(x, k, &mut signed);
                        let scales = SignedInt8Scales(scales);
                        run.drive(avx2::<x86_avx2::S8S8x32>, &signed, w, &scales, out)
                    }
                    _ => run.drive(portable::<scalar::U8S8>, x, w, &scales, out),
                }
            }
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
    /// `out += y` instead of `out = y`.
    accumulate: bool,
}

/// One product's shape and how it runs.
struct Run<'a> {
    isa: Isa,
    shape: Shape<'a>,
    gelu: bool,
    schedule: Schedule,
}

/// What one kernel call computes: columns `j0..j1` of output rows `i0..i0 + rows`
/// (rows <= [`MAX_ROWS`]).
struct Tile<'a, X, W> {
    x: &'a [X],
    w: &'a [W],
    shape: Shape<'a>,
    i0: usize,
    rows: usize,
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

/// The AVX2 kernel's int8 dot products, signed already (Σ x · w, the activations' +128
/// offset removed by the kernel): the same f32 arithmetic as [`Int8Scales`] on the same
/// integer, so the outputs equal the portable kernel's bit for bit.
struct SignedInt8Scales<'a>(Int8Scales<'a>);

impl Finish<i32> for SignedInt8Scales<'_> {
    #[inline(always)]
    fn finish(&self, dot: i32, i: usize, j: usize) -> f32 {
        dot as f32 * self.0.xs[i] * self.0.ws[j]
    }
}

/// A vector of partial dot products, and its sum.
trait Accumulator: Copy {
    type Sum: Copy + Default;
    unsafe fn zero() -> Self;
    unsafe fn sum(self) -> Self::Sum;
    /// `out[i] = acc[i].sum()`: lanes may reduce several accumulators together.
    #[inline(always)]
    unsafe fn sums(acc: &[Self], out: &mut [Self::Sum]) {
        for (a, o) in acc.iter().zip(out) {
            *o = a.sum();
        }
    }
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
    /// A vector of activations, loaded.
    type V: Copy;
    /// A vector of weights, loaded (the activations' type except where the kernel prepares
    /// the two operands differently).
    type WV: Copy;
    type Acc: Accumulator;
    /// What turns a finished dot product into the output (scales for int8).
    type Scales<'s>: Finish<<Self::Acc as Accumulator>::Sum>;
    /// Elements of k per vector.
    const STEP: usize;

    /// `STEP` activations from `p` (the first's bytes), or the first `tail` of them (the rest
    /// zero) when `tail > 0`.
    unsafe fn load(p: *const u8, tail: usize) -> Self::V;
    /// The same for weights.
    unsafe fn load_w(p: *const u8, tail: usize) -> Self::WV;
    unsafe fn madd(acc: Self::Acc, x: Self::V, w: Self::WV) -> Self::Acc;
}

/// No scales: f32 sums are the outputs.
type NoScales<'s> = ();

/// Declares a [`Lanes`] type from its element types, vector (and the weights' vector when it
/// differs), accumulator, scales, step, loads (the weights' load, when absent, is the
/// activations') and multiply-add (the table of every pairing the kernels support).
macro_rules! lanes {
    (@or , $default:ty) => { $default };
    (@or $t:ty, $default:ty) => { $t };
    (@or_block , $default:block) => { $default };
    (@or_block $b:block, $default:block) => { $b };
    ($(#[$m:meta])* $name:ident {
        x: $x:ty, w: $w:ty, vector: $v:ty, $(w_vector: $wvt:ty,)? acc: $acc:ty,
        scales: $s:ident, step: $step:expr,
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
            type WV = lanes!(@or $($wvt)?, $v);
            type Acc = $acc;
            type Scales<'s> = $s<'s>;
            const STEP: usize = $step;
            #[inline(always)]
            unsafe fn load($p: *const u8, $tail: usize) -> $v $load
            #[inline(always)]
            unsafe fn load_w(p: *const u8, tail: usize) -> Self::WV {
                lanes!(@or_block $({ let ($pw, $tw) = (p, tail); $load_w })?, { Self::load(p, tail) })
            }
            #[inline(always)]
            unsafe fn madd($a: $acc, $xv: $v, $wv: Self::WV) -> $acc $madd
        }
    };
}

impl Run<'_> {
    /// Runs `kernel` over the output in the run's schedule, then the GELU if asked.
    ///
    /// # Safety
    /// `kernel` must be safe to run on this CPU.
    unsafe fn drive<X: Sync, W: Sync, S: Sync>(
        &self,
        kernel: unsafe fn(&Tile<X, W>, &S),
        x: &[X],
        w: &[W],
        scales: &S,
        out: &mut [f32],
    ) {
        let shape = self.shape;
        let (m, n) = (shape.m, shape.n);
        assert_eq!(x.len(), m * shape.k);
        assert_eq!(w.len(), n * shape.k);
        let shared = SharedMut::new(out);
        let tile = |i0: usize, rows: usize, j0: usize, j1: usize| Tile {
            x,
            w,
            shape,
            i0,
            rows,
            j0,
            j1,
            out: shared,
        };
        // SAFETY (both arms): the caller vouches for the CPU; the sizes are checked above,
        // and each call writes only its rows and columns, which no other call touches.
        match self.schedule {
            Schedule::Columns => {
                for_ranges(n, 4, ROWS_PER_TASK, |j0, j1| unsafe {
                    kernel(&tile(0, m, j0, j1), scales)
                });
                if self.gelu {
                    math::gelu(self.isa, out);
                }
            }
            Schedule::Tiles { row_block } => {
                for_tiles(m, n, row_block, |i0, i1, j0, j1| {
                    for c0 in (j0..j1).step_by(TILE_COLUMNS) {
                        let c1 = (c0 + TILE_COLUMNS).min(j1);
                        for r0 in (i0..i1).step_by(TILE_ROWS) {
                            let rows = (i1 - r0).min(TILE_ROWS);
                            unsafe { kernel(&tile(r0, rows, c0, c1), scales) };
                        }
                    }
                    if self.gelu {
                        for i in i0..i1 {
                            // SAFETY: row i, columns j0..j1 of this tile, written above and
                            // touched by no other task.
                            let row = unsafe {
                                std::slice::from_raw_parts_mut(
                                    shared.get().add(i * n + j0),
                                    j1 - j0,
                                )
                            };
                            math::gelu(self.isa, row);
                        }
                    }
                });
            }
        }
    }
}

/// `C` weight rows at a time against the `M` activation rows (`M · C` accumulators, `C`
/// weight vectors and one activation vector live in registers).
#[inline(always)]
unsafe fn block<L: Lanes, const M: usize, const C: usize>(
    t: &Tile<L::X, L::W>,
    scales: &L::Scales<'_>,
) {
    let Shape {
        n,
        k,
        bias,
        accumulate,
        ..
    } = t.shape;
    let (full, tail) = (k / L::STEP, k % L::STEP);
    let x = t.x.as_ptr().add(t.i0 * k);
    let out = t.out.get().add(t.i0 * n);
    let w = t.w.as_ptr();
    let mut j = t.j0;
    while j < t.j1 {
        let rows = (t.j1 - j).min(C);
        let mut acc = [[L::Acc::zero(); C]; M];
        // Rows past the end repeat the last one (their sums are not stored).
        let wrows: [*const L::W; C] = std::array::from_fn(|r| w.add((j + r.min(rows - 1)) * k));
        // The full vectors in a loop of their own, the tail after it: a test for the tail
        // inside the loop kept the accumulators in memory.
        for c in 0..full {
            chunk::<L, M, C>(&mut acc, x, k, &wrows, c * L::STEP, 0);
        }
        if tail > 0 {
            chunk::<L, M, C>(&mut acc, x, k, &wrows, full * L::STEP, tail);
        }
        let mut sums = [[<L::Acc as Accumulator>::Sum::default(); C]; M];
        L::Acc::sums(acc.as_flattened(), sums.as_flattened_mut());
        for (i, a) in sums.iter().enumerate() {
            for (r, &v) in a.iter().enumerate().take(rows) {
                let b = bias.map_or(0.0, |b| b[j + r]);
                let y = scales.finish(v, t.i0 + i, j + r) + b;
                let o = out.add(i * n + j + r);
                *o = if accumulate { *o + y } else { y };
            }
        }
        j += rows;
    }
}

/// One vector of k (from element `off`, `len` elements when `len > 0`) of the `M` activation
/// rows (at stride `k` from `x`) against the `C` weight rows `w`, into `acc`.
#[inline(always)]
unsafe fn chunk<L: Lanes, const M: usize, const C: usize>(
    acc: &mut [[L::Acc; C]; M],
    x: *const L::X,
    k: usize,
    w: &[*const L::W; C],
    off: usize,
    len: usize,
) {
    // Plain loops, no closure around the loads: a closure would not inherit the wrapper's
    // target features, and the intrinsics would become calls.
    let mut wv = [MaybeUninit::<L::WV>::uninit(); C];
    for (v, w) in wv.iter_mut().zip(w) {
        let p = w.add(off) as *const u8;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // A prefetch never faults, so it may run past the row's end.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
        }
        *v = MaybeUninit::new(L::load_w(p, len));
    }
    for (i, a) in acc.iter_mut().enumerate() {
        let xv = L::load(x.add(i * k + off) as *const u8, len);
        for (a, wv) in a.iter_mut().zip(&wv) {
            *a = L::madd(*a, xv, wv.assume_init());
        }
    }
}

/// [`block`] for the tile's row count, four weight rows at a time, three from 7 rows (32
/// vector registers: at most 24 accumulators, the weight vectors and the activation vector;
/// or the portable lanes). Four weight rows in flight against four activation rows, rather
/// than two, took a 4-row int8 product from memory from 0.48 ms to 0.46 ms and made the
/// batched decode step of the cpu-bench model 64 ms instead of 87 ms (1-row step 45 ms), with
/// the prefetch.
#[inline(always)]
unsafe fn rows<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    match t.rows {
        1 => block::<L, 1, 4>(t, scales),
        2 => block::<L, 2, 4>(t, scales),
        3 => block::<L, 3, 4>(t, scales),
        4 => block::<L, 4, 4>(t, scales),
        5 => block::<L, 5, 4>(t, scales),
        6 => block::<L, 6, 4>(t, scales),
        7 => block::<L, 7, 3>(t, scales),
        _ => block::<L, 8, 3>(t, scales),
    }
}

/// [`block`] for AVX2's 16 vector registers: four weight rows for one activation row (the
/// decode step), two for up to 4 rows, one for more (at most 8 accumulators, 4 weight and 2
/// activation registers with the two-register bf16 vectors).
#[inline(always)]
unsafe fn rows_16_registers<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    match t.rows {
        1 => block::<L, 1, 4>(t, scales),
        2 => block::<L, 2, 2>(t, scales),
        3 => block::<L, 3, 2>(t, scales),
        4 => block::<L, 4, 2>(t, scales),
        5 => block::<L, 5, 1>(t, scales),
        6 => block::<L, 6, 1>(t, scales),
        7 => block::<L, 7, 1>(t, scales),
        _ => block::<L, 8, 1>(t, scales),
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

/// The AVX2 level: exactly [`Isa::AVX2_FEATURES`], nothing of AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<L: Lanes>(t: &Tile<L::X, L::W>, scales: &L::Scales<'_>) {
    rows_16_registers::<L>(t, scales)
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
        /// Four accumulators at a time, transposed while they are added (13 instructions for
        /// four sums instead of about 32): 4-row int8 products from memory ran 2-4% faster
        /// (0.48 against 0.495 ms at k = 2048). Integer sums in any order are the same.
        #[inline(always)]
        unsafe fn sums(acc: &[Self], out: &mut [i32]) {
            let mut groups = acc.chunks_exact(4);
            let mut outs = out.chunks_exact_mut(4);
            for (g, o) in (&mut groups).zip(&mut outs) {
                let sum4 = sum4(g[0], g[1], g[2], g[3]);
                _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, sum4);
            }
            for (a, o) in groups.remainder().iter().zip(outs.into_remainder()) {
                *o = a.sum();
            }
        }
    }

    /// The sums of `a`, `b`, `c`, `d` as the four lanes of one vector.
    #[inline(always)]
    unsafe fn sum4(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m128i {
        // In every 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], and the same for c and d ...
        let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        // ... then [a, b, c, d] summed over the lane ...
        let abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
        // ... and the four lanes added together.
        let half = _mm256_add_epi32(
            _mm512_castsi512_si256(abcd),
            _mm512_extracti64x4_epi64::<1>(abcd),
        );
        _mm_add_epi32(
            _mm256_castsi256_si128(half),
            _mm256_extracti128_si256::<1>(half),
        )
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

/// AVX2 lanes: only 256-bit AVX2 and FMA intrinsics (nothing of AVX-512), inlined into the
/// `avx2` wrapper, which enables exactly [`Isa::AVX2_FEATURES`]. Tails are copied into a
/// zeroed buffer (AVX2 has no byte- or word-masked loads).
#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use std::arch::x86_64::*;

    use super::{Accumulator, Int8Scales, Lanes, NoScales, SignedInt8Scales};

    /// The largest |w| [`U8S7x32`] takes.
    pub(super) const U8S7_LEVELS: i8 = 63;

    /// 32 bytes from `p`, or its first `bytes` and zeros when `bytes > 0`.
    #[inline(always)]
    unsafe fn load_bytes(p: *const u8, bytes: usize) -> __m256i {
        if bytes == 0 {
            return _mm256_loadu_si256(p as *const __m256i);
        }
        let mut buf = [0u8; 32];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), bytes);
        _mm256_loadu_si256(buf.as_ptr() as *const __m256i)
    }

    impl Accumulator for __m256 {
        type Sum = f32;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let s = _mm_add_ps(
                _mm256_castps256_ps128(self),
                _mm256_extractf128_ps::<1>(self),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    /// Lanes a b c d | a b c d: in each half, the sums of that half of `a`, `b`, `c`, `d`.
    /// (A function, not a closure: closures here do not inherit the wrapper's features.)
    #[inline(always)]
    unsafe fn hadd4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
        _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d))
    }

    impl Accumulator for __m256i {
        type Sum = i32;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn sum(self) -> i32 {
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(self),
                _mm256_extracti128_si256::<1>(self),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            _mm_cvtsi128_si32(s)
        }
        /// Eight (or four) accumulators at once through a tree of `vphaddd`: about a third
        /// of the instructions of eight separate reductions (a tenth of a 4 × 2 block's
        /// work at k = 1408). Exact in any order.
        #[inline(always)]
        unsafe fn sums(acc: &[Self], out: &mut [i32]) {
            let (mut acc, mut out) = (acc, out);
            while acc.len() >= 8 {
                // Lanes: a0 a1 a2 a3 (first halves) | a0 a1 a2 a3 (second halves), each the
                // sum of four of an accumulator's lanes; then the same for a4..a7.
                let low = hadd4(acc[0], acc[1], acc[2], acc[3]);
                let high = hadd4(acc[4], acc[5], acc[6], acc[7]);
                let s = _mm256_add_epi32(
                    _mm256_permute2x128_si256::<0x20>(low, high),
                    _mm256_permute2x128_si256::<0x31>(low, high),
                );
                _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s);
                (acc, out) = (&acc[8..], &mut out[8..]);
            }
            if acc.len() >= 4 {
                let s = hadd4(acc[0], acc[1], acc[2], acc[3]);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s);
                (acc, out) = (&acc[4..], &mut out[4..]);
            }
            for (a, o) in acc.iter().zip(out) {
                *o = a.sum();
            }
        }
    }

    lanes!(F32x8 {
        x: f32, w: f32, vector: __m256, acc: __m256, scales: NoScales, step: 8,
        load(p, tail) { _mm256_castsi256_ps(load_bytes(p, tail * 4)) }
        madd(acc, x, w) { _mm256_fmadd_ps(x, w, acc) }
    });

    lanes!(
        /// 16 bf16 as two f32 vectors: each 32-bit lane holds two bf16, the low one becomes
        /// an f32 by a left shift of 16, the high one by clearing the low 16 bits. Activations
        /// and weights split alike, so the pairs of products match; bf16 products are exact
        /// in f32 (8-bit significands) and accumulate with FMA, as `vdpbf16ps` does.
        Bf16x8 {
        x: u16, w: u16, vector: (__m256, __m256), acc: __m256, scales: NoScales, step: 16,
        load(p, tail) {
            let v = load_bytes(p, tail * 2);
            let low = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
            let high = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536)));
            (low, high)
        }
        madd(acc, x, w) { _mm256_fmadd_ps(x.1, w.1, _mm256_fmadd_ps(x.0, w.0, acc)) }
    });

    /// Bytes of one [`S8S8x32`] activation chunk: 32 magnitudes, then 32 signed values.
    const CHUNK_BYTES: usize = 64;

    /// The activations of [`S8S8x32`] from the quantised rows `q` (rows of `k`, u8 with the
    /// +128 offset): each row as chunks of 32 elements, a chunk as the 32 magnitudes |x| (u8)
    /// then the 32 signed values x (s8), the last chunk of `k % 32` elements as that many
    /// magnitudes then as many values: two bytes per element, `out` (as u16) is as long as
    /// `q`. Done once per product, since every activation chunk meets many weight rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn sign_magnitude(q: &[u8], k: usize, out: &mut [u16]) {
        assert_eq!(q.len(), out.len());
        assert!(k > 0 && q.len().is_multiple_of(k));
        let (full, tail) = (k / 32, k % 32);
        let offset = _mm256_set1_epi8(-128);
        for (src, dst) in q.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
            let (src, dst) = (src.as_ptr(), dst.as_mut_ptr() as *mut u8);
            for c in 0..full {
                // u ^ 0x80 = u - 128 in two's complement: the signed value.
                let v = _mm256_xor_si256(_mm256_loadu_si256(src.add(c * 32) as *const _), offset);
                let d = dst.add(c * CHUNK_BYTES);
                _mm256_storeu_si256(d as *mut _, _mm256_abs_epi8(v));
                _mm256_storeu_si256(d.add(32) as *mut _, v);
            }
            let d = dst.add(full * CHUNK_BYTES);
            for e in 0..tail {
                let v = (*src.add(full * 32 + e) ^ 0x80) as i8;
                *d.add(e) = v.unsigned_abs();
                *d.add(tail + e) = v as u8;
            }
        }
    }

    lanes!(
        /// 32 int8 products per `vpmaddubsw`, exactly: the activations come as magnitudes
        /// |x| (u8) and signed values x (s8, see [`sign_magnitude`]); `vpsignb` moves each
        /// activation's sign onto its weight (w · sgn x), and `vpmaddubsw` multiplies |x| by
        /// that and sums pairs into i16: |x| <= 128 (127 from the quantiser) and |w| <= 127
        /// (the weights' quantiser clamps at -127, so `vpsignb` never meets -128) bound each
        /// pair by 2 · 128 · 127 = 32512 < 32767, so the saturating i16 sum never saturates.
        /// `vpmaddwd` by ones sums pairs of those into the i32 lanes. The sums are the signed
        /// dot products Σ x · w (the +128 offset is gone), equal to the portable kernel's
        /// Σ (x + 128) · w + offset: the same integers, so the same outputs.
        S8S8x32 {
        x: u16, w: i8, vector: (__m256i, __m256i), w_vector: __m256i, acc: __m256i,
        scales: SignedInt8Scales, step: 32,
        load(p, tail) {
            if tail == 0 {
                let magnitude = _mm256_loadu_si256(p as *const __m256i);
                (magnitude, _mm256_loadu_si256(p.add(32) as *const __m256i))
            } else {
                // The last chunk: `tail` magnitudes then `tail` values, zeros past them.
                (load_bytes(p, tail), load_bytes(p.add(tail), tail))
            }
        }
        load_w(p, tail) { load_bytes(p, tail) }
        madd(acc, x, w) {
            let signed_w = _mm256_sign_epi8(w, x.1);
            let pairs = _mm256_maddubs_epi16(x.0, signed_w);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    });

    lanes!(
        /// 32 int8 products per `vpmaddubsw` on 7-bit weights, exactly: the u8 activations
        /// (+128 offset, as the VNNI kernel takes them) times |w| <= 63 bound each pair sum by
        /// 2 · 255 · 63 = 32130 < 32767. `vpmaddwd` by ones sums pairs into the i32 lanes;
        /// the scales remove the offset, as for `vpdpbusd`. Zeros past a tail add nothing.
        U8S7x32 {
        x: u8, w: i8, vector: __m256i, acc: __m256i, scales: Int8Scales, step: 32,
        load(p, tail) { load_bytes(p, tail) }
        madd(acc, x, w) {
            let pairs = _mm256_maddubs_epi16(x, w);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
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
                    Epilogue::Store,
                    Schedule::Columns,
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
