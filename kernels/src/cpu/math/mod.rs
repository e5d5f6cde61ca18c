//! Row-wise and element-wise f32 kernels of the fused CPU blocks: layer norm, RMS norm,
//! softmax, GELU (erf form), SiLU gating, residual adds. Each SIMD kernel is written once over
//! a register width ([`lanes`]) and runs on AVX-512 or AVX2 + FMA; portable scalar versions
//! compute the same formulas; the caller's [`Isa`] picks.
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
// The SIMD kernels, written once over [`Lanes`] and compiled for AVX-512 and for AVX2.

#[cfg(target_arch = "x86_64")]
mod lanes;

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::lanes::Lanes;

    /// e^x, Cephes expf polynomial; under/overflows to 0/inf.
    #[inline(always)]
    unsafe fn exp<L: Lanes>(x: L) -> L {
        let x = x.max(L::splat(-104.0)).min(L::splat(88.72283905206835));
        let n = x.mul(L::splat(std::f32::consts::LOG2_E)).round();
        let r = n.neg_mul_add(L::splat(0.693359375), x);
        let r = n.neg_mul_add(L::splat(-2.12194440e-4), r);
        let mut p = L::splat(1.9875691500e-4);
        p = p.mul_add(r, L::splat(1.3981999507e-3));
        p = p.mul_add(r, L::splat(8.3334519073e-3));
        p = p.mul_add(r, L::splat(4.1665795894e-2));
        p = p.mul_add(r, L::splat(1.6666665459e-1));
        p = p.mul_add(r, L::splat(5.0000001201e-1));
        let y = p.mul_add(r.mul(r), r).add(L::splat(1.0));
        y.times_pow2(n)
    }

    /// 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26.
    #[inline(always)]
    unsafe fn gelu<L: Lanes>(x: L) -> L {
        let xs = x.mul(L::splat(std::f32::consts::FRAC_1_SQRT_2));
        let z = xs.abs();
        let t = L::splat(0.3275911).mul_add(z, L::splat(1.0)).recip();
        let mut p = L::splat(1.061405429);
        p = p.mul_add(t, L::splat(-1.453152027));
        p = p.mul_add(t, L::splat(1.421413741));
        p = p.mul_add(t, L::splat(-0.284496736));
        p = p.mul_add(t, L::splat(0.254829592));
        p = p.mul(t);
        let e = exp(L::splat(0.0).sub(z.mul(z)));
        let erf = p.neg_mul_add(e, L::splat(1.0)).signed_like(xs);
        L::splat(0.5).mul(x).mul(L::splat(1.0).add(erf))
    }

    #[inline(always)]
    pub unsafe fn gelu_slice<L: Lanes>(x: &mut [f32]) {
        let (n, p) = (x.len(), x.as_mut_ptr());
        for i in (0..n).step_by(L::N) {
            gelu(L::load(p.add(i), n - i)).store(p.add(i), n - i);
        }
    }

    #[inline(always)]
    pub unsafe fn silu_mul_slice<L: Lanes>(gate: &mut [f32], up: &[f32]) {
        let (n, g, u) = (gate.len(), gate.as_mut_ptr(), up.as_ptr());
        for i in (0..n).step_by(L::N) {
            let x = L::load(g.add(i), n - i);
            let s = x.div(L::splat(1.0).add(exp(L::splat(0.0).sub(x))));
            s.mul(L::load(u.add(i), n - i)).store(g.add(i), n - i);
        }
    }

    #[inline(always)]
    pub unsafe fn layer_norm_row<L: Lanes>(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        eps: f32,
        out: &mut [f32],
    ) {
        let (n, px) = (x.len(), x.as_ptr());
        let mut acc = L::splat(0.0);
        for i in (0..n).step_by(L::N) {
            acc = acc.add(L::load(px.add(i), n - i));
        }
        let mean = L::splat(acc.sum() / n as f32);
        let mut acc = L::splat(0.0);
        for i in (0..n).step_by(L::N) {
            let d = L::load(px.add(i), n - i).sub(mean).keep(n - i);
            acc = d.mul_add(d, acc);
        }
        let inv = L::splat(1.0 / (acc.sum() / n as f32 + eps).sqrt());
        let po = out.as_mut_ptr();
        for i in (0..n).step_by(L::N) {
            let d = L::load(px.add(i), n - i).sub(mean).mul(inv);
            let w = L::load(w.as_ptr().add(i), n - i);
            let y = match b {
                Some(b) => d.mul_add(w, L::load(b.as_ptr().add(i), n - i)),
                None => d.mul(w),
            };
            y.store(po.add(i), n - i);
        }
    }

    #[inline(always)]
    pub unsafe fn rms_norm_row<L: Lanes>(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let (n, px) = (x.len(), x.as_ptr());
        let mut acc = L::splat(0.0);
        for i in (0..n).step_by(L::N) {
            let v = L::load(px.add(i), n - i);
            acc = v.mul_add(v, acc);
        }
        let inv = L::splat(1.0 / (acc.sum() / n as f32 + eps).sqrt());
        let po = out.as_mut_ptr();
        for i in (0..n).step_by(L::N) {
            let y = L::load(px.add(i), n - i)
                .mul(inv)
                .mul(L::load(w.as_ptr().add(i), n - i));
            y.store(po.add(i), n - i);
        }
    }

    #[inline(always)]
    pub unsafe fn softmax_row<L: Lanes>(row: &mut [f32], scale: f32) {
        let (n, p) = (row.len(), row.as_mut_ptr());
        let mut m = L::splat(f32::NEG_INFINITY);
        for i in (0..n).step_by(L::N) {
            m = m.max(L::load_or(p.add(i), n - i, f32::NEG_INFINITY));
        }
        let vmax = L::splat(m.max_lane() * scale);
        let vscale = L::splat(scale);
        let mut sum = L::splat(0.0);
        for i in (0..n).step_by(L::N) {
            let e = exp(L::load(p.add(i), n - i).mul_sub(vscale, vmax)).keep(n - i);
            sum = sum.add(e);
            e.store(p.add(i), n - i);
        }
        let inv = L::splat(1.0 / sum.sum());
        for i in (0..n).step_by(L::N) {
            L::load(p.add(i), n - i).mul(inv).store(p.add(i), n - i);
        }
    }

    /// `out[r·N .. r·N + n]` = Σ_t p_t · v_t[r·N ..] for the `R` registers from `v` (f16 rows
    /// at stride `ld`), `n` lanes of each.
    #[inline(always)]
    unsafe fn weighted_rows<L: Lanes, const R: usize>(
        p: &[f32],
        v: *const u16,
        ld: usize,
        n: usize,
        out: *mut f32,
    ) {
        let mut acc = [L::splat(0.0); R];
        for (t, &p) in p.iter().enumerate() {
            let (p, row) = (L::splat(p), v.add(t * ld));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = p.mul_add(L::load_f16(row.add(r * L::N), n), *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            acc.store(out.add(r * L::N), n);
        }
    }

    /// One query row over `scores.len()` cached positions of f16 keys and values (rows at
    /// stride `ld`): `out = softmax(scale · K q) · V`, `scores` as scratch.
    #[inline(always)]
    pub unsafe fn attend_f16_row<L: Lanes>(
        q: &[f32],
        keys: &[u16],
        values: &[u16],
        ld: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = q.len();
        let (pq, pk, pv) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
        for (t, score) in scores.iter_mut().enumerate() {
            let k = pk.add(t * ld);
            // Two sums, so that the multiply-adds of a row do not wait on each other.
            let (mut a, mut b) = (L::splat(0.0), L::splat(0.0));
            let mut i = 0;
            while i + 2 * L::N <= d {
                a = L::load(pq.add(i), L::N).mul_add(L::load_f16(k.add(i), L::N), a);
                let j = i + L::N;
                b = L::load(pq.add(j), L::N).mul_add(L::load_f16(k.add(j), L::N), b);
                i += 2 * L::N;
            }
            if i < d {
                a = L::load(pq.add(i), d - i).mul_add(L::load_f16(k.add(i), d - i), a);
                let j = i + L::N;
                if j < d {
                    b = L::load(pq.add(j), d - j).mul_add(L::load_f16(k.add(j), d - j), b);
                }
            }
            *score = a.add(b).sum();
        }
        softmax_row::<L>(scores, scale);
        // The output in blocks of 8 registers summed over all positions (a constant count, so
        // that the sums stay in registers), then what is left one register at a time.
        let block = 8 * L::N;
        let mut c0 = 0;
        while c0 + block <= d {
            weighted_rows::<L, 8>(scores, pv.add(c0), ld, L::N, out.as_mut_ptr().add(c0));
            c0 += block;
        }
        while c0 < d {
            let n = (d - c0).min(L::N);
            weighted_rows::<L, 1>(scores, pv.add(c0), ld, n, out.as_mut_ptr().add(c0));
            c0 += n;
        }
    }
}

