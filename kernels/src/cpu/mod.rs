//! Reduced-precision CPU kernels for the model's linear layers (`y = x · Wᵀ + b`).
//!
//! * **bf16**: weights converted once to bf16 at load (half the bytes of f32), activations
//!   converted per call, products accumulated in f32.
//! * **int8**: weights quantised once per output channel (symmetric, scale = max|w|/127),
//!   activations quantised per row at every call (dynamic, symmetric, stored +128 as u8),
//!   products accumulated exactly in i32 and rescaled to f32.
//!
//! Large products (prefill, vision tower, Q-Former) go to oneMKL's `gemm_bf16bf16f32` /
//! `gemm_s8u8s32`, which use the AMX tile units of Xeon Sapphire Rapids and later (feature
//! `mkl`); products with at most four activation rows (token-by-token decoding) go to our own
//! AVX-512 kernels in [`gemv`], which stream the weights at memory bandwidth. Without MKL the
//! large products run four rows at a time through the same kernels: correct, but slow.
//!
//! The thread pool is rayon's (the one candle uses): MKL is linked with its sequential layer
//! and each call is split by output columns into one task per thread.

// The early `return`s below end a feature-dependent branch (`mkl` adds code after them).
#![allow(clippy::needless_return)]

pub mod convert;
pub mod detect;
pub mod gemv;
pub mod llama;
pub mod math;
#[cfg(feature = "mkl")]
pub mod mkl;
pub mod quant;
pub mod vit;

use candle_core::{Storage, Tensor};
use rayon::prelude::*;

pub use detect::CpuFeatures;

/// Whether this build links oneMKL (cargo feature `mkl`).
pub const HAS_MKL: bool = cfg!(feature = "mkl");

/// Column boundaries of `parts` tasks over `n` output columns, multiples of 64.
fn column_split(n: usize, parts: usize) -> Vec<(usize, usize)> {
    let per = n.div_ceil(parts).next_multiple_of(64);
    (0..parts)
        .map(|i| ((i * per).min(n), ((i + 1) * per).min(n)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: every user writes disjoint elements and the buffer outlives the parallel loop.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Element types of the scratch buffers.
pub trait ScratchElem: Copy + Default + 'static {
    fn pool() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Vec<Self>>>>;
}

macro_rules! scratch_pool {
    ($t:ty, $name:ident) => {
        thread_local! {
            static $name: std::cell::RefCell<Vec<Vec<$t>>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        impl ScratchElem for $t {
            fn pool() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Vec<Self>>>> {
                &$name
            }
        }
    };
}
scratch_pool!(f32, POOL_F32);
scratch_pool!(u16, POOL_U16);
scratch_pool!(u8, POOL_U8);
scratch_pool!(i32, POOL_I32);

/// A buffer borrowed from a per-thread pool and returned to it when dropped: the kernels'
/// intermediate results reuse the same memory call after call (no page faults, and zeroing
/// only when a buffer grows). Its contents on arrival are unspecified (old values).
pub struct Scratch<T: ScratchElem> {
    /// Always initialised over its whole length (the largest size it was asked for).
    buf: Vec<T>,
    len: usize,
}

/// Buffers kept per thread and element type.
const POOL_SIZE: usize = 12;

impl<T: ScratchElem> Scratch<T> {
    pub fn new(len: usize) -> Self {
        let mut buf = T::pool().with(|p| {
            let mut p = p.borrow_mut();
            // The smallest buffer that is large enough, else the largest one.
            let best = p
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
                .or_else(|| {
                    p.iter()
                        .enumerate()
                        .max_by_key(|(_, b)| b.len())
                        .map(|(i, _)| i)
                });
            best.map(|i| p.swap_remove(i)).unwrap_or_default()
        });
        if buf.len() < len {
            buf.resize(len, T::default());
        }
        Self { buf, len }
    }
}

impl<T: ScratchElem> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let _ = T::pool().try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_SIZE {
                p.push(buf);
            }
        });
    }
}

impl<T: ScratchElem> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: ScratchElem> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}

