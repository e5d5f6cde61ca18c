//! One f32 SIMD register width behind one interface, so that each row kernel in [`super`] is
//! written once and compiled twice: for AVX-512 (16 lanes) and for AVX2 + FMA (8 lanes).
//!
//! The methods are `#[inline(always)]` without target features of their own. They are only
//! called from the kernels' `#[target_feature]` entry points (`super::simd_kernel!`), which
//! enable what they use, so the intrinsics inline there.

use std::arch::x86_64::*;

/// The f32 vector operations the row kernels use. Loads and stores of `n < N` elements
/// touch only those `n` (masked), so a row's tail needs no copy.
pub trait Lanes: Copy {
    /// f32 values per register.
    const N: usize;

    unsafe fn splat(v: f32) -> Self;
    /// `n.min(N)` values from `p`; the other lanes hold `fill`.
    unsafe fn load_or(p: *const f32, n: usize, fill: f32) -> Self;
    /// The first `n.min(N)` lanes to `p`.
    unsafe fn store(self, p: *mut f32, n: usize);
    /// The first `n.min(N)` lanes kept, the others zero.
    unsafe fn keep(self, n: usize) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    /// `self · b + c`, one rounding.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// `c - self · b`, one rounding.
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self;
    /// `self · b - c`, one rounding.
    unsafe fn mul_sub(self, b: Self, c: Self) -> Self;
    /// |self|.
    unsafe fn abs(self) -> Self;
    /// `self` (non-negative) with the sign bit of `sign`.
    unsafe fn signed_like(self, sign: Self) -> Self;
    /// To the nearest integer, ties to even.
    unsafe fn round(self) -> Self;
    /// `self · 2^n` for integral `n` in [-151, 128], rounded once (to 0 or inf beyond f32).
    unsafe fn times_pow2(self, n: Self) -> Self;
    /// 1 / self, to about 2^-22: the hardware estimate and one Newton step.
    unsafe fn recip(self) -> Self;
    /// The sum of the lanes.
    unsafe fn sum(self) -> f32;
    /// The largest lane.
    unsafe fn max_lane(self) -> f32;

    /// `n.min(N)` half-precision values (IEEE bits) from `p`, widened; the other lanes 0.
    unsafe fn load_f16(p: *const u16, n: usize) -> Self;

    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> Self {
        Self::load_or(p, n, 0.0)
    }
}

/// An AVX-512 register of 16 f32.
#[derive(Clone, Copy)]
pub struct F32x16(__m512);

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        u16::MAX
    } else {
        ((1u32 << n) - 1) as u16
    }
}

impl Lanes for F32x16 {
    const N: usize = 16;

