//! The few oneMKL CBLAS routines the CPU kernels call (feature `mkl`, linked statically by
//! `build.rs` from `$MKLROOT` with the sequential threading layer: our own rayon tasks split
//! the work, so MKL never starts threads of its own).
//!
//! On CPUs with AMX, MKL runs `gemm_bf16bf16f32` and `gemm_s8u8s32` on the tile units.

#![allow(non_snake_case, clippy::too_many_arguments)]

use std::ffi::{c_int, c_void};

use super::blas::{Dims, Mat, Out};

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
    fn cblas_gemm_s8u8s32_pack_get_size(identifier: c_int, m: c_int, n: c_int, k: c_int) -> usize;
    fn cblas_gemm_s8u8s32_pack(
        layout: c_int,
        identifier: c_int,
        trans: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        src: *const c_void,
        ld: c_int,
        dest: *mut c_void,
    );
    fn cblas_gemm_s8u8s32_compute(
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
pub(crate) struct PackedF32 {
    data: ZeroedPages,
    n: usize,
    k: usize,
}

/// A zeroed buffer in pages of its own (an anonymous mapping): the room MKL's packed layouts
/// reserve but never write then takes no memory. `cblas_sgemm_pack_get_size` asks for 1.4-2x
/// the weights' bytes; a zeroed `Vec` from the heap (`calloc`) clears recycled memory, so all
/// of it was resident: the cpu-bench vision tower held 5.5 GB of packed weights for 3.9 GB of
/// f32, more than the plain build's whole model beside it.
struct ZeroedPages {
    ptr: std::ptr::NonNull<u8>,
    bytes: usize,
}

// SAFETY: the mapping is owned (unmapped once, on drop) and only read through `&self`.
unsafe impl Send for ZeroedPages {}
unsafe impl Sync for ZeroedPages {}

impl ZeroedPages {
    fn new(bytes: usize) -> Self {
        let bytes = bytes.max(1);
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        match std::ptr::NonNull::new(p as *mut u8) {
            Some(ptr) if p != libc::MAP_FAILED => Self { ptr, bytes },
            _ => std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(bytes, 4096).expect("a buffer size"),
            ),
        }
    }

    /// The start, page-aligned (so aligned for any element type).
    fn as_ptr<T>(&self) -> *const T {
        self.ptr.as_ptr() as *const T
    }

    fn as_mut_ptr<T>(&mut self) -> *mut T {
        self.ptr.as_ptr() as *mut T
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for ZeroedPages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this size, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut c_void, self.bytes) };
    }
}

impl PackedF32 {
    /// Packs `w` (n rows of k at row stride `ldw`) for products of about `m_hint` rows.
    ///
    /// # Safety
    /// `w` must address n rows of k floats at stride `ldw`.
    pub unsafe fn new(m_hint: usize, n: usize, k: usize, w: *const f32, ldw: usize) -> Self {
        let bytes = cblas_sgemm_pack_get_size(B_MATRIX, int(m_hint), int(n), int(k));
        let mut data = ZeroedPages::new(bytes);
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

    /// Bytes reserved (those MKL never writes take no memory).
    pub fn bytes(&self) -> usize {
        self.data.bytes()
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
            self.data.as_ptr::<f32>(),
            int(self.k),
            beta,
            c,
            int(ldc),
        );
    }
}

/// int8 weights `W[n, k]` (the B of `A · Wᵀ` in [`u8s8_nt`]) in MKL's packed layout: a
/// product of many rows otherwise copies the weights into that layout once per call (on an
/// AMX CPU, a third of the time of a one-frame encode's int8 products).
pub(crate) struct PackedS8 {
    data: ZeroedPages,
    n: usize,
    k: usize,
}

impl PackedS8 {
    /// Packs `w` (n rows of k at row stride `ldw`) for products of about `m_hint` rows.
    ///
    /// # Safety
    /// `w` must address n rows of k bytes at stride `ldw`.
    pub unsafe fn new(m_hint: usize, n: usize, k: usize, w: *const i8, ldw: usize) -> Self {
        let bytes = cblas_gemm_s8u8s32_pack_get_size(B_MATRIX, int(m_hint), int(n), int(k));
        let mut data = ZeroedPages::new(bytes);
        cblas_gemm_s8u8s32_pack(
            ROW_MAJOR,
            B_MATRIX,
            TRANS,
            int(m_hint),
            int(n),
            int(k),
            w as *const c_void,
            int(ldw),
            data.as_mut_ptr::<c_void>(),
        );
        Self { data, n, k }
    }

    /// Bytes reserved (those MKL never writes take no memory).
    pub fn bytes(&self) -> usize {
        self.data.bytes()
    }

    /// `C[m, n] (row stride ldc) = A[m, k] · Wᵀ + co[n]` in i32, A unsigned.
    ///
    /// # Safety
    /// `a` must address m rows of k bytes, `c` m rows of n values at stride `ldc`, `co` n
    /// values.
    pub unsafe fn product(&self, m: usize, a: *const u8, c: *mut i32, ldc: usize, co: *const i32) {
        cblas_gemm_s8u8s32_compute(
            ROW_MAJOR,
            NO_TRANS,
            PACKED,
            ROW_OFFSET,
            int(m),
            int(self.n),
            int(self.k),
            1.0,
            a as *const c_void,
            int(self.k),
            0,
            self.data.as_ptr::<c_void>(),
            int(self.k),
            0,
            0.0,
            c,
            int(ldc),
            co,
        );
    }
}

fn int(v: usize) -> c_int {
    c_int::try_from(v).expect("matrix dimension fits MKL's 32-bit integers")
}

fn trans<T>(m: &Mat<T>) -> c_int {
    if m.transposed {
        TRANS
    } else {
        NO_TRANS
    }
}

/// `cblas_?gemm` with operands of type `T` and f32 output.
type GemmFn<T> = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const T,
    c_int,
    *const T,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// The operand types of MKL's floating-point GEMMs (f32 output): f32 (`cblas_sgemm`) and bf16
/// bits (`cblas_gemm_bf16bf16f32`, on AMX where the CPU has it and the process may use it).
pub(crate) trait GemmOperand: Sized {
    const GEMM: GemmFn<Self>;
}

impl GemmOperand for f32 {
    const GEMM: GemmFn<f32> = cblas_sgemm;
}

impl GemmOperand for u16 {
    const GEMM: GemmFn<u16> = cblas_gemm_bf16bf16f32;
}

/// `C = A · op(B) + beta · C` with f32 output.
///
/// # Safety
/// The operands must address matrices of these sizes and strides.
pub(crate) unsafe fn gemm<T: GemmOperand>(d: Dims, a: Mat<T>, b: Mat<T>, c: Out, beta: f32) {
    (T::GEMM)(
        ROW_MAJOR,
        trans(&a),
        trans(&b),
        int(d.m),
        int(d.n),
        int(d.k),
        1.0,
        a.ptr,
        int(a.ld),
        b.ptr,
        int(b.ld),
        beta,
        c.ptr,
        int(c.ld),
    );
}

/// `C[m, n] = A[m, k] · B[n, k]ᵀ + co[n]` in i32, A unsigned (u8), B signed (s8).
///
/// # Safety
/// As for [`gemm`]; `co` has n values.
pub(crate) unsafe fn u8s8_nt(
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
