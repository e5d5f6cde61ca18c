//! Element-wise conversions around the reduced-precision products: f32 to bf16 (round to
//! nearest even, as PyTorch's `.to(torch.bfloat16)`), f32 to and from f16 (the KV caches of
//! int8 and bf16 models), and per-row symmetric int8
//! quantisation of activations (stored with a +128 offset as u8, the operand type of
//! `vpdpbusd` and MKL's `gemm_s8u8s32`).

use rayon::prelude::*;

use super::Isa;

/// Work below this many elements stays on the calling thread.
const PAR_MIN: usize = 1 << 15;

#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    // Round to nearest, ties to even.
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn to_bf16_serial(isa: Isa, src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512_bf16() {
        // SAFETY: `isa` proves AVX-512 BF16.
        return unsafe { to_bf16_avx512bf16(src, dst) };
    }
    to_bf16_plain(isa, src, dst);
}

super::isa_fn! {
    /// Written as a plain loop: the compiler vectorises it for the enabled features.
    fn to_bf16_plain(src: &[f32], dst: &mut [u16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16_bits(s);
        }
    }
}

/// `vcvtneps2bf16`: round to nearest even, 16 values per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
unsafe fn to_bf16_avx512bf16(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(s.add(i))));
        _mm256_storeu_si256(d.add(i) as *mut __m256i, v);
        i += 16;
    }
    for j in i..n {
        *d.add(j) = bf16_bits(*s.add(j));
    }
}

/// `dst[i] = bf16(src[i])`, in parallel for large slices.
pub fn to_bf16(isa: Isa, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    if src.len() < PAR_MIN {
        return to_bf16_serial(isa, src, dst);
    }
    let chunk = src.len().div_ceil(rayon::current_num_threads()).max(4096);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| to_bf16_serial(isa, s, d));
}

/// `dst[i]` = the IEEE half-precision bits of `src[i]` (round to nearest even; beyond ±65504,
/// ±inf): the keys and values of int8 and bf16 models' KV caches. `vcvtps2ph`, 8 values
/// per instruction, where the CPU has F16C (every AVX2 level here does).
pub fn to_f16(isa: Isa, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: the AVX2 level includes F16C.
        return unsafe { to_f16_f16c(src, dst) };
    }
    let _ = isa;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s).to_bits();
    }
}

/// `dst[i]` = the value of the half-precision bits `src[i]` (exact).
pub fn f16_to_f32(isa: Isa, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: the AVX2 level includes F16C.
        return unsafe { f16_to_f32_f16c(src, dst) };
    }
    let _ = isa;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(s).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn to_f16_f16c(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.add(i)));
        _mm_storeu_si128(d.add(i) as *mut __m128i, h);
        i += 8;
    }
    for j in i..n {
        *d.add(j) = half::f16::from_f32(*s.add(j)).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(s.add(i) as *const __m128i);
        _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for j in i..n {
        *d.add(j) = half::f16::from_bits(*s.add(j)).to_f32();
    }
}

