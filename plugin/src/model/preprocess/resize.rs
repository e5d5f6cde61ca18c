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

use std::ops::Range;

use llamavid_kernels::preprocess::{clip8, AxisTaps, HALF};

use super::color::RgbImage;

/// Resizes `src` to `width` × `height` exactly like Pillow's `Image.resize((width, height),
/// Image.BICUBIC)` on an RGB image. An axis whose size does not change is not filtered, as in
/// Pillow, so resizing to the same size is the identity. A zero target size gives an empty image.
pub fn resize_bicubic(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    resize_bicubic_window(src, width, height, 0..width, 0..height)
}

/// The `cols` × `rows` region of [`resize_bicubic`]`(src, width, height)`, computed alone:
/// every output pixel depends only on its own taps, so the region is bit for bit the same as
/// cutting it out of the full resize, at the cost of the region (plus the source rows it reads).
/// This is what keeps a frame of extreme aspect ratio (2048×1 resized to a 224 shortest edge
/// is 458752 pixels wide) from allocating the whole resized image for a 224×224 crop.
pub fn resize_bicubic_window(
    src: &RgbImage,
    width: usize,
    height: usize,
    cols: Range<usize>,
    rows: Range<usize>,
) -> RgbImage {
    let cols = cols.start.min(width)..cols.end.min(width);
    let rows = rows.start.min(height)..rows.end.min(height);
    if cols.is_empty() || rows.is_empty() || src.width == 0 || src.height == 0 {
        return RgbImage {
            width: cols.len(),
            height: rows.len(),
            data: vec![0; cols.len() * rows.len() * 3],
        };
    }
    let vertical =
        (height != src.height).then(|| AxisTaps::bicubic_window(src.height, height, rows.clone()));
    // The source rows the wanted output rows read (Pillow's ybox).
    let (first, last) = match &vertical {
        Some(v) => {
            let n = v.starts.len();
            (v.starts[0], v.starts[n - 1] + v.counts[n - 1])
        }
        None => (rows.start, rows.end),
    };
    // Horizontal pass over those rows, then the vertical pass over that uint8 intermediate
    // with shifted row bounds.
    let temp = if width != src.width {
        let horizontal = AxisTaps::bicubic_window(src.width, width, cols);
        horizontal_pass(src, first, last, &horizontal)
    } else {
        copy_region(src, first..last, cols)
    };
    match &vertical {
        Some(v) => vertical_pass(&temp.data, temp.width, first, v),
        None => temp,
    }
}

/// Rows and columns of `src`, unfiltered.
fn copy_region(src: &RgbImage, rows: Range<usize>, cols: Range<usize>) -> RgbImage {
    let mut data = Vec::with_capacity(rows.len() * cols.len() * 3);
    for y in rows.clone() {
        let row = &src.data[y * src.width * 3..][..src.width * 3];
        data.extend_from_slice(&row[cols.start * 3..cols.end * 3]);
    }
    RgbImage {
        width: cols.len(),
        height: rows.len(),
        data,
    }
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
