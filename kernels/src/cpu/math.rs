//! Row-wise and element-wise f32 kernels of the fused CPU blocks: layer norm, RMS norm,
//! softmax, GELU (erf form), SiLU gating, residual adds. AVX-512 versions with portable
//! versions that compute the same formulas, chosen by the caller's [`Isa`].
//!
//! Accuracy: `exp` is Cephes' `expf` polynomial (about 1 ulp); `erf` is Abramowitz & Stegun
//! 7.1.26 (absolute error below 1.5e-7), the approximation PyTorch's vectorised CPU GELU uses.

#![allow(clippy::excessive_precision)]

use super::parallel::{for_chunks, for_rows};
use super::Isa;

// ---------------------------------------------------------------------------------------
// Scalar formulas (fallback and reference).

#[inline(always)]
fn erf_scalar(x: f32) -> f32 {
    const P: f32 = 0.3275911;
    const A: [f32; 5] = [
        0.254829592,
        -0.284496736,
        1.421413741,
        -1.453152027,
        1.061405429,
    ];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let r = 1.0 - poly * (-z * z).exp();
    r.copysign(x)
}

#[inline(always)]
fn gelu_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_scalar(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

// ---------------------------------------------------------------------------------------
// AVX-512 building blocks.

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[inline(always)]
    pub unsafe fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }

    /// e^x, Cephes expf polynomial, results scaled with `vscalefps` (under/overflow to 0/inf).
    #[inline(always)]
    pub unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, splat(-104.0)), splat(88.72283905206835));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, splat(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, splat(0.693359375), x);
        let r = _mm512_fnmadd_ps(n, splat(-2.12194440e-4), r);
        let mut p = splat(1.9875691500e-4);
        p = _mm512_fmadd_ps(p, r, splat(1.3981999507e-3));
        p = _mm512_fmadd_ps(p, r, splat(8.3334519073e-3));
        p = _mm512_fmadd_ps(p, r, splat(4.1665795894e-2));
        p = _mm512_fmadd_ps(p, r, splat(1.6666665459e-1));
        p = _mm512_fmadd_ps(p, r, splat(5.0000001201e-1));
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), splat(1.0));
        _mm512_scalef_ps(y, n)
    }

    /// 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26.
    #[inline(always)]
    pub unsafe fn gelu(x: __m512) -> __m512 {
        let sign_mask = _mm512_set1_epi32(i32::MIN);
        let xs = _mm512_mul_ps(x, splat(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm512_castsi512_ps(_mm512_andnot_si512(sign_mask, _mm512_castps_si512(xs)));
        // t = 1 / (1 + p z): 14-bit reciprocal estimate plus one Newton step (about 2^-28).
        let d = _mm512_fmadd_ps(splat(0.3275911), z, splat(1.0));
        let r = _mm512_rcp14_ps(d);
        let t = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, splat(2.0)));
        let mut p = splat(1.061405429);
        p = _mm512_fmadd_ps(p, t, splat(-1.453152027));
        p = _mm512_fmadd_ps(p, t, splat(1.421413741));
        p = _mm512_fmadd_ps(p, t, splat(-0.284496736));
        p = _mm512_fmadd_ps(p, t, splat(0.254829592));
        p = _mm512_mul_ps(p, t);
        let e = exp(_mm512_sub_ps(splat(0.0), _mm512_mul_ps(z, z)));
        let erf_abs = _mm512_fnmadd_ps(p, e, splat(1.0));
        let sign = _mm512_and_si512(sign_mask, _mm512_castps_si512(xs));
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
        _mm512_mul_ps(_mm512_mul_ps(splat(0.5), x), _mm512_add_ps(splat(1.0), erf))
    }

    #[inline(always)]
    pub unsafe fn load(p: *const f32, n: usize) -> __m512 {
        if n >= 16 {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)
        }
    }

    #[inline(always)]
    pub unsafe fn store(p: *mut f32, v: __m512, n: usize) {
        if n >= 16 {
            _mm512_storeu_ps(p, v)
        } else {
            _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, v)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn gelu_avx512(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        simd::store(p.add(i), simd::gelu(simd::load(p.add(i), len)), len);
        i += 16;
    }
}