    #[inline(always)]
    unsafe fn load_f16(p: *const u16, n: usize) -> Self {
        let h = if n >= 16 {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            _mm256_maskz_loadu_epi16(mask16(n), p as *const i16)
        };
        Self(_mm512_cvtph_ps(h))
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Self(_mm512_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load_or(p: *const f32, n: usize, fill: f32) -> Self {
        if n >= 16 {
            Self(_mm512_loadu_ps(p))
        } else {
            Self(_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask16(n), p))
        }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, n: usize) {
        if n >= 16 {
            _mm512_storeu_ps(p, self.0)
        } else {
            _mm512_mask_storeu_ps(p, mask16(n), self.0)
        }
    }
    #[inline(always)]
    unsafe fn keep(self, n: usize) -> Self {
        if n >= 16 {
            self
        } else {
            Self(_mm512_maskz_mov_ps(mask16(n), self.0))
        }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Self(_mm512_add_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Self(_mm512_sub_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Self(_mm512_mul_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        Self(_mm512_div_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        Self(_mm512_max_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        Self(_mm512_min_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Self(_mm512_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self {
        Self(_mm512_fnmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul_sub(self, b: Self, c: Self) -> Self {
        Self(_mm512_fmsub_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        Self(_mm512_castsi512_ps(_mm512_andnot_si512(
            _mm512_set1_epi32(i32::MIN),
            _mm512_castps_si512(self.0),
        )))
    }
    #[inline(always)]
    unsafe fn signed_like(self, sign: Self) -> Self {
        let bit = _mm512_and_si512(_mm512_set1_epi32(i32::MIN), _mm512_castps_si512(sign.0));
        Self(_mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(self.0),
            bit,
        )))
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        Self(_mm512_roundscale_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(self.0))
    }
    #[inline(always)]
    unsafe fn times_pow2(self, n: Self) -> Self {
        Self(_mm512_scalef_ps(self.0, n.0))
    }
    #[inline(always)]
    unsafe fn recip(self) -> Self {
        let r = _mm512_rcp14_ps(self.0);
        Self(_mm512_mul_ps(
            r,
            _mm512_fnmadd_ps(self.0, r, _mm512_set1_ps(2.0)),
        ))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
    #[inline(always)]
    unsafe fn max_lane(self) -> f32 {
        _mm512_reduce_max_ps(self.0)
    }
}

/// An AVX register of 8 f32, with AVX2 integer operations and FMA.
#[derive(Clone, Copy)]
pub struct F32x8(__m256);

/// All ones in the first `n` (< 8) 32-bit lanes: a mask for `vmaskmovps`.
#[inline(always)]
unsafe fn mask8(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// 2^n as f32 for integral n in [-126, 127], from its exponent bits.
#[inline(always)]
unsafe fn pow2_bits(n: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        n,
        _mm256_set1_epi32(127),
    )))
}

impl Lanes for F32x8 {
    const N: usize = 8;

    #[inline(always)]
    unsafe fn load_f16(p: *const u16, n: usize) -> Self {
        let h = if n >= 8 {
            _mm_loadu_si128(p as *const __m128i)
        } else {
            // No masked 16-bit load without AVX-512: the tail through a zeroed copy.
            let mut tail = [0u16; 8];
            std::ptr::copy_nonoverlapping(p, tail.as_mut_ptr(), n);
            _mm_loadu_si128(tail.as_ptr() as *const __m128i)
        };
        Self(_mm256_cvtph_ps(h))
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Self(_mm256_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load_or(p: *const f32, n: usize, fill: f32) -> Self {
        if n >= 8 {
            Self(_mm256_loadu_ps(p))
        } else {
            // Masked-off lanes are not read (no fault past the row's end).
            let m = mask8(n);
            Self(_mm256_blendv_ps(
                _mm256_set1_ps(fill),
                _mm256_maskload_ps(p, m),
                _mm256_castsi256_ps(m),
            ))
        }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, n: usize) {
        if n >= 8 {
            _mm256_storeu_ps(p, self.0)
        } else {
            _mm256_maskstore_ps(p, mask8(n), self.0)
        }
    }
    #[inline(always)]
    unsafe fn keep(self, n: usize) -> Self {
        if n >= 8 {
            self
        } else {
            Self(_mm256_and_ps(self.0, _mm256_castsi256_ps(mask8(n))))
        }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Self(_mm256_add_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Self(_mm256_sub_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Self(_mm256_mul_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        Self(_mm256_div_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        Self(_mm256_max_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        Self(_mm256_min_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Self(_mm256_fmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self {
        Self(_mm256_fnmadd_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul_sub(self, b: Self, c: Self) -> Self {
        Self(_mm256_fmsub_ps(self.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        Self(_mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0))
    }
    #[inline(always)]
    unsafe fn signed_like(self, sign: Self) -> Self {
        Self(_mm256_or_ps(
            self.0,
            _mm256_and_ps(_mm256_set1_ps(-0.0), sign.0),
        ))
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        Self(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(self.0))
    }
    #[inline(always)]
    unsafe fn times_pow2(self, n: Self) -> Self {
        // AVX2 has no vscalefps: multiply by 2^(n/2) and 2^(n - n/2), each a normal float
        // for n in [-151, 128], so the result is rounded once, as vscalefps rounds it.
        let n = _mm256_cvtps_epi32(n.0);
        let half = _mm256_srai_epi32::<1>(n);
        let rest = _mm256_sub_epi32(n, half);
        Self(_mm256_mul_ps(
            _mm256_mul_ps(self.0, pow2_bits(half)),
            pow2_bits(rest),
        ))
    }
    #[inline(always)]
    unsafe fn recip(self) -> Self {
        // vrcpps is good to 12 bits (vrcp14ps to 14): one Newton step gives about 2^-22.
        let r = _mm256_rcp_ps(self.0);
        Self(_mm256_mul_ps(
            r,
            _mm256_fnmadd_ps(self.0, r, _mm256_set1_ps(2.0)),
        ))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let s = _mm_add_ps(
            _mm256_castps256_ps128(self.0),
            _mm256_extractf128_ps::<1>(self.0),
        );
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
    #[inline(always)]
    unsafe fn max_lane(self) -> f32 {
        let s = _mm_max_ps(
            _mm256_castps256_ps128(self.0),
            _mm256_extractf128_ps::<1>(self.0),
        );
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}
