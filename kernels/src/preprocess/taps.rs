//! Pillow's antialiased bicubic resampling weights, in the integer form every path uses (the
//! model's two-pass resize, the CPU twin, the CUDA kernel): the same taps, the same rounding.
//!
//! This is Pillow's `ImagingResample` (`src/libImaging/Resample.c`) step for step:
//! double-precision coefficients, 22-bit fixed-point weights, integer accumulation, a uint8
//! intermediate between the horizontal and the vertical pass.

use std::ops::Range;

use candle_core::{bail, Result};

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

/// Resampling taps of one axis: output pixel `i` reads `counts[i]` source pixels from
/// `starts[i]`, weighted by `weights[i * ksize ..][.. counts[i]]` (fixed point,
/// [`PRECISION_BITS`]). Unused tail weights are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisTaps {
    /// Source pixels along the axis.
    pub in_size: usize,
    pub ksize: usize,
    pub starts: Vec<usize>,
    pub counts: Vec<usize>,
    pub weights: Vec<i32>,
}

impl AxisTaps {
    /// Bicubic weights mapping `in_size` source pixels onto `out_size` (Pillow's
    /// `precompute_coeffs` over the full box, then `normalize_coeffs_8bpc`).
    pub fn bicubic(in_size: usize, out_size: usize) -> Self {
        Self::bicubic_window(in_size, out_size, 0..out_size)
    }

    /// [`Self::bicubic`] for the outputs in `window` only (entry 0 is output `window.start`):
    /// what a crop of the resized image needs, whatever the full size (a 2048x1 frame resized
    /// to a 224 shortest edge is 458752 pixels wide; its centre crop needs 224 of them).
    pub fn bicubic_window(in_size: usize, out_size: usize, window: Range<usize>) -> Self {
        let window = window.start.min(out_size)..window.end.min(out_size);
        let first_out = window.start;
        // Pillow stores the box as floats and subtracts in float before widening.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;

        let mut starts = Vec::with_capacity(window.len());
        let mut counts = Vec::with_capacity(window.len());
        let mut weights = vec![0i32; window.len() * ksize];
        let mut k = vec![0f64; ksize];
        for (i, row) in weights.chunks_exact_mut(ksize).enumerate() {
            let xx = first_out + i;
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
        AxisTaps {
            in_size,
            ksize,
            starts,
            counts,
            weights,
        }
    }

    /// The taps of an axis resized from `in_size` to `out_size` pixels: Pillow leaves an axis
    /// whose size does not change unfiltered, which one tap of weight 1.0 reproduces.
    pub fn for_resize(in_size: usize, out_size: usize) -> Self {
        if in_size == out_size {
            Self::identity(in_size)
        } else {
            Self::bicubic(in_size, out_size)
        }
    }
    /// Taps that copy each source pixel: for an axis the resize leaves unchanged (Pillow does
    /// not filter it; one tap of weight 1.0 gives exactly the source bytes).
    pub fn identity(size: usize) -> Self {
        AxisTaps {
            in_size: size,
            ksize: 1,
            starts: (0..size).collect(),
            counts: vec![1; size],
            weights: vec![1 << PRECISION_BITS; size],
        }
    }

    /// Output pixels along the axis (the resized size).
    pub fn out_size(&self) -> usize {
        self.starts.len()
    }

    /// The source start and weights of output pixel `i`.
    #[inline]
    pub fn taps(&self, i: usize) -> (usize, &[i32]) {
        (
            self.starts[i],
            &self.weights[i * self.ksize..][..self.counts[i]],
        )
    }

    pub(crate) fn validate(&self, axis: &str) -> Result<()> {
        let n = self.out_size();
        if n == 0 || self.in_size == 0 || self.ksize == 0 {
            bail!(
                "{axis} taps: empty (in {}, out {n}, ksize {})",
                self.in_size,
                self.ksize
            );
        }
        if self.counts.len() != n || Some(self.weights.len()) != n.checked_mul(self.ksize) {
            bail!(
                "{axis} taps: {n} starts, {} counts, {} weights for ksize {}",
                self.counts.len(),
                self.weights.len(),
                self.ksize
            );
        }
        if self.in_size > i32::MAX as usize || self.weights.len() > i32::MAX as usize / 4 {
            bail!("{axis} taps: too large for the kernel's 32-bit indices");
        }
        for (i, (&s, &c)) in self.starts.iter().zip(&self.counts).enumerate() {
            if c == 0 || c > self.ksize || s.checked_add(c).is_none_or(|e| e > self.in_size) {
                bail!(
                    "{axis} taps: output {i} reads {c} pixels from {s}, outside 0..{} (ksize {})",
                    self.in_size,
                    self.ksize
                );
            }
        }
        Ok(())
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

/// Pillow's `clip8`: drop the fraction bits (flooring, an arithmetic shift) and saturate to a
/// byte. Accumulators start at [`HALF`], so this rounds to nearest.
#[inline]
pub fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One half in the fixed point of the weights: the start of every accumulator.
pub const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Offset of a centre crop's first row (or column) in the source: `(size - crop) // 2` when
/// cropping, `-((crop - size) // 2)` when the crop is larger (the image is then centred on a
/// zero canvas). transformers computes the padded case in two floor steps that can lose a row
/// for odd differences; the full crop size is kept instead.
pub fn centre_crop_offset(size: usize, crop: usize) -> i64 {
    if size >= crop {
        ((size - crop) / 2) as i64
    } else {
        -(((crop - size) / 2) as i64)
    }
}
