//! Single-threaded matrix products on one tile, the building block of the parallel products:
//! f32 through MKL's sgemm (feature `mkl`) or the `gemm` crate (candle's matrix-product
//! library), bf16 through MKL. Callers split the work between threads; these never do.

/// A row-major matrix operand: element (r, c) of `op(M)` is `ptr[r * ld + c]`, or
/// `ptr[c * ld + r]` when `transposed` (the matrix is stored as rows of `op(M)`'s columns).
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub ptr: *const T,
    pub ld: usize,
    pub transposed: bool,
}

impl<T> Mat<T> {
    /// Rows of length `ld` (or more) used as they are.
    pub fn rows(ptr: *const T, ld: usize) -> Self {
        Self {
            ptr,
            ld,
            transposed: false,
        }
    }

    /// Rows used as the columns of the operand: `B[n, k]` as `Bᵀ` in `A · Bᵀ`.
    pub fn columns(ptr: *const T, ld: usize) -> Self {
        Self {
            ptr,
            ld,
            transposed: true,
        }
    }
}

/// `C[m, n] (row stride ldc) = A[m, k] · op(B)[k, n] (+ C when accumulate)` in f32 on the
/// calling thread.
///
/// # Safety
/// The operands must address matrices of these sizes and strides; C must not alias A or B.
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<f32>,
    b: Mat<f32>,
    accumulate: bool,
    c: *mut f32,
    ldc: usize,
) {
    debug_assert!(!a.transposed);
    #[cfg(feature = "mkl")]
    super::mkl::sgemm(m, n, k, a, b, if accumulate { 1.0 } else { 0.0 }, c, ldc);
    #[cfg(not(feature = "mkl"))]
    {
        // (column stride, row stride) of op(B) as the gemm crate wants them.
        let (rhs_cs, rhs_rs) = if b.transposed {
            (b.ld as isize, 1)
        } else {
            (1, b.ld as isize)
        };
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.ptr,
            1,
            a.ld as isize,
            b.ptr,
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