/// Defines `$name(args)` running `$body` compiled for AVX-512 when the CPU has it, else for
/// the baseline: plain loops in the body get vectorised for the wider registers.
macro_rules! dispatch_avx512 {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::cpu::dispatch_avx512! {
            $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                let f = $crate::cpu::CpuFeatures::get();
                if f.avx512f && f.avx512bw {
                    // SAFETY: the features were detected at run time.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch_avx512;

/// `C[m, n] (row stride ldc) = A[m, k] (row stride lda) · op(B) (+ C when accumulate)`, f32 on
/// the calling thread, where `op(B)` is `B[n, k]ᵀ` when `b_rows_are_columns`, else `B[k, n]`
/// (row stride ldb): MKL's sgemm, else the `gemm` crate (candle's matrix-product library).
///
/// # Safety
/// The pointers must address matrices of these sizes and strides; C must not alias A or B.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_single(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    b_rows_are_columns: bool,
    accumulate: bool,
    c: *mut f32,
    ldc: usize,
) {
    #[cfg(feature = "mkl")]
    mkl::sgemm_strided(
        m,
        n,
        k,
        a,
        lda,
        b,
        ldb,
        b_rows_are_columns,
        if accumulate { 1.0 } else { 0.0 },
        c,
        ldc,
    );
    #[cfg(not(feature = "mkl"))]
    {
        let (rhs_cs, rhs_rs) = if b_rows_are_columns {
            (ldb as isize, 1)
        } else {
            (1, ldb as isize)
        };
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a,
            1,
            lda as isize,
            b,
            rhs_cs,
            rhs_rs,
            // dst = alpha·dst + beta·lhs·rhs; dst is read only when accumulating.
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Keeps freed activation buffers in the heap instead of returning them to the kernel after
/// every operation (glibc unmaps blocks above 128 KiB by default, so each fresh tensor paid
/// page faults and zeroing: 10 to 20% of an encode). Called once, when a model loads on the
/// CPU; `LLAMAVID_NO_MALLOPT=1` leaves the allocator alone.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("LLAMAVID_NO_MALLOPT").is_some() {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's allocation thresholds.
        unsafe {
            // The largest threshold glibc accepts (32 MiB on 64-bit): activations below it
            // come from the heap; weights (larger) are still mapped on their own.
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            // Keep up to 1 GiB of freed memory at the top of the heap for reuse.
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

/// Whether `LLAMAVID_LINEAR=candle` asks for candle's own f32 path everywhere (A/B checks).
pub fn candle_only() -> bool {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CANDLE.get_or_init(|| std::env::var("LLAMAVID_LINEAR").is_ok_and(|v| v == "candle"))
}

/// What a linear layer does with its result `y = x · Wᵀ + b`. The many-row paths apply it to
/// each block of rows right after the block's product, while the block is still in cache,
/// instead of in one more pass over the whole output (a 257-token frame's MLP activations are
/// 6 MB per layer: those passes were memory-bound, about a tenth of an int8 encode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `out = y`.
    Store,
    /// `out = gelu_erf(y)`: a transformer MLP's first layer.
    Gelu,
    /// `out += y`: a residual connection, `out` holding the residual stream.
    Accumulate,
}

impl Epilogue {
    /// Applies the epilogue as separate passes, for paths that do not fuse it: `compute`
    /// writes `y` into the slice it is given.
    fn unfused(self, out: &mut [f32], compute: impl FnOnce(&mut [f32])) {
        match self {
            Self::Store => compute(out),
            Self::Gelu => {
                compute(out);
                math::gelu(out);
            }
            Self::Accumulate => {
                let mut y = Scratch::<f32>::new(out.len());
                compute(&mut y);
                math::add_assign(out, &y);
            }
        }
    }
}

/// Rows per block of the blocked products: one frame's tokens (257 for EVA at 224 px) per
/// block. Measured on the benchmark's vision tower (int8, 2 threads, per frame): blocks of 128
/// rows 0.531 s for one frame / 0.446 s in a batch of 8, one block per whole product 0.478 /
/// 0.465 s, blocks of up to 300 rows 0.424 / 0.432 s. `LLAMAVID_ROW_BLOCK` overrides it.
fn row_block() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("LLAMAVID_ROW_BLOCK")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&r| r > 0)
            .unwrap_or(320)
    })
}

