//! Pillow-exact antialiased bicubic resize of packed RGB24 images.
//!
//! The reference preprocessing calls `PIL.Image.resize(size, BICUBIC)` on uint8 frames. A ±1
//! step in any output byte costs about 0.015 after CLIP normalisation, so "some bicubic" is not
//! enough: this is Pillow's `ImagingResample` (`src/libImaging/Resample.c`) step for step —
//! double-precision coefficients, 22-bit fixed-point weights, integer accumulation, a uint8
//! intermediate between the horizontal and the vertical pass. The per-axis integer weights are
//! public ([`AxisCoeffs`]) so a GPU kernel can use exactly the same numbers.
//!
//! The pass order is that of every Pillow before 12.2, i.e. of the reference's era: horizontal,
//! then vertical. Pillow 12.2 started filtering images taller than 100× their width vertically
//! first, and Pillow 13 picks the order by size; on those shapes a few bytes differ by 1–25.

use super::color::RgbImage;

/// Fraction bits of the fixed-point weights: 32 bits minus 8 for the sample, minus 2 for the
/// filter's negative lobes and overshoot (Pillow's `PRECISION_BITS`).
pub const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic support radius in source pixels at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Keys' cubic convolution kernel with a = -0.5 (Pillow's `bicubic_filter`).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Resampling weights of one axis: output pixel `i` reads `counts[i]` source pixels starting at
/// `starts[i]`, weighted by `weights[i * ksize ..][.. counts[i]]` (fixed point, see
/// [`PRECISION_BITS`]). Unused tail weights are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisCoeffs {
    pub ksize: usize,
    pub starts: Vec<usize>,
    pub counts: Vec<usize>,
    pub weights: Vec<i32>,
}

impl AxisCoeffs {
    /// Bicubic weights mapping `in_size` source pixels onto `out_size` (Pillow's
    /// `precompute_coeffs` over the full box, then `normalize_coeffs_8bpc`).
    pub fn bicubic(in_size: usize, out_size: usize) -> Self {
        // Pillow stores the box as floats and subtracts in float before widening.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;

        let mut starts = Vec::with_capacity(out_size);
        let mut counts = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for (xx, row) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; negative starts clamp to 0 either way.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let mut total = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(count) {
                *w = bicubic((x as f64 + xmin as f64 - center + 0.5) * inv);
                total += *w;
            }
            for (dst, &w) in row.iter_mut().zip(&k[..count]) {
                let w = if total != 0.0 { w / total } else { w };
                *dst = to_fixed(w);
            }
            starts.push(xmin);
            counts.push(count);
        }
        AxisCoeffs {
            ksize,
            starts,
            counts,
            weights,
        }
    }

    /// The weights of output pixel `i`, one per source pixel it reads.
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let row = &self.weights[i * self.ksize..];
        (self.starts[i], &row[..self.counts[i]])
    }
}

/// Pillow's `normalize_coeffs_8bpc`: round half away from zero onto the fixed-point grid.
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if scaled < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Pillow's `clip8`: drop the fraction bits (flooring) and saturate to a byte. The accumulator
/// starts at one half, so this rounds to nearest.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes `src` to `width` × `height` exactly like Pillow's `Image.resize((width, height),
/// Image.BICUBIC)` on an RGB image. An axis whose size does not change is not filtered, as in
/// Pillow, so resizing to the same size is the identity. A zero target size gives an empty image.
pub fn resize_bicubic(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    if width == 0 || height == 0 || src.width == 0 || src.height == 0 {
        return RgbImage {
            width,
            height,
            data: vec![0; width * height * 3],
        };
    }
    let vertical = AxisCoeffs::bicubic(src.height, height);
    let need_horizontal = width != src.width;
    let need_vertical = height != src.height;

    if !need_horizontal && !need_vertical {
        return src.clone();
    }
    if !need_horizontal {
        return vertical_pass(&src.data, src.width, 0, &vertical);
    }
    // Horizontal pass over the source rows the vertical pass will read (Pillow's ybox), then
    // the vertical pass over that uint8 intermediate with shifted row bounds.
    let horizontal = AxisCoeffs::bicubic(src.width, width);
    let (first, last) = if need_vertical {
        let n = vertical.starts.len();
        (
            vertical.starts[0],
            vertical.starts[n - 1] + vertical.counts[n - 1],
        )
    } else {
        (0, src.height)
    };
    let temp = horizontal_pass(src, first, last, &horizontal);
    if !need_vertical {
        return temp;
    }
    vertical_pass(&temp.data, temp.width, first, &vertical)
}

/// Filters rows `first..last` of `src` along x.
fn horizontal_pass(src: &RgbImage, first: usize, last: usize, coeffs: &AxisCoeffs) -> RgbImage {
    let out_w = coeffs.starts.len();
    let in_row_bytes = src.width * 3;
    let mut data = vec![0u8; out_w * (last - first) * 3];
    for (y, out_row) in data.chunks_exact_mut(out_w * 3).enumerate() {
        let row = &src.data[(first + y) * in_row_bytes..][..in_row_bytes];
        for (xx, dst) in out_row.chunks_exact_mut(3).enumerate() {
            let (start, taps) = coeffs.taps(xx);
            let mut acc = [HALF; 3];
            for (px, &k) in row[start * 3..].chunks_exact(3).zip(taps) {
                for c in 0..3 {
                    acc[c] += i32::from(px[c]) * k;
                }
            }
            for c in 0..3 {
                dst[c] = clip8(acc[c]);
            }
        }
    }
    RgbImage {
        width: out_w,
        height: last - first,
        data,
    }
}

/// Filters `src` (rows of `width` pixels) along y. `row_offset` is subtracted from the source
/// row indices, for an intermediate that starts at source row `row_offset`.
fn vertical_pass(src: &[u8], width: usize, row_offset: usize, coeffs: &AxisCoeffs) -> RgbImage {
    let out_h = coeffs.starts.len();
    let row_bytes = width * 3;
    let mut data = vec![0u8; row_bytes * out_h];
    for (yy, out_row) in data.chunks_exact_mut(row_bytes).enumerate() {
        let (start, taps) = coeffs.taps(yy);
        let start = start - row_offset;
        for (i, dst) in out_row.iter_mut().enumerate() {
            let mut acc = HALF;
            for (y, &k) in taps.iter().enumerate() {
                acc += i32::from(src[(start + y) * row_bytes + i]) * k;
            }
            *dst = clip8(acc);
        }
    }
    RgbImage {
        width,
        height: out_h,
        data,
    }
}
