//! The few oneMKL CBLAS routines the CPU kernels call (feature `mkl`, linked statically by
//! `build.rs` from `$MKLROOT` with the sequential threading layer: our own rayon tasks split
//! the work, so MKL never starts threads of its own).
//!
//! On CPUs with AMX, MKL runs `gemm_bf16bf16f32` and `gemm_s8u8s32` on the tile units.

#![allow(non_snake_case, clippy::too_many_arguments)]

use std::ffi::{c_int, c_void};

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
/// `co` holds one value per column of C (MKL calls this a row offset).
const ROW_OFFSET: c_int = 171;

extern "C" {
    fn cblas_sgemm(
        layout: c_int,
        transa: c_int,
        transb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
    fn cblas_sgemm_pack_get_size(identifier: c_int, m: c_int, n: c_int, k: c_int) -> usize;
    fn cblas_sgemm_pack(
        layout: c_int,
        identifier: c_int,
        trans: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        src: *const f32,
        ld: c_int,
        dest: *mut f32,
    );
    fn cblas_sgemm_compute(
        layout: c_int,
        transa: c_int,
        transb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
    fn cblas_gemm_bf16bf16f32(
        layout: c_int,
        transa: c_int,
        transb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const u16,
        lda: c_int,
        b: *const u16,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
    fn cblas_gemm_s8u8s32(
        layout: c_int,
        transa: c_int,
        transb: c_int,
        offsetc: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const c_void,
        lda: c_int,
        ao: i8,
        b: *const c_void,
        ldb: c_int,
        bo: i8,
        beta: f32,
        c: *mut i32,
        ldc: c_int,
        co: *const i32,
    );
}

/// `cblas_?gemm_compute`'s marker for an operand in MKL's packed format.
const PACKED: c_int = 151;
/// `cblas_?gemm_pack`'s identifier of the B operand.
const B_MATRIX: c_int = 162;

/// A weight matrix `W[n, k]` (used as `Wᵀ`, the B of `A · Wᵀ`) in MKL's internal packed
/// layout, so that a product does not re-pack it on every call. MKL forbids moving the packed
/// data; the heap buffer of the `Vec` never moves.
pub struct PackedF32 {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedF32 {
    /// Packs `w` (n rows of k at row stride `ldw`) for products of about `m_hint` rows.
    ///
    /// # Safety
    /// `w` must address n rows of k floats at stride `ldw`.
    pub unsafe fn new(m_hint: usize, n: usize, k: usize, w: *const f32, ldw: usize) -> Self {
        let bytes = cblas_sgemm_pack_get_size(B_MATRIX, int(m_hint), int(n), int(k));
        let mut data = vec![0f32; bytes.div_ceil(4)];
        cblas_sgemm_pack(
            ROW_MAJOR,
            B_MATRIX,
            TRANS,
            int(m_hint),
            int(n),
            int(k),
            1.0,
            w,
            int(ldw),
            data.as_mut_ptr(),
        );
        Self { data, n, k }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// `C[m, n] (row stride ldc) = A[m, k] · Wᵀ + beta · C`.
    ///
    /// # Safety
    /// `a` must address m rows of k floats, `c` m rows of n floats at stride `ldc`.
    pub unsafe fn product(&self, m: usize, a: *const f32, beta: f32, c: *mut f32, ldc: usize) {
        cblas_sgemm_compute(
            ROW_MAJOR,
            NO_TRANS,
            PACKED,
            int(m),
            int(self.n),
            int(self.k),
            a,
            int(self.k),
            self.data.as_ptr(),
            int(self.k),
            beta,
            c,
            int(ldc),
        );
    }
}

fn int(v: usize) -> c_int {
    c_int::try_from(v).expect("matrix dimension fits MKL's 32-bit integers")
}

/// `C[m, n] = A[m, k] · op(B) + beta · C` with row strides, f32, where `op(B)` is `B[n, k]ᵀ`
/// when `b_rows_are_columns`, else `B[k, n]`.
///
/// # Safety
/// The pointers must address matrices of the given sizes and strides.
pub unsafe fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    b_rows_are_columns: bool,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    cblas_sgemm(
        ROW_MAJOR,
        NO_TRANS,
        if b_rows_are_columns { TRANS } else { NO_TRANS },
        int(m),
        int(n),
        int(k),
        1.0,
        a,
        int(lda),
        b,
        int(ldb),
        beta,
        c,
        int(ldc),
    );
}

/// As [`sgemm_strided`] with bf16 inputs and f32 output.
///
/// # Safety
/// As for [`sgemm_strided`].
pub unsafe fn bf16_strided(
    m: usize,
    n: usize,
    k: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    ldb: usize,
    b_rows_are_columns: bool,
    c: *mut f32,
    ldc: usize,
) {
    cblas_gemm_bf16bf16f32(
        ROW_MAJOR,
        NO_TRANS,
        if b_rows_are_columns { TRANS } else { NO_TRANS },
        int(m),
        int(n),
        int(k),
        1.0,
        a,
        int(lda),
        b,
        int(ldb),
        0.0,
        c,
        int(ldc),
    );
}

/// `C[m, n] = A[m, k] · B[n, k]ᵀ + beta · C`, bf16 inputs, f32 accumulation and output.
///
/// # Safety
/// As for [`sgemm_strided`].
pub unsafe fn bf16_nt(
    m: usize,
    n: usize,
    k: usize,
    a: *const u16,
    b: *const u16,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    cblas_gemm_bf16bf16f32(
        ROW_MAJOR,
        NO_TRANS,
        TRANS,
        int(m),
        int(n),
        int(k),
        1.0,
        a,
        int(k),
        b,
        int(ldb),
        beta,
        c,
        int(ldc),
    );
}

/// `C[m, n] = A[m, k] · B[n, k]ᵀ + co[n]` in i32, A unsigned (u8), B signed (s8).
///
/// # Safety
/// As for [`sgemm_nt`]; `co` has n values.
pub unsafe fn u8s8_nt(
    m: usize,
    n: usize,
    k: usize,
    a: *const u8,
    b: *const i8,
    ldb: usize,
    c: *mut i32,
    ldc: usize,
    co: *const i32,
) {
    cblas_gemm_s8u8s32(
        ROW_MAJOR,
        NO_TRANS,
        TRANS,
        ROW_OFFSET,
        int(m),
        int(n),
        int(k),
        1.0,
        a as *const c_void,
        int(k),
        0,
        b as *const c_void,
        int(ldb),
        0,
        0.0,
        c,
        int(ldc),
        co,
    );
}