/// Equal blocks of at most `row_block()` rows: 257 rows are 3 × 86, not 128 + 128 + 1 (a
/// one-row product costs nearly as much as a full block).
fn rows_per_block(m: usize) -> usize {
    m.div_ceil(m.div_ceil(row_block()).max(1)).max(1)
}

/// Calls `tile(i0, i1, j0, j1)` for blocks of rows `i0..i1` and columns `j0..j1` covering an
/// (m, n) output: the columns are split between the threads, each thread walks its columns'
/// row blocks in order. Tiles never overlap.
fn for_tiles(m: usize, n: usize, tile: impl Fn(usize, usize, usize, usize) + Sync) {
    let columns = column_split(n, rayon::current_num_threads());
    for_row_blocks(m, &columns, |i0, i1, &(j0, j1)| tile(i0, i1, j0, j1));
}

/// Calls `block(i0, i1, part)` for blocks of rows `i0..i1` covering `m` rows, for every part
/// (one task per part, in parallel; each walks its row blocks in order).
fn for_row_blocks<P: Sync>(m: usize, parts: &[P], block: impl Fn(usize, usize, &P) + Sync) {
    let rows = rows_per_block(m);
    parts.par_iter().for_each(|part| {
        for i0 in (0..m).step_by(rows) {
            block(i0, (i0 + rows).min(m), part);
        }
    });
}

/// Before a product accumulates into the tile (rows of `cols` at stride `ld`): the bias is
/// written (or added, when the tile already holds a residual). Returns the `beta` the product
/// then needs.
///
/// # Safety
/// `c` must point at `rows` rows of `cols` writable floats at stride `ld`.
unsafe fn prepare_tile(
    c: *mut f32,
    rows: usize,
    cols: usize,
    ld: usize,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
) -> f32 {
    let accumulate = epilogue == Epilogue::Accumulate;
    if let Some(b) = bias {
        for r in 0..rows {
            let row = std::slice::from_raw_parts_mut(c.add(r * ld), cols);
            if accumulate {
                math::add_assign(row, b);
            } else {
                row.copy_from_slice(b);
            }
        }
    }
    if accumulate || bias.is_some() {
        1.0
    } else {
        0.0
    }
}

/// After a product wrote the tile: the GELU, when asked for.
///
/// # Safety
/// As for [`prepare_tile`].
unsafe fn finish_tile(c: *mut f32, rows: usize, cols: usize, ld: usize, epilogue: Epilogue) {
    if epilogue == Epilogue::Gelu {
        for r in 0..rows {
            math::gelu(std::slice::from_raw_parts_mut(c.add(r * ld), cols));
        }
    }
}

/// A linear layer's weights in the layout of one CPU kernel.
pub enum CpuLinear {
    F32(F32Linear),
    Bf16(Bf16Linear),
    Int8(Int8Linear),
    /// ggml block-quantized weights from a GGUF file, with ggml's arithmetic.
    Quant(quant::QuantLinear),
}

impl CpuLinear {
    pub fn out_features(&self) -> usize {
        match self {
            Self::F32(l) => l.n,
            Self::Bf16(l) => l.n,
            Self::Int8(l) => l.n,
            Self::Quant(l) => l.out_features(),
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Self::F32(l) => l.k,
            Self::Bf16(l) => l.k,
            Self::Int8(l) => l.k,
            Self::Quant(l) => l.in_features(),
        }
    }