/// In place: `x = gelu_erf(x)`.
pub fn gelu(isa: Isa, x: &mut [f32]) {
    for_chunks(x, |_, c| {
        #[cfg(target_arch = "x86_64")]
        if isa.avx512() {
            // SAFETY: `isa` proves the AVX-512 features.
            return unsafe { gelu_avx512(c) };
        }
        c.iter_mut().for_each(|v| *v = gelu_scalar(*v));
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    let n = gate.len();
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        let x = simd::load(g.add(i), len);
        let e = simd::exp(_mm512_sub_ps(simd::splat(0.0), x));
        let s = _mm512_div_ps(x, _mm512_add_ps(simd::splat(1.0), e));
        simd::store(g.add(i), _mm512_mul_ps(s, simd::load(u.add(i), len)), len);
        i += 16;
    }
}

/// In place: `gate = silu(gate) * up` (LLaMA's gated MLP).
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for_chunks(gate, |start, c| {
        let u = &up[start..start + c.len()];
        #[cfg(target_arch = "x86_64")]
        if isa.avx512() {
            // SAFETY: `isa` proves the AVX-512 features; same lengths.
            return unsafe { silu_mul_avx512(c, u) };
        }
        c.iter_mut()
            .zip(u)
            .for_each(|(g, &u)| *g = silu_scalar(*g) * u);
    });
}

super::isa_fn! {
    fn add_slices(x: &mut [f32], y: &[f32]) {
        x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
    }
}

/// In place: `x += y`.
pub fn add_assign(isa: Isa, x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    for_chunks(x, |start, c| add_slices(isa, c, &y[start..start + c.len()]));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn layer_norm_row_avx512(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = x.len();
    let px = x.as_ptr();
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        acc = _mm512_add_ps(acc, simd::load(px.add(i), (n - i).min(16)));
        i += 16;
    }
    let mean = _mm512_reduce_add_ps(acc) / n as f32;
    let vmean = simd::splat(mean);
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        let d = _mm512_sub_ps(simd::load(px.add(i), len), vmean);
        let d = if len < 16 {
            _mm512_maskz_mov_ps(((1u32 << len) - 1) as u16, d)
        } else {
            d
        };
        acc = _mm512_fmadd_ps(d, d, acc);
        i += 16;
    }
    let var = _mm512_reduce_add_ps(acc) / n as f32;
    let inv = simd::splat(1.0 / (var + eps).sqrt());
    let po = out.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        let d = _mm512_mul_ps(_mm512_sub_ps(simd::load(px.add(i), len), vmean), inv);
        let y = match b {
            Some(b) => _mm512_fmadd_ps(
                d,
                simd::load(w.as_ptr().add(i), len),
                simd::load(b.as_ptr().add(i), len),
            ),
            None => _mm512_mul_ps(d, simd::load(w.as_ptr().add(i), len)),
        };
        simd::store(po.add(i), y, len);
        i += 16;
    }
}

fn layer_norm_row(isa: Isa, x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: `isa` proves the AVX-512 features; the caller passes equal lengths.
        return unsafe { layer_norm_row_avx512(x, w, b, eps, out) };
    }
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (i, o) in out.iter_mut().enumerate() {
        *o = (x[i] - mean) * inv * w[i] + b.map_or(0.0, |b| b[i]);
    }
}

