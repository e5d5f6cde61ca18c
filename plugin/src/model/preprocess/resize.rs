//! Pillow-exact antialiased bicubic resize of packed RGB24 images.
//!
//! The reference preprocessing calls `PIL.Image.resize(size, BICUBIC)` on uint8 frames. A ±1
//! step in any output byte costs about 0.015 after CLIP normalisation, so "some bicubic" is not
//! enough: this is Pillow's `ImagingResample` (`src/libImaging/Resample.c`) step for step, with
//! the per-axis integer weights of [`AxisTaps`] (the kernels crate's, which the GPU kernel and
//! its CPU twin use too) and a uint8 intermediate between the horizontal and the vertical pass.
//!
//! The pass order is that of every Pillow before 12.2, i.e. of the reference's era: horizontal,
//! then vertical. Pillow 12.2 started filtering images taller than 100× their width vertically
//! first, and Pillow 13 picks the order by size; on those shapes a few bytes differ by 1–25.

use llamavid_kernels::preprocess::{clip8, AxisTaps, HALF};

use super::color::RgbImage;

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
    let vertical = AxisTaps::bicubic(src.height, height);
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
    let horizontal = AxisTaps::bicubic(src.width, width);
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
fn horizontal_pass(src: &RgbImage, first: usize, last: usize, coeffs: &AxisTaps) -> RgbImage {
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
fn vertical_pass(src: &[u8], width: usize, row_offset: usize, coeffs: &AxisTaps) -> RgbImage {
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