    /// `out = x · Wᵀ + b` for `x` (m, k) row-major f32 and `out` (m, n).
    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.forward_with(x, m, out, Epilogue::Store);
    }

    /// `y = x · Wᵀ + b`, then `out` receives `y` as `epilogue` says.
    pub fn forward_with(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue) {
        assert_eq!(x.len(), m * self.in_features());
        assert_eq!(out.len(), m * self.out_features());
        match self {
            Self::F32(l) => l.forward_with(x, m, out, epilogue),
            Self::Bf16(l) => l.forward_with(x, m, out, epilogue),
            Self::Int8(l) => l.forward_with(x, m, out, epilogue),
            Self::Quant(l) => l.forward_with(x, m, out, epilogue),
        }
    }

    /// `x` is (m, k) row-major f32; returns (m, n).
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.out_features()];
        self.forward_into(x, m, &mut out);
        out
    }

    /// Bytes of weight storage (for reports).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::F32(l) => match &l.weights {
                F32Weights::Plain(_) => l.n * l.k * 4,
                #[cfg(feature = "mkl")]
                F32Weights::Packed(parts) => parts.iter().map(|(_, _, p)| p.bytes()).sum(),
            },
            Self::Bf16(l) => l.w.len() * 2,
            Self::Int8(l) => l.w.len() + l.scale.len() * 8,
            Self::Quant(l) => l.weight_bytes(),
        }
    }
}

/// f32 weights, the checkpoint's tensor itself: our AVX-512 kernel for a few rows, else MKL's
/// sgemm (feature `mkl`) or the `gemm` crate (candle's own matrix-product library).
pub struct F32Linear {
    weights: F32Weights,
    bias: Option<Vec<f32>>,
    n: usize,
    k: usize,
}

enum F32Weights {
    /// (n, k) row-major: the checkpoint's tensor itself.
    Plain(Tensor),
    /// In MKL's packed layout, one part per column range of the threads' split (then MKL
    /// does not re-pack the weights on every product: 10% of a one-frame encode).
    #[cfg(feature = "mkl")]
    Packed(Vec<(usize, usize, mkl::PackedF32)>),
}

impl F32Linear {
    /// `w` is an (n, k) f32 tensor on the CPU. With `pack_rows` (and the `mkl` feature), the
    /// weights are kept only in MKL's packed layout, tuned for products of about that many
    /// rows: for layers only ever applied to many rows at once.
    pub fn new(
        w: Tensor,
        bias: Option<Vec<f32>>,
        pack_rows: Option<usize>,
    ) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        #[allow(unused_mut)]
        let mut layer = Self {
            weights: F32Weights::Plain(w),
            bias,
            n,
            k,
        };
        #[cfg(feature = "mkl")]
        if let Some(rows) = pack_rows {
            let ranges = column_split(n, rayon::current_num_threads());
            let packed = layer.with_weights(|w| {
                ranges
                    .iter()
                    .map(|&(j0, j1)| {
                        // SAFETY: rows j0..j1 of the (n, k) weights.
                        let part = unsafe {
                            mkl::PackedF32::new(rows, j1 - j0, k, w.as_ptr().add(j0 * k), k)
                        };
                        (j0, j1, part)
                    })
                    .collect()
            });
            // The plain tensor goes now: only the packed copy stays.
            layer.weights = F32Weights::Packed(packed);
        }
        #[cfg(not(feature = "mkl"))]
        let _ = pack_rows;
        Ok(layer)
    }

    /// The weight tensor (n, k), unless the weights are packed.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weights {
            F32Weights::Plain(w) => Some(w),
            #[cfg(feature = "mkl")]
            F32Weights::Packed(_) => None,
        }
    }

    fn forward_with(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue) {
        let (n, k) = (self.n, self.k);
        let c = SharedMut(out.as_mut_ptr());
        #[cfg(feature = "mkl")]
        if let F32Weights::Packed(packed) = &self.weights {
            for_row_blocks(m, packed, |i0, i1, &(j0, j1, ref part)| {
                // SAFETY: as in `Bf16Linear::forward_bf16`.
                unsafe {
                    let tile = c.get().add(i0 * n + j0);
                    let bias = self.bias.as_deref().map(|b| &b[j0..j1]);
                    let beta = prepare_tile(tile, i1 - i0, j1 - j0, n, bias, epilogue);
                    part.product(i1 - i0, x.as_ptr().add(i0 * k), beta, tile, n);
                    finish_tile(tile, i1 - i0, j1 - j0, n, epilogue);
                }
            });
            return;
        }
        self.with_weights(|w| {
            if m <= gemv::MAX_ROWS && CpuFeatures::get().avx512f {
                return epilogue.unfused(out, |out| {
                    for (rows_x, rows_out) in x
                        .chunks(gemv::MAX_ROWS * k)
                        .zip(out.chunks_mut(gemv::MAX_ROWS * n))
                    {
                        gemv::f32(
                            rows_x,
                            rows_x.len() / k,
                            w,
                            n,
                            k,
                            self.bias.as_deref(),
                            rows_out,
                        );
                    }
                });
            }
            for_tiles(m, n, |i0, i1, j0, j1| {
                let (rows, cols) = (i1 - i0, j1 - j0);
                // SAFETY: A rows i0..i1 of the (m, k) activations, B rows j0..j1 of the (n, k)
                // weights, C the (rows, cols) tile at (i0, j0) of the (m, n) output, which no
                // other tile touches.
                unsafe {
                    let tile = c.get().add(i0 * n + j0);
                    let bias = self.bias.as_deref().map(|b| &b[j0..j1]);
                    let beta = prepare_tile(tile, rows, cols, n, bias, epilogue);
                    sgemm_single(
                        rows,
                        cols,
                        k,
                        x.as_ptr().add(i0 * k),
                        k,
                        w.as_ptr().add(j0 * k),
                        k,
                        true,
                        beta != 0.0,
                        tile,
                        n,
                    );
                    finish_tile(tile, rows, cols, n, epilogue);
                }
            })
        })
    }

    /// Calls `f` with the plain (n, k) weights as a slice (packed weights never get here).
    fn with_weights<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        #[allow(clippy::infallible_destructuring_match)] // without `mkl`, one variant
        let w = match &self.weights {
            F32Weights::Plain(w) => w,
            #[cfg(feature = "mkl")]
            F32Weights::Packed(_) => unreachable!("packed weights take their own path"),
        };
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            unreachable!("F32Linear holds a CPU tensor")
        };
        f(
            &storage.as_slice::<f32>().expect("f32 weights")[layout.start_offset()..]
                [..self.n * self.k],
        )
    }
}