/// One row: returns the scale `s` with `x ≈ s · (q - 128)`.
#[inline(always)]
fn quantize_row_inner(x: &[f32], q: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        q.fill(128);
        return if amax.is_finite() { 1.0 } else { f32::NAN };
    }
    let scale = amax / 127.0;
    let inv = 127.0 / amax;
    for (d, &v) in q.iter_mut().zip(x) {
        let r = (v * inv).round_ties_even().clamp(-127.0, 127.0);
        *d = (r as i32 + 128) as u8;
    }
    scale
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn quantize_row_avx512(x: &[f32], q: &mut [u8]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let px = x.as_ptr();
    let mask = |len: usize| ((1u32 << len.min(16)) - 1) as u16;
    // Four running maxima: one alone waits on `vmaxps`'s latency every step.
    let mut m = [_mm512_setzero_ps(); 4];
    let mut nan: u16 = 0;
    let mut i = 0;
    while i < n {
        // Up to 64 values a step, 16 into each maximum (unrolled: `m` stays in registers).
        for (j, a) in m.iter_mut().enumerate() {
            let at = i + 16 * j;
            if at < n {
                let v = _mm512_maskz_loadu_ps(mask(n - at), px.add(at));
                *a = _mm512_max_ps(*a, _mm512_abs_ps(v));
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            }
        }
        i += 64;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(
        _mm512_max_ps(m[0], m[1]),
        _mm512_max_ps(m[2], m[3]),
    ));
    // As in `quantize_row_avx2`: the scalar code where `vcvtps2dq` would differ from its
    // casts (and NaN anywhere in the row: the scalar fold skips NaNs, `vmaxps` may not).
    if nan != 0 || amax == 0.0 || !amax.is_finite() || !(127.0 / amax).is_finite() {
        return quantize_row_inner(x, q);
    }
    let inv = _mm512_set1_ps(127.0 / amax);
    let (lo, hi, off) = (
        _mm512_set1_epi32(-127),
        _mm512_set1_epi32(127),
        _mm512_set1_epi32(128),
    );
    let pq = q.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let k = mask(n - i);
        let v = _mm512_maskz_loadu_ps(k, px.add(i));
        // Round to nearest even (the default MXCSR mode), clamp, shift to u8.
        let r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
        let r = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(r, lo), hi), off);
        _mm512_mask_cvtepi32_storeu_epi8(pq.add(i) as *mut i8, k, r);
        i += 16;
    }
    amax / 127.0
}

/// [`quantize_row_inner`] in AVX2, 32 values a step, with the same arithmetic (the same
/// reciprocal, round to nearest even, the same clamp), so the same bytes: NaN values become
/// 128 as there (the scalar `NaN as i32` is 0), where `vcvtps2dq` would give i32::MIN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [u8]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let (full, px) = (n / 32 * 32, x.as_ptr());
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    // Four running maxima: one alone waits on `vmaxps`'s latency every step.
    let mut m = [_mm256_setzero_ps(); 4];
    let body = n / 8 * 8;
    for i in (0..body).step_by(32) {
        // Up to 32 values a step, 8 into each maximum (unrolled: `m` stays in registers).
        for (j, a) in m.iter_mut().enumerate() {
            let at = i + 8 * j;
            if at < body {
                // `vmaxps` returns its second operand when either is NaN: NaNs are skipped,
                // as `f32::max` skips them in the scalar fold (no running maximum is NaN).
                let v = _mm256_and_ps(_mm256_loadu_ps(px.add(at)), magnitude);
                *a = _mm256_max_ps(v, *a);
            }
        }
    }
    let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let amax = x[n / 8 * 8..]
        .iter()
        .chain(&lanes)
        .fold(0f32, |m, v| m.max(v.abs()));
    let inv_scalar = 127.0 / amax;
    // A zero, infinite or NaN maximum, or one so small that its reciprocal overflows: the
    // scalar code's answers (its saturating float-to-int casts are not `vcvtps2dq`'s).
    if amax == 0.0 || !amax.is_finite() || !inv_scalar.is_finite() {
        return quantize_row_inner(x, q);
    }
    let inv = _mm256_set1_ps(inv_scalar);
    // A function, not a closure, so that it is compiled with this function's features.
    #[inline(always)]
    unsafe fn quantize8(p: *const f32, inv: __m256) -> __m256i {
        let v = _mm256_loadu_ps(p);
        // NaN lanes to 0 (they round to 0 and become 128, as in the scalar code).
        let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        // Round to nearest even (the default MXCSR mode).
        _mm256_cvtps_epi32(_mm256_mul_ps(v, inv))
    }
    let (low, offset) = (_mm256_set1_epi8(-127), _mm256_set1_epi8(-128));
    // packs interleave the 128-bit lanes: dwords 0 4 1 5 2 6 3 7 put them back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let pq = q.as_mut_ptr();
    for i in (0..full).step_by(32) {
        let ab = _mm256_packs_epi32(quantize8(px.add(i), inv), quantize8(px.add(i + 8), inv));
        let cd = _mm256_packs_epi32(
            quantize8(px.add(i + 16), inv),
            quantize8(px.add(i + 24), inv),
        );
        // The packs saturate at [-128, 127]: the max gives the clamp to [-127, 127].
        let r = _mm256_max_epi8(_mm256_packs_epi16(ab, cd), low);
        let r = _mm256_permutevar8x32_epi32(r, order);
        // + 128 as u8 is a flip of the top bit.
        _mm256_storeu_si256(pq.add(i) as *mut __m256i, _mm256_xor_si256(r, offset));
    }
    for (d, &v) in q[full..].iter_mut().zip(&x[full..]) {
        let r = (v * inv_scalar).round_ties_even().clamp(-127.0, 127.0);
        *d = (r as i32 + 128) as u8;
    }
    amax / 127.0
}

