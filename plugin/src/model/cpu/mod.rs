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
pub mod vit;

use candle_core::{Storage, Tensor};
#[cfg(feature = "mkl")]
use rayon::prelude::*;

pub use detect::CpuFeatures;

/// Whether this build links oneMKL (cargo feature `mkl`).
pub const HAS_MKL: bool = cfg!(feature = "mkl");

/// Column boundaries of `parts` tasks over `n` output columns, multiples of 64.
#[cfg(any(feature = "mkl", test))]
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
        $crate::model::cpu::dispatch_avx512! {
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
                let f = $crate::model::cpu::CpuFeatures::get();
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

/// `C[m, n] (row stride ldc) = A[m, k] (row stride lda) · op(B)`, f32 on the calling thread,
/// where `op(B)` is `B[n, k]ᵀ` when `b_rows_are_columns`, else `B[k, n]` (row stride ldb).
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
    c: *mut f32,
    ldc: usize,
) {
    #[cfg(feature = "mkl")]
    mkl::sgemm_strided(m, n, k, a, lda, b, ldb, b_rows_are_columns, c, ldc);
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
            false,
            a,
            1,
            lda as isize,
            b,
            rhs_cs,
            rhs_rs,
            0.0,
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

/// A linear layer's weights in the layout of one CPU kernel.
pub enum CpuLinear {
    F32(F32Linear),
    Bf16(Bf16Linear),
    Int8(Int8Linear),
}

impl CpuLinear {
    pub fn out_features(&self) -> usize {
        match self {
            Self::F32(l) => l.n,
            Self::Bf16(l) => l.n,
            Self::Int8(l) => l.n,
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Self::F32(l) => l.k,
            Self::Bf16(l) => l.k,
            Self::Int8(l) => l.k,
        }
    }

    /// `out = x · Wᵀ + b` for `x` (m, k) row-major f32 and `out` (m, n).
    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.in_features());
        assert_eq!(out.len(), m * self.out_features());
        match self {
            Self::F32(l) => l.forward_into(x, m, out),
            Self::Bf16(l) => l.forward_into(x, m, out),
            Self::Int8(l) => l.forward_into(x, m, out),
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
            Self::F32(l) => l.n * l.k * 4,
            Self::Bf16(l) => l.w.len() * 2,
            Self::Int8(l) => l.w.len() + l.scale.len() * 8,
        }
    }
}

dispatch_avx512! {
    /// Fills the rows of `out` (rows of `bias.len()`) with the bias, or zeros.
    fn fill_bias(bias: Option<&[f32]>, out: &mut [f32]) {
        match bias {
            Some(b) => out.chunks_mut(b.len()).for_each(|r| r.copy_from_slice(b)),
            None => out.fill(0.0),
        }
    }
}

/// f32 weights: our AVX-512 kernel for a few rows, else MKL's sgemm (feature `mkl`) or the
/// `gemm` crate (candle's own matrix-product library).
pub struct F32Linear {
    /// (n, k) row-major; the checkpoint's tensor itself, not a copy.
    w: Tensor,
    bias: Option<Vec<f32>>,
    n: usize,
    k: usize,
}