pub struct Bf16Linear {
    /// (n, k) row-major bf16 bits.
    w: Vec<u16>,
    bias: Option<Vec<f32>>,
    n: usize,
    k: usize,
}

impl Bf16Linear {
    /// `w` is (n, k) row-major f32.
    pub fn new(w: &[f32], n: usize, k: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(w.len(), n * k);
        let mut bits = vec![0u16; w.len()];
        convert::to_bf16(w, &mut bits);
        Self {
            w: bits,
            bias,
            n,
            k,
        }
    }

    fn forward_with(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue) {
        let k = self.k;
        let mut xb = Scratch::<u16>::new(m * k);
        convert::to_bf16(x, &mut xb);
        self.forward_bf16(&xb, m, out, epilogue);
    }

    /// The product for activations already in bf16.
    pub fn forward_bf16(&self, xb: &[u16], m: usize, out: &mut [f32], epilogue: Epilogue) {
        let (n, k) = (self.n, self.k);
        if m <= gemv::MAX_ROWS || !HAS_MKL {
            return epilogue.unfused(out, |out| {
                for (rows_x, rows_out) in xb
                    .chunks(gemv::MAX_ROWS * k)
                    .zip(out.chunks_mut(gemv::MAX_ROWS * n))
                {
                    gemv::bf16(
                        rows_x,
                        rows_x.len() / k,
                        &self.w,
                        n,
                        k,
                        self.bias.as_deref(),
                        rows_out,
                    );
                }
            });
        }
        #[cfg(feature = "mkl")]
        {
            let c = SharedMut(out.as_mut_ptr());
            for_tiles(m, n, |i0, i1, j0, j1| {
                let (rows, cols) = (i1 - i0, j1 - j0);
                // SAFETY: A rows i0..i1 of the (m, k) activations, B rows j0..j1 of the (n, k)
                // weights, C the (rows, cols) tile at (i0, j0) of the (m, n) output, which no
                // other tile touches.
                unsafe {
                    let tile = c.get().add(i0 * n + j0);
                    let bias = self.bias.as_deref().map(|b| &b[j0..j1]);
                    let beta = prepare_tile(tile, rows, cols, n, bias, epilogue);
                    mkl::bf16_nt(
                        rows,
                        cols,
                        k,
                        xb.as_ptr().add(i0 * k),
                        self.w.as_ptr().add(j0 * k),
                        k,
                        beta,
                        tile,
                        n,
                    );
                    finish_tile(tile, rows, cols, n, epilogue);
                }
            });
        }
    }
}