/// `out = LayerNorm(x)` over rows of `w.len()`.
pub fn layer_norm(isa: Isa, x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let width = w.len();
    assert_eq!(x.len(), out.len());
    for_rows(out, width, |i, row| {
        layer_norm_row(isa, &x[i * width..(i + 1) * width], w, b, eps, row)
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn rms_norm_row_avx512(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let px = x.as_ptr();
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let v = simd::load(px.add(i), (n - i).min(16));
        acc = _mm512_fmadd_ps(v, v, acc);
        i += 16;
    }
    let inv = simd::splat(1.0 / (_mm512_reduce_add_ps(acc) / n as f32 + eps).sqrt());
    let po = out.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        let y = _mm512_mul_ps(
            _mm512_mul_ps(simd::load(px.add(i), len), inv),
            simd::load(w.as_ptr().add(i), len),
        );
        simd::store(po.add(i), y, len);
        i += 16;
    }
}

/// `out = x · rsqrt(mean(x²) + eps) · w` over rows of `w.len()`.
pub fn rms_norm(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    assert_eq!(x.len(), out.len());
    for_rows(out, width, |i, row| {
        let x = &x[i * width..(i + 1) * width];
        #[cfg(target_arch = "x86_64")]
        if isa.avx512() {
            // SAFETY: `isa` proves the AVX-512 features; equal lengths.
            return unsafe { rms_norm_row_avx512(x, w, eps, row) };
        }
        let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / width as f32 + eps).sqrt();
        for (o, (&v, &w)) in row.iter_mut().zip(x.iter().zip(w)) {
            *o = v * inv * w;
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn softmax_row_avx512(row: &mut [f32], scale: f32) {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let mut m = simd::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        let v = if len < 16 {
            _mm512_mask_loadu_ps(
                simd::splat(f32::NEG_INFINITY),
                ((1u32 << len) - 1) as u16,
                p.add(i),
            )
        } else {
            _mm512_loadu_ps(p.add(i))
        };
        m = _mm512_max_ps(m, v);
        i += 16;
    }
    let max = _mm512_reduce_max_ps(m);
    let vmax = simd::splat(max * scale);
    let vscale = simd::splat(scale);
    let mut sum = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        let e = simd::exp(_mm512_fmsub_ps(simd::load(p.add(i), len), vscale, vmax));
        let e = if len < 16 {
            _mm512_maskz_mov_ps(((1u32 << len) - 1) as u16, e)
        } else {
            e
        };
        sum = _mm512_add_ps(sum, e);
        simd::store(p.add(i), e, len);
        i += 16;
    }
    let inv = simd::splat(1.0 / _mm512_reduce_add_ps(sum));
    let mut i = 0;
    while i < n {
        let len = (n - i).min(16);
        simd::store(p.add(i), _mm512_mul_ps(simd::load(p.add(i), len), inv), len);
        i += 16;
    }
}

/// In place on one row: `softmax(scale · row)`. `-inf` entries (masked) become 0.
pub fn softmax_row(isa: Isa, row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: `isa` proves the AVX-512 features.
        return unsafe { softmax_row_avx512(row, scale) };
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v * scale - max * scale).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libm_like_erf(x: f64) -> f64 {
        // Series/continued fraction are overkill here: a high-order A&S 7.1.28-free check
        // against the integral by Simpson's rule.
        let n = 2000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_and_exp_are_accurate() {
        for isa in Isa::available() {
            gelu_and_exp_are_accurate_with(isa);
        }
    }

    fn gelu_and_exp_are_accurate_with(isa: Isa) {
        let xs: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) / 100.0).collect();
        let mut g = xs.clone();
        gelu(isa, &mut g);
        for (&x, &y) in xs.iter().zip(&g) {
            let exact = 0.5 * x as f64 * (1.0 + libm_like_erf(x as f64 / 2f64.sqrt()));
            assert!(
                (y as f64 - exact).abs() < 2e-6 * (1.0 + x.abs() as f64),
                "{isa}: gelu({x}) = {y} vs {exact}"
            );
        }
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.7 - 9.0).collect();
        let expect: Vec<f64> = {
            let m = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64 * 0.5));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 * 0.5 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax_row(isa, &mut row, 0.5);
        for (a, b) in row.iter().zip(&expect) {
            assert!(
                (*a as f64 - b).abs() < 1e-6 * (1.0 + b),
                "{isa}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn norms_match_their_formulas() {
        for isa in Isa::available() {
            norms_match_their_formulas_with(isa);
        }
    }

    fn norms_match_their_formulas_with(isa: Isa) {
        let x: Vec<f32> = (0..3 * 37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 5.0)
            .collect();
        let w: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..37).map(|i| i as f32 * -0.02).collect();
        let mut out = vec![0f32; x.len()];
        layer_norm(isa, &x, &w, Some(&b), 1e-5, &mut out);
        for (r, row) in x.chunks(37).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 37.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 37.0;
            for i in 0..37 {
                let e = (row[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
                assert!(
                    (out[r * 37 + i] as f64 - e).abs() < 1e-5,
                    "{isa}: layer norm"
                );
            }
        }
        rms_norm(isa, &x, &w, 1e-5, &mut out);
        for (r, row) in x.chunks(37).enumerate() {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 37.0;
            for i in 0..37 {
                let e = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                assert!((out[r * 37 + i] as f64 - e).abs() < 1e-5, "{isa}: rms norm");
            }
        }
        let mut g: Vec<f32> = x.clone();
        silu_mul(isa, &mut g, &x);
        let mut sum = x.clone();
        add_assign(isa, &mut sum, &w.repeat(3));
        for (i, &v) in sum.iter().enumerate() {
            assert_eq!(v, x[i] + w[i % 37], "{isa}: add");
        }
        for (i, &v) in x.iter().enumerate() {
            let e = v as f64 / (1.0 + (-v as f64).exp()) * v as f64;
            assert!(
                (g[i] as f64 - e).abs() < 1e-5 * (1.0 + e.abs()),
                "{isa}: silu"
            );
        }
    }
}
