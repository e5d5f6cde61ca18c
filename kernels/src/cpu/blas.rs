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

/// The sizes of one product `C[m, n] = A[m, k] · op(B)[k, n]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// The output of a product: `m` rows of `n` f32 at row stride `ld`.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub ptr: *mut f32,
    pub ld: usize,
}

/// `C = A · op(B) (+ C when accumulate)` in f32 on the calling thread: MKL's sgemm under the
/// `mkl` feature, else the `gemm` crate.
///
/// # Safety
/// The operands must address matrices of these sizes and strides; C must not alias A or B.
pub(crate) unsafe fn sgemm(d: Dims, a: Mat<f32>, b: Mat<f32>, c: Out, accumulate: bool) {
    debug_assert!(!a.transposed);
    #[cfg(feature = "mkl")]
    super::mkl::gemm(d, a, b, c, if accumulate { 1.0 } else { 0.0 });
    #[cfg(not(feature = "mkl"))]
    {
        // (column stride, row stride) of op(B) as the gemm crate wants them.
        let (rhs_cs, rhs_rs) = if b.transposed {
            (b.ld as isize, 1)
        } else {
            (1, b.ld as isize)
        };
        gemm::gemm(
            d.m,
            d.n,
            d.k,
            c.ptr,
            1,
            c.ld as isize,
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