pub struct Int8Linear {
    /// (n, k) row-major int8.
    w: Vec<i8>,
    /// Per output channel.
    scale: Vec<f32>,
    /// `-128 · Σ_k w[j, k]`: removes the +128 offset of the u8 activations.
    offset: Vec<i32>,
    bias: Option<Vec<f32>>,
    n: usize,
    k: usize,
}

impl Int8Linear {
    /// `w` is (n, k) row-major f32.
    pub fn new(w: &[f32], n: usize, k: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(w.len(), n * k);
        let (q, scale, offset) = convert::quantize_weights(w, k);
        Self {
            w: q,
            scale,
            offset,
            bias,
            n,
            k,
        }
    }

    fn forward_with(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue) {
        let k = self.k;
        let mut xq = Scratch::<u8>::new(m * k);
        let mut xs = Scratch::<f32>::new(m);
        convert::quantize_rows(x, k, &mut xq, &mut xs);
        self.forward_quantized(&xq, &xs, m, out, epilogue);
    }

    /// The product for activations already quantised (u8 with +128 offset, per-row scales).
    pub fn forward_quantized(
        &self,
        xq: &[u8],
        xs: &[f32],
        m: usize,
        out: &mut [f32],
        epilogue: Epilogue,
    ) {
        let (n, k) = (self.n, self.k);
        if m <= gemv::MAX_ROWS || !HAS_MKL {
            return epilogue.unfused(out, |out| {
                for ((rows_x, rows_s), rows_out) in xq
                    .chunks(gemv::MAX_ROWS * k)
                    .zip(xs.chunks(gemv::MAX_ROWS))
                    .zip(out.chunks_mut(gemv::MAX_ROWS * n))
                {
                    gemv::int8(
                        rows_x,
                        rows_s,
                        rows_s.len(),
                        &self.w,
                        &self.scale,
                        &self.offset,
                        n,
                        k,
                        self.bias.as_deref(),
                        rows_out,
                    );
                }
            });
        }
        #[cfg(feature = "mkl")]
        {
            let y = SharedMut(out.as_mut_ptr());
            for_tiles(m, n, |i0, i1, j0, j1| {
                let (rows, cols) = (i1 - i0, j1 - j0);
                let mut acc = Scratch::<i32>::new(rows * cols);
                let bias = self.bias.as_deref().map(|b| &b[j0..j1]);
                // SAFETY: A rows i0..i1 of the (m, k) activations, B rows j0..j1 of the (n, k)
                // weights, the int32 products into this task's (rows, cols) scratch; then the
                // output tile at (i0, j0), which no other tile touches.
                unsafe {
                    mkl::u8s8_nt(
                        rows,
                        cols,
                        k,
                        xq.as_ptr().add(i0 * k),
                        self.w.as_ptr().add(j0 * k),
                        k,
                        acc.as_mut_ptr(),
                        cols,
                        self.offset.as_ptr().add(j0),
                    );
                    for (r, acc_row) in acc.chunks(cols).enumerate() {
                        let out_row =
                            std::slice::from_raw_parts_mut(y.get().add((i0 + r) * n + j0), cols);
                        rescale_row(
                            acc_row,
                            xs[i0 + r],
                            &self.scale[j0..j1],
                            bias,
                            epilogue == Epilogue::Accumulate,
                            out_row,
                        );
                        if epilogue == Epilogue::Gelu {
                            math::gelu(out_row);
                        }
                    }
                }
            });
        }
    }
}