/// `fn $name(isa, args) -> Option<R>`: runs `simd::$kernel` on the widest lanes `isa`
/// allows (AVX-512, else AVX2 + FMA), or returns `None` for the caller's scalar formula.
macro_rules! simd_kernel {
    ($name:ident = $kernel:ident($($arg:ident: $ty:ty),*)) => {
        #[allow(unused_variables)]
        fn $name(isa: Isa, $($arg: $ty),*) -> Option<()> {
            #[cfg(target_arch = "x86_64")]
            {
                use lanes::{F32x16, F32x8};
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
                unsafe fn wide($($arg: $ty),*) {
                    simd::$kernel::<F32x16>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn narrow($($arg: $ty),*) {
                    simd::$kernel::<F32x8>($($arg),*)
                }
                if isa.avx512() {
                    // SAFETY: `isa` proves every feature `wide` enables; the kernels read
                    // and write only within the slices they are given.
                    return Some(unsafe { wide($($arg),*) });
                }
                if isa.avx2() {
                    // SAFETY: as above, for `narrow`'s features.
                    return Some(unsafe { narrow($($arg),*) });
                }
            }
            None
        }
    };
}

simd_kernel!(gelu_simd = gelu_slice(x: &mut [f32]));
simd_kernel!(silu_mul_simd = silu_mul_slice(gate: &mut [f32], up: &[f32]));
simd_kernel!(
    layer_norm_row_simd = layer_norm_row(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        eps: f32,
        out: &mut [f32]
    )
);
simd_kernel!(rms_norm_row_simd = rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]));
simd_kernel!(softmax_row_simd = softmax_row(row: &mut [f32], scale: f32));
simd_kernel!(
    attend_f16_row_simd = attend_f16_row(
        q: &[f32],
        keys: &[u16],
        values: &[u16],
        ld: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32]
    )
);