fn quantize_row(isa: Isa, x: &[f32], q: &mut [u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: `isa` proves the AVX-512 features.
        return unsafe { quantize_row_avx512(x, q) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: `isa` proves AVX2, FMA and F16C.
        return unsafe { quantize_row_avx2(x, q) };
    }
    quantize_row_inner(x, q)
}

/// Quantises each row of `x` (rows of `k`) to u8 with its own symmetric scale.
pub fn quantize_rows(isa: Isa, x: &[f32], k: usize, q: &mut [u8], scales: &mut [f32]) {
    assert_eq!(x.len(), q.len());
    assert_eq!(x.len(), scales.len() * k);
    if x.len() < PAR_MIN {
        for ((row, qrow), s) in x.chunks(k).zip(q.chunks_mut(k)).zip(scales.iter_mut()) {
            *s = quantize_row(isa, row, qrow);
        }
        return;
    }
    q.par_chunks_mut(k)
        .zip(x.par_chunks(k))
        .zip(scales.par_iter_mut())
        .for_each(|((qrow, row), s)| *s = quantize_row(isa, row, qrow));
}

/// Per-output-channel symmetric int8 weights: row `j` of `w` (rows of `k`) becomes
/// `scale[j] · q[j, :]` with `q` in [-levels, levels] (`levels` at most 127). Returns (q,
/// scales, -128 · row sums of q).
pub fn quantize_weights(
    isa: Isa,
    w: &[f32],
    k: usize,
    levels: i8,
) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    assert!(
        (1..=127).contains(&levels),
        "int8 weights of {levels} levels"
    );
    let n = w.len() / k;
    let mut q = vec![0i8; w.len()];
    let mut scales = vec![0f32; n];
    let mut offsets = vec![0i32; n];
    q.par_chunks_mut(k)
        .zip(w.par_chunks(k))
        .zip(scales.par_iter_mut().zip(offsets.par_iter_mut()))
        .for_each(|((qrow, row), (s, o))| {
            let (scale, sum) = quantize_weight_row(isa, row, qrow, levels as f32);
            *s = scale;
            *o = -128 * sum;
        });
    (q, scales, offsets)
}