dispatch_avx512! {
    /// One output row of the int8 product: `y = acc · xs · ws + bias`, stored or added.
    #[cfg(feature = "mkl")]
    fn rescale_row(
        acc: &[i32],
        xs: f32,
        ws: &[f32],
        bias: Option<&[f32]>,
        accumulate: bool,
        out: &mut [f32],
    ) {
        // Four plain loops (rather than one with branches inside) so that each vectorises.
        let products = acc.iter().zip(ws).map(|(&a, &s)| a as f32 * xs * s);
        match (bias, accumulate) {
            (Some(b), false) => {
                for ((o, p), &b) in out.iter_mut().zip(products).zip(b) {
                    *o = p + b;
                }
            }
            (Some(b), true) => {
                for ((o, p), &b) in out.iter_mut().zip(products).zip(b) {
                    *o += p + b;
                }
            }
            (None, false) => out.iter_mut().zip(products).for_each(|(o, p)| *o = p),
            (None, true) => out.iter_mut().zip(products).for_each(|(o, p)| *o += p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[j * k + t] as f64;
                }
                out[i * n + j] = s as f32 + b.map_or(0.0, |b| b[j]);
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn reduced_precision_products_stay_close_to_f64() {
        let cpu = CpuFeatures::get();
        let supported = cpu.reduced_precision() || (cpu.avx512_bf16 && cpu.avx512_vnni);
        if !supported {
            eprintln!("skipped: this CPU lacks AVX-512 BF16/VNNI");
            return;
        }
        // k with a tail (not a multiple of 64), n not a multiple of 4, several row counts.
        let (n, k) = (37, 200);
        let w = data(n * k, 1);
        let bias = data(n, 2);
        let f32_layer = |pack_rows| {
            let w = Tensor::from_vec(w.clone(), (n, k), &candle_core::Device::Cpu).unwrap();
            CpuLinear::F32(F32Linear::new(w, Some(bias.clone()), pack_rows).unwrap())
        };
        // (layer, name, bound): |x|, |w| <= 1 and k = 200, so bf16 rounding (2^-9 relative on
        // each operand) bounds the error by about 200 · 2 · 2^-9 ≈ 0.8 in the worst case,
        // 0.05 typically; int8 by about twice that.
        let layers = [
            (f32_layer(None), "f32", 1e-4),
            // Packed for 17 rows, used for other row counts too (MKL builds only).
            (f32_layer(Some(17)), "f32 packed", 1e-4),
            (
                CpuLinear::Bf16(Bf16Linear::new(&w, n, k, Some(bias.clone()))),
                "bf16",
                0.1,
            ),
            (
                CpuLinear::Int8(Int8Linear::new(&w, n, k, Some(bias.clone()))),
                "int8",
                0.2,
            ),
        ];
        // Row counts of the small-batch kernels, of MKL's products, and of several row blocks.
        for m in [1, 3, 4, 5, 9, 40, 700] {
            let x = data(m * k, 3 + m as u32);
            let exact = reference(&x, &w, Some(&bias), m, n, k);
            let mut exact_gelu = exact.clone();
            math::gelu(&mut exact_gelu);
            let residual = data(m * n, 99);
            let exact_sum: Vec<f32> = residual.iter().zip(&exact).map(|(r, y)| r + y).collect();
            for (layer, name, bound) in &layers {
                let mut y = vec![f32::NAN; m * n];
                layer.forward_into(&x, m, &mut y);
                let e = max_err(&y, &exact);
                assert!(e < *bound, "{name} m={m}: {e}");
                layer.forward_with(&x, m, &mut y, Epilogue::Gelu);
                let e = max_err(&y, &exact_gelu);
                assert!(e < *bound, "{name} + gelu m={m}: {e}");
                let mut y = residual.clone();
                layer.forward_with(&x, m, &mut y, Epilogue::Accumulate);
                let e = max_err(&y, &exact_sum);
                assert!(e < *bound, "{name} + residual m={m}: {e}");
            }
        }
    }

    #[test]
    fn column_split_covers_every_column_once() {
        for (n, parts) in [(100, 2), (5, 3), (4096, 2), (64, 4)] {
            let ranges = column_split(n, parts);
            assert_eq!(ranges.first().unwrap().0, 0);
            assert_eq!(ranges.last().unwrap().1, n);
            for w in ranges.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
        }
    }
}