// ---------------------------------------------------------------------------------------
// The kernels.

/// In place: `x = gelu_erf(x)`.
pub fn gelu(isa: Isa, x: &mut [f32]) {
    for_chunks(x, |_, c| {
        if gelu_simd(isa, c).is_none() {
            c.iter_mut().for_each(|v| *v = gelu_scalar(*v));
        }
    });
}

/// In place: `gate = silu(gate) * up` (LLaMA's gated MLP).
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for_chunks(gate, |start, c| {
        let u = &up[start..start + c.len()];
        if silu_mul_simd(isa, c, u).is_none() {
            c.iter_mut()
                .zip(u)
                .for_each(|(g, &u)| *g = silu_scalar(*g) * u);
        }
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

fn layer_norm_row(isa: Isa, x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    assert!(x.len() == w.len() && out.len() == w.len() && b.is_none_or(|b| b.len() == w.len()));
    if layer_norm_row_simd(isa, x, w, b, eps, out).is_some() {
        return;
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

/// `out = x · rsqrt(mean(x²) + eps) · w` over rows of `w.len()`.
pub fn rms_norm(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    assert_eq!(x.len(), out.len());
    for_rows(out, width, |i, row| {
        let x = &x[i * width..(i + 1) * width];
        if rms_norm_row_simd(isa, x, w, eps, row).is_some() {
            return;
        }
        let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / width as f32 + eps).sqrt();
        for (o, (&v, &w)) in row.iter_mut().zip(x.iter().zip(w)) {
            *o = v * inv * w;
        }
    });
}

/// In place on one row: `softmax(scale · row)`. `-inf` entries (masked) become 0.
pub fn softmax_row(isa: Isa, row: &mut [f32], scale: f32) {
    if softmax_row_simd(isa, row, scale).is_some() {
        return;
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

/// One query row `q` (d) attending over `scores.len()` cached positions whose keys and values
/// are half-precision bits, rows of d at stride `ld` in `keys` and `values`: `out` (d) =
/// softmax(scale · K q) · V, `scores` as scratch. Reads the f16 cache as it is (a decode
/// step's attention reads every cached position: half the bytes of f32). Returns `false`,
/// untouched, without SIMD lanes for it (the caller widens the rows to f32).
#[allow(clippy::too_many_arguments)]
pub fn attend_f16_row(
    isa: Isa,
    q: &[f32],
    keys: &[u16],
    values: &[u16],
    ld: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) -> bool {
    let (d, seen) = (q.len(), scores.len());
    assert!(seen > 0 && ld >= d && out.len() == d);
    assert!((seen - 1) * ld + d <= keys.len() && (seen - 1) * ld + d <= values.len());
    attend_f16_row_simd(isa, q, keys, values, ld, scale, scores, out).is_some()
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

    /// A decode row's attention over an f16 cache against the formula in f64 on the same
    /// (widened) keys and values: head sizes with tails of every lane width, rows at a stride
    /// longer than a head (a cache's other heads between them), one position and many.
    #[test]
    fn attention_of_one_row_over_an_f16_cache_follows_the_formula() {
        for (d, seen, ld) in [(128, 131, 128), (88, 40, 100), (7, 1, 7), (24, 300, 64)] {
            let q: Vec<f32> = (0..d).map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0).collect();
            let cache = |seed: usize| -> Vec<u16> {
                (0..(seen - 1) * ld + d)
                    .map(|i| half::f16::from_f32(((i * seed) % 29) as f32 / 14.0 - 1.0).to_bits())
                    .collect()
            };
            let (k, v) = (cache(13), cache(7));
            let wide = |c: &[u16], t: usize, i: usize| half::f16::from_bits(c[t * ld + i]).to_f64();
            let scale = (d as f64).powf(-0.5);
            let logits: Vec<f64> = (0..seen)
                .map(|t| (0..d).map(|i| q[i] as f64 * wide(&k, t, i)).sum::<f64>() * scale)
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = e.iter().sum();
            let want: Vec<f64> = (0..d)
                .map(|i| (0..seen).map(|t| e[t] / total * wide(&v, t, i)).sum())
                .collect();
            for isa in Isa::available() {
                let (mut scores, mut out) = (vec![0f32; seen], vec![f32::NAN; d]);
                let ran = attend_f16_row(isa, &q, &k, &v, ld, scale as f32, &mut scores, &mut out);
                if !ran {
                    assert!(!isa.avx2(), "{isa}: SIMD lanes for it");
                    continue;
                }
                let err = out.iter().zip(&want).map(|(&o, &w)| (o as f64 - w).abs());
                let err = err.fold(0.0, f64::max);
                assert!(err < 1e-5, "{isa} d={d} seen={seen}: {err:e}");
            }
        }
    }

    /// Masked (-inf) entries come out exactly 0, and scores far below the row's largest
    /// underflow as f64's exp does, through AVX2's two-step 2^n as through `vscalefps`.
    #[test]
    fn softmax_masks_and_underflows_like_the_formula() {
        let row: Vec<f32> = (0..45)
            .map(|i| match i % 7 {
                3 => f32::NEG_INFINITY,
                _ => 1.0 - i as f32 * 4.5,
            })
            .collect();
        let expect: Vec<f64> = {
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - 1.0).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        for isa in Isa::available() {
            let mut out = row.clone();
            softmax_row(isa, &mut out, 1.0);
            for (i, (&a, &b)) in out.iter().zip(&expect).enumerate() {
                if row[i] == f32::NEG_INFINITY {
                    assert_eq!(a, 0.0, "{isa}: masked entry {i}");
                } else {
                    assert!(
                        (a as f64 - b).abs() <= 1e-6 * b + 1e-44,
                        "{isa}: entry {i}: {a} vs {b}"
                    );
                }
            }
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