super::isa_fn! {
    /// One weight row to int8 in [-levels, levels] with its scale; returns (scale, Σ q).
    fn quantize_weight_row(row: &[f32], q: &mut [i8], levels: f32) -> (f32, i32) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 { amax / levels } else { 1.0 };
        let inv = 1.0 / scale;
        let mut sum = 0i32;
        for (d, &v) in q.iter_mut().zip(row) {
            let r = (v * inv).round_ties_even().clamp(-levels, levels) as i32;
            *d = r as i8;
            sum += r;
        }
        (scale, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2^-8 is halfway too: ties go up to the even 1 + 2^-6.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_to_f32(bf16_bits(-2.5)), -2.5);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
        let src: Vec<f32> = (0..100_000).map(|i| i as f32 * 0.37 - 5000.0).collect();
        for isa in Isa::available() {
            let mut fast = vec![0u16; src.len()];
            to_bf16(isa, &src, &mut fast);
            assert!(
                fast.iter().zip(&src).all(|(&b, &s)| b == bf16_bits(s)),
                "{isa}"
            );
        }
    }

    /// Every ISA's f16 conversions give the `half` crate's (round to nearest even, overflow
    /// to infinity, subnormals), and f16 to f32 is exact.
    #[test]
    fn f16_conversions_match_the_half_crate_on_every_isa() {
        let mut src: Vec<f32> = (0..10_003).map(|i| (i as f32 - 5000.0) * 0.0371).collect();
        src.extend([
            0.0,
            -0.0,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            6e-8,
            3e-5,
            f32::INFINITY,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
        ]);
        let want: Vec<u16> = src
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect();
        let exact: Vec<f32> = want
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect();
        for isa in Isa::available() {
            let mut bits = vec![0u16; src.len()];
            to_f16(isa, &src, &mut bits);
            assert_eq!(bits, want, "{isa}");
            let mut back = vec![0f32; src.len()];
            f16_to_f32(isa, &bits, &mut back);
            assert_eq!(back, exact, "{isa}");
        }
    }

    /// Every ISA's quantiser writes the portable one's bytes and scales: rows with tails of
    /// every length, a zero row, rows with a NaN, an infinity, and values at the ends.
    #[test]
    fn row_quantisation_is_the_same_on_every_isa() {
        for k in [1, 7, 8, 31, 32, 33, 77, 200] {
            let mut x: Vec<f32> = (0..6 * k)
                .map(|i| ((i * 7919) % 211) as f32 / 13.0 - 8.0)
                .collect();
            x[k..2 * k].fill(0.0);
            x[2 * k + k / 2] = f32::NAN;
            x[3 * k + k / 3] = f32::INFINITY;
            x[4 * k] = -1e30;
            x[5 * k + k - 1] = 3.0e-39;
            let portable = {
                let (mut q, mut s) = (vec![0u8; x.len()], vec![0f32; 6]);
                quantize_rows(Isa::portable(), &x, k, &mut q, &mut s);
                (q, s)
            };
            for isa in Isa::available() {
                let (mut q, mut s) = (vec![0u8; x.len()], vec![0f32; 6]);
                quantize_rows(isa, &x, k, &mut q, &mut s);
                assert_eq!(q, portable.0, "{isa} k={k}");
                let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&s), bits(&portable.1), "{isa} k={k}");
            }
        }
    }

    #[test]
    fn row_quantisation_round_trips_within_half_a_step() {
        for isa in Isa::available() {
            row_quantisation_round_trips_with(isa);
        }
    }

    fn row_quantisation_round_trips_with(isa: Isa) {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.3).collect();
        let mut q = vec![0u8; 64];
        let mut s = vec![0f32; 2];
        quantize_rows(isa, &x, 32, &mut q, &mut s);
        for (row, (qrow, scale)) in x.chunks(32).zip(q.chunks(32).zip(&s)) {
            for (&v, &qv) in row.iter().zip(qrow) {
                let back = (qv as i32 - 128) as f32 * scale;
                assert!(
                    (back - v).abs() <= scale * 0.5 + 1e-6,
                    "{isa}: {v} vs {back}"
                );
            }
        }
        for levels in [127i8, 63] {
            let (wq, ws, wo) = quantize_weights(isa, &x, 32, levels);
            assert_eq!(
                wo[0],
                -128 * wq[..32].iter().map(|&v| v as i32).sum::<i32>()
            );
            let amax = x[32..].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (ws[1] * levels as f32 - amax).abs() < 1e-5,
                "{isa} {levels}"
            );
            assert_eq!(
                wq.iter().map(|v| v.unsigned_abs()).max(),
                Some(levels as u8)
            );
        }
    }
}