impl F32Linear {
    /// `w` must be a contiguous (n, k) f32 tensor on the CPU.
    pub fn new(w: Tensor, bias: Option<Vec<f32>>) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        Ok(Self { w, bias, n, k })
    }

    /// The weight tensor (n, k).
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let (storage, layout) = self.w.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            unreachable!("F32Linear holds a CPU tensor")
        };
        let w = &storage.as_slice::<f32>().expect("f32 weights")[layout.start_offset()..][..n * k];
        let f = CpuFeatures::get();
        if m <= gemv::MAX_ROWS && f.avx512f {
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
            return;
        }
        fill_bias(self.bias.as_deref(), out);
        let accumulate = self.bias.is_some();
        #[cfg(feature = "mkl")]
        {
            let c = SharedMut(out.as_mut_ptr());
            column_split(n, rayon::current_num_threads())
                .into_par_iter()
                .for_each(|(j0, j1)| {
                    let c = c;
                    // SAFETY: A is (m, k), B rows j0..j1 of the (n, k) weights, C columns
                    // j0..j1 of the (m, n) output; tasks write disjoint columns.
                    unsafe {
                        mkl::sgemm_nt(
                            m,
                            j1 - j0,
                            k,
                            x.as_ptr(),
                            w.as_ptr().add(j0 * k),
                            k,
                            if accumulate { 1.0 } else { 0.0 },
                            c.0.add(j0),
                            n,
                        )
                    }
                });
        }
        #[cfg(not(feature = "mkl"))]
        {
            let threads = rayon::current_num_threads();
            // SAFETY: dst (m, n) row-major, lhs x (m, k) row-major, rhs Wᵀ (k, n) read from the
            // (n, k) row-major weights; gemm computes dst = alpha·dst + beta·lhs·rhs.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    accumulate,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    if threads > 1 {
                        gemm::Parallelism::Rayon(threads)
                    } else {
                        gemm::Parallelism::None
                    },
                )
            }
        }
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

    fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let k = self.k;
        let mut xb = Scratch::<u16>::new(m * k);
        convert::to_bf16(x, &mut xb);
        self.forward_bf16(&xb, m, out);
    }

    /// The product for activations already in bf16.
    pub fn forward_bf16(&self, xb: &[u16], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        if m <= gemv::MAX_ROWS || !HAS_MKL {
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
            return;
        }
        #[cfg(feature = "mkl")]
        {
            fill_bias(self.bias.as_deref(), out);
            let beta = if self.bias.is_some() { 1.0 } else { 0.0 };
            let c = SharedMut(out.as_mut_ptr());
            column_split(n, rayon::current_num_threads())
                .into_par_iter()
                .for_each(|(j0, j1)| {
                    let c = c;
                    // SAFETY: as in `F32Linear::forward_into`.
                    unsafe {
                        mkl::bf16_nt(
                            m,
                            j1 - j0,
                            k,
                            xb.as_ptr(),
                            self.w.as_ptr().add(j0 * k),
                            k,
                            beta,
                            c.0.add(j0),
                            n,
                        )
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

    fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let k = self.k;
        let mut xq = Scratch::<u8>::new(m * k);
        let mut xs = Scratch::<f32>::new(m);
        convert::quantize_rows(x, k, &mut xq, &mut xs);
        self.forward_quantized(&xq, &xs, m, out);
    }

    /// The product for activations already quantised (u8 with +128 offset, per-row scales).
    pub fn forward_quantized(&self, xq: &[u8], xs: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        if m <= gemv::MAX_ROWS || !HAS_MKL {
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
            return;
        }
        #[cfg(feature = "mkl")]
        {
            let mut acc = Scratch::<i32>::new(m * n);
            let c = SharedMut(acc.as_mut_ptr());
            let y = SharedMut(out.as_mut_ptr());
            column_split(n, rayon::current_num_threads())
                .into_par_iter()
                .for_each(|(j0, j1)| {
                    let (c, y) = (c, y);
                    // SAFETY: as in `F32Linear::forward_into`; each task reads and writes only
                    // columns j0..j1 of the (m, n) buffers.
                    unsafe {
                        mkl::u8s8_nt(
                            m,
                            j1 - j0,
                            k,
                            xq.as_ptr(),
                            self.w.as_ptr().add(j0 * k),
                            k,
                            c.0.add(j0),
                            n,
                            self.offset.as_ptr().add(j0),
                        );
                        for i in 0..m {
                            let acc_row = std::slice::from_raw_parts(c.0.add(i * n + j0), j1 - j0);
                            let out_row =
                                std::slice::from_raw_parts_mut(y.0.add(i * n + j0), j1 - j0);
                            rescale_row(
                                acc_row,
                                xs[i],
                                &self.scale[j0..j1],
                                self.bias.as_deref().map(|b| &b[j0..j1]),
                                out_row,
                            );
                        }
                    }
                });
        }
    }
}

dispatch_avx512! {
    #[cfg(feature = "mkl")]
    fn rescale_row(acc: &[i32], xs: f32, ws: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        match bias {
            Some(b) => {
                for (((o, &a), &s), &b) in out.iter_mut().zip(acc).zip(ws).zip(b) {
                    *o = a as f32 * xs * s + b;
                }
            }
            None => {
                for ((o, &a), &s) in out.iter_mut().zip(acc).zip(ws) {
                    *o = a as f32 * xs * s;
                }
            }
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
        let f32l = F32Linear::new(
            Tensor::from_vec(w.clone(), (n, k), &candle_core::Device::Cpu).unwrap(),
            Some(bias.clone()),
        )
        .unwrap();
        let bf16 = CpuLinear::Bf16(Bf16Linear::new(&w, n, k, Some(bias.clone())));
        let int8 = CpuLinear::Int8(Int8Linear::new(&w, n, k, Some(bias.clone())));
        for m in [1, 3, 4, 5, 9, 40] {
            let x = data(m * k, 3 + m as u32);
            let exact = reference(&x, &w, Some(&bias), m, n, k);
            let mut y = vec![0f32; m * n];
            f32l.forward_into(&x, m, &mut y);
            let e = max_err(&y, &exact);
            assert!(e < 1e-4, "f32 m={m}: {e}");
            // |x|, |w| <= 1 and k = 200: bf16 rounding (2^-9 relative on each operand) bounds
            // the error by about 200 · 2 · 2^-9 ≈ 0.8 in the worst case, 0.05 typically.
            let e = max_err(&bf16.forward(&x, m), &exact);
            assert!(e < 0.1, "bf16 m={m}: {e}");
            let e = max_err(&int8.forward(&x, m), &exact);
            assert!(e < 0.2, "int8 m={m}: {e}");
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
