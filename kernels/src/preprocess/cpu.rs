//! The CPU twin of `cuda/preprocess.cu`: the definition of what the kernel computes, written
//! the way the kernel is organised (one output row per block, one output pixel per thread, the
//! horizontal value recomputed for each vertical tap).

use candle_core::Result;

use super::{clip8, PixelFormat, PreprocessParams, HALF};

/// The RGB value of source pixel (x, y). `p` has been validated against `src`.
#[inline]
fn fetch(p: &PreprocessParams, src: &[u8], x: usize, y: usize) -> [u8; 3] {
    let plane = |i: usize| p.planes[i];
    match p.format.packed_layout() {
        Some((bpp, order)) => {
            let i = plane(0).offset + y * plane(0).stride + x * bpp;
            [src[i + order[0]], src[i + order[1]], src[i + order[2]]]
        }
        None => {
            let luma = src[plane(0).offset + y * plane(0).stride + x];
            let (cx, cy) = (x / 2, y / 2);
            let (cb, cr) = if p.format == PixelFormat::I420 {
                (
                    src[plane(1).offset + cy * plane(1).stride + cx],
                    src[plane(2).offset + cy * plane(2).stride + cx],
                )
            } else {
                let i = plane(1).offset + cy * plane(1).stride + cx * 2;
                (src[i], src[i + 1])
            };
            p.yuv.convert(luma, cb, cr)
        }
    }
}

/// The uint8 resized pixel under output pixel (x, y), 0 outside the resized image.
#[inline]
fn output_pixel(p: &PreprocessParams, src: &[u8], x: usize, y: usize) -> [u8; 3] {
    let (rw, rh) = p.resized_size();
    let rx = p.crop_left + x as i64;
    let ry = p.crop_top + y as i64;
    if rx < 0 || ry < 0 || rx >= rw as i64 || ry >= rh as i64 {
        return [0; 3];
    }
    let (hstart, hw) = p.horizontal.taps(rx as usize);
    let (vstart, vw) = p.vertical.taps(ry as usize);
    let mut acc = [HALF; 3];
    for (j, &wv) in vw.iter().enumerate() {
        let sy = vstart + j;
        // Pass 1: the horizontal value of source row `sy` at column `rx` (uint8).
        let mut h = [HALF; 3];
        for (i, &wh) in hw.iter().enumerate() {
            let px = fetch(p, src, hstart + i, sy);
            for c in 0..3 {
                h[c] += i32::from(px[c]) * wh;
            }
        }
        // Pass 2: vertical accumulation over the uint8 intermediate.
        for c in 0..3 {
            acc[c] += i32::from(clip8(h[c])) * wv;
        }
    }
    acc.map(clip8)
}

/// The resized and cropped uint8 image, channel-first `(3, out_height, out_width)`: the
/// kernel's `u8` output.
pub fn resample_u8(p: &PreprocessParams, src: &[u8]) -> Result<Vec<u8>> {
    p.validate(src.len())?;
    let (w, h) = (p.out_width, p.out_height);
    let plane = w * h;
    let mut out = vec![0u8; 3 * plane];
    for y in 0..h {
        for x in 0..w {
            let px = output_pixel(p, src, x, y);
            for c in 0..3 {
                out[c * plane + y * w + x] = px[c];
            }
        }
    }
    Ok(out)
}

/// The normalised pixels, channel-first `(3, out_height, out_width)` f32: the kernel's `f32`
/// output and the model's `ClipPreprocess::pixels`.
pub fn preprocess(p: &PreprocessParams, src: &[u8]) -> Result<Vec<f32>> {
    let bytes = resample_u8(p, src)?;
    Ok(normalize(p, &bytes))
}

/// Looks up a channel-first uint8 image in the normalisation table.
pub fn normalize(p: &PreprocessParams, chw: &[u8]) -> Vec<f32> {
    let table = p.normalization.value_table();
    let plane = p.out_width * p.out_height;
    chw.iter()
        .enumerate()
        .map(|(i, &v)| table[(i / plane).min(2)][usize::from(v)])
        .collect()
}

/// [`resample_u8`] for separately mapped planes (see [`PreprocessParams::pack_planes`]).
pub fn resample_u8_planes(p: &PreprocessParams, planes: &[&[u8]]) -> Result<Vec<u8>> {
    let (packed, data) = p.pack_planes(planes)?;
    resample_u8(&packed, &data)
}

/// [`preprocess`] for separately mapped planes (see [`PreprocessParams::pack_planes`]).
pub fn preprocess_planes(p: &PreprocessParams, planes: &[&[u8]]) -> Result<Vec<f32>> {
    let (packed, data) = p.pack_planes(planes)?;
    preprocess(&packed, &data)
}
