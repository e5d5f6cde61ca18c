//! Raw video memory in, tightly packed RGB24 out.
//!
//! The vision tower was trained on RGB frames decoded by `decord`, so every format a GStreamer
//! pipeline may hand us is turned into plain RGB24 first. The YUV path uses fixed-point integer
//! arithmetic only: a GPU kernel given the same [`YuvCoefficients`] reproduces it bit for bit.

use crate::model::error::{ModelError, Result};

/// Pixel layouts accepted from the video pipeline (GStreamer names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// One plane, 3 bytes per pixel: R, G, B.
    Rgb,
    /// One plane, 4 bytes per pixel: R, G, B, padding.
    Rgbx,
    /// One plane, 4 bytes per pixel: B, G, R, padding.
    Bgrx,
    /// One plane, 4 bytes per pixel: R, G, B, alpha (ignored).
    Rgba,
    /// One plane, 4 bytes per pixel: B, G, R, alpha (ignored).
    Bgra,
    /// Three planes: Y (w × h), U and V (⌈w/2⌉ × ⌈h/2⌉ each).
    I420,
    /// Two planes: Y (w × h), interleaved UV (⌈w/2⌉ pairs × ⌈h/2⌉ rows).
    Nv12,
}

impl PixelFormat {
    /// Number of planes the format stores.
    pub fn plane_count(self) -> usize {
        match self {
            PixelFormat::I420 => 3,
            PixelFormat::Nv12 => 2,
            _ => 1,
        }
    }

    /// Whether the format carries luma/chroma samples that need a [`YuvToRgb`] conversion.
    pub fn is_yuv(self) -> bool {
        matches!(self, PixelFormat::I420 | PixelFormat::Nv12)
    }

    /// Bytes used by one row of plane `plane` and the number of rows it has, for a frame of
    /// `width` × `height` pixels. Chroma planes round odd sizes up, as GStreamer does.
    pub fn plane_extent(self, plane: usize, width: usize, height: usize) -> (usize, usize) {
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        match (self, plane) {
            (PixelFormat::Rgb, _) => (width * 3, height),
            (PixelFormat::Rgbx | PixelFormat::Bgrx | PixelFormat::Rgba | PixelFormat::Bgra, _) => {
                (width * 4, height)
            }
            (PixelFormat::I420 | PixelFormat::Nv12, 0) => (width, height),
            (PixelFormat::I420, _) => (cw, ch),
            (PixelFormat::Nv12, _) => (cw * 2, ch),
        }
    }
}

/// The matrix that maps Y'CbCr to R'G'B'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum YuvMatrix {
    /// ITU-R BT.601 (SD video).
    Bt601,
    /// ITU-R BT.709 (HD video).
    Bt709,
    /// ITU-R BT.2020 non-constant luminance (UHD video).
    Bt2020,
}

impl YuvMatrix {
    /// The matrix GStreamer assumes when caps carry no colorimetry (`set_default_colorimetry` in
    /// gst-plugins-base `video-info.c`): BT.2020 from 2160 rows, BT.709 above 576 rows, else
    /// BT.601. Following it keeps our colours identical to what `videoconvert` would produce.
    pub fn default_for_height(height: usize) -> Self {
        if height >= 2160 {
            YuvMatrix::Bt2020
        } else if height > 576 {
            YuvMatrix::Bt709
        } else {
            YuvMatrix::Bt601
        }
    }

    /// Luma weights (Kr, Kb) of the matrix; Kg = 1 - Kr - Kb.
    const fn kr_kb(self) -> (f64, f64) {
        match self {
            YuvMatrix::Bt601 => (0.299, 0.114),
            YuvMatrix::Bt709 => (0.2126, 0.0722),
            YuvMatrix::Bt2020 => (0.2627, 0.0593),
        }
    }
}

/// Quantisation range of the Y'CbCr samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum YuvRange {
    /// Y in 16..=235, Cb/Cr in 16..=240 ("TV" range): the default for YUV video.
    #[default]
    Limited,
    /// Y, Cb and Cr in 0..=255 ("PC"/JPEG range), e.g. from `jpegdec`.
    Full,
}

/// How YUV frames are turned into RGB. Ignored for RGB formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct YuvToRgb {
    pub matrix: YuvMatrix,
    pub range: YuvRange,
}

impl YuvToRgb {
    /// GStreamer's default colorimetry for a frame of this height: limited range, matrix from
    /// [`YuvMatrix::default_for_height`].
    pub fn default_for_height(height: usize) -> Self {
        YuvToRgb {
            matrix: YuvMatrix::default_for_height(height),
            range: YuvRange::Limited,
        }
    }

    /// The integer coefficients both the CPU path and a GPU twin must use.
    pub fn coefficients(self) -> YuvCoefficients {
        YuvCoefficients::new(self.matrix, self.range)
    }
}

/// Fixed-point Y'CbCr → R'G'B' coefficients, scaled by `1 << YuvCoefficients::SHIFT`.
///
/// With `y = Y - y_offset`, `u = Cb - 128`, `v = Cr - 128` and `half = 1 << (SHIFT - 1)`:
///
/// ```text
/// R = clamp((y_gain*y           + r_v*v + half) >> SHIFT, 0, 255)
/// G = clamp((y_gain*y - g_u*u   - g_v*v + half) >> SHIFT, 0, 255)
/// B = clamp((y_gain*y + b_u*u           + half) >> SHIFT, 0, 255)
/// ```
///
/// `>>` is an arithmetic (flooring) shift; every intermediate fits in `i32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct YuvCoefficients {
    pub y_offset: i32,
    pub y_gain: i32,
    pub r_v: i32,
    pub g_u: i32,
    pub g_v: i32,
    pub b_u: i32,
}

impl YuvCoefficients {
    /// Fraction bits of the coefficients. 16 bits keep every result within 0.5 of the exact
    /// real-valued conversion before rounding.
    pub const SHIFT: u32 = 16;

    /// Derives the coefficients from the matrix's luma weights and the range's scale factors,
    /// so the numbers in the table above are reproducible rather than magic.
    pub const fn new(matrix: YuvMatrix, range: YuvRange) -> Self {
        let (kr, kb) = matrix.kr_kb();
        let kg = 1.0 - kr - kb;
        let (y_offset, y_scale, c_scale) = match range {
            YuvRange::Limited => (16, 255.0 / 219.0, 255.0 / 224.0),
            YuvRange::Full => (0, 1.0, 1.0),
        };
        YuvCoefficients {
            y_offset,
            y_gain: to_fixed(y_scale),
            r_v: to_fixed(c_scale * 2.0 * (1.0 - kr)),
            g_u: to_fixed(c_scale * 2.0 * (1.0 - kb) * kb / kg),
            g_v: to_fixed(c_scale * 2.0 * (1.0 - kr) * kr / kg),
            b_u: to_fixed(c_scale * 2.0 * (1.0 - kb)),
        }
    }

    /// Converts one Y'CbCr sample triple to RGB.
    #[inline]
    pub fn convert(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let half = 1i32 << (Self::SHIFT - 1);
        let y = self.y_gain * (i32::from(y) - self.y_offset) + half;
        let u = i32::from(cb) - 128;
        let v = i32::from(cr) - 128;
        [
            clamp_u8((y + self.r_v * v) >> Self::SHIFT),
            clamp_u8((y - self.g_u * u - self.g_v * v) >> Self::SHIFT),
            clamp_u8((y + self.b_u * u) >> Self::SHIFT),
        ]
    }
}

/// Rounds a non-negative real coefficient to the fixed-point grid.
const fn to_fixed(x: f64) -> i32 {
    (x * (1u32 << YuvCoefficients::SHIFT) as f64 + 0.5) as i32
}

#[inline]
fn clamp_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// A tightly packed RGB24 image (row stride = 3 × width).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height` rows of `width` R, G, B triples, no padding.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps packed RGB24 bytes, refusing a buffer whose length does not match the size.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        let expected = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(3))
            .ok_or_else(|| ModelError::InvalidInput(format!("image {width}x{height} too large")))?;
        if data.len() != expected {
            return Err(ModelError::InvalidInput(format!(
                "RGB image {width}x{height} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// An image filled with one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let data = rgb
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// The pixel at column `x`, row `y`. Panics when out of bounds, like slice indexing.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Borrowed raw video memory of one frame: any size, any stride, planes as separate slices.
///
/// This mirrors a mapped `GstVideoFrame` without depending on GStreamer: the element slices each
/// plane out of the buffer and passes the strides it got from the video info.
#[derive(Debug, Clone)]
pub struct FrameView<'a> {
    pub format: PixelFormat,
    pub width: usize,
    pub height: usize,
    /// One slice per plane, starting at the plane's first byte.
    pub planes: Vec<&'a [u8]>,
    /// Bytes from the start of one row to the next, per plane.
    pub strides: Vec<usize>,
    /// Used for YUV formats only.
    pub yuv: YuvToRgb,
}

impl<'a> FrameView<'a> {
    /// A frame with GStreamer's default colorimetry for its height (see [`YuvToRgb`]).
    pub fn new(
        format: PixelFormat,
        width: usize,
        height: usize,
        planes: Vec<&'a [u8]>,
        strides: Vec<usize>,
    ) -> Self {
        FrameView {
            format,
            width,
            height,
            planes,
            strides,
            yuv: YuvToRgb::default_for_height(height),
        }
    }

    /// A tightly packed RGB24 frame, e.g. one decoded by the reference pipeline.
    pub fn packed_rgb(width: usize, height: usize, data: &'a [u8]) -> Self {
        Self::new(PixelFormat::Rgb, width, height, vec![data], vec![width * 3])
    }

    /// Overrides the YUV matrix and range, e.g. from the caps' colorimetry.
    pub fn with_yuv(mut self, yuv: YuvToRgb) -> Self {
        self.yuv = yuv;
        self
    }

    /// Checks that the planes hold every byte the size and strides promise, so conversion can
    /// index without bounds surprises. The last row of a plane need not be padded to the stride.
    pub fn validate(&self) -> Result<()> {
        let fmt = self.format;
        if self.width == 0 || self.height == 0 {
            return Err(invalid(format!(
                "{fmt:?} frame has an empty size {}x{}",
                self.width, self.height
            )));
        }
        let n = fmt.plane_count();
        if self.planes.len() != n || self.strides.len() != n {
            return Err(invalid(format!(
                "{fmt:?} needs {n} plane(s) and {n} stride(s), got {} and {}",
                self.planes.len(),
                self.strides.len()
            )));
        }
        for (i, (plane, &stride)) in self.planes.iter().zip(&self.strides).enumerate() {
            let (row_bytes, rows) = checked_extent(fmt, i, self.width, self.height)?;
            if stride < row_bytes {
                return Err(invalid(format!(
                    "{fmt:?} {}x{} plane {i}: stride {stride} is smaller than a row ({row_bytes} bytes)",
                    self.width, self.height
                )));
            }
            let needed = stride
                .checked_mul(rows - 1)
                .and_then(|n| n.checked_add(row_bytes))
                .ok_or_else(|| invalid(format!("{fmt:?} plane {i}: size overflows")))?;
            if plane.len() < needed {
                return Err(invalid(format!(
                    "{fmt:?} {}x{} plane {i}: {} bytes, needs at least {needed} (stride {stride})",
                    self.width,
                    self.height,
                    plane.len()
                )));
            }
        }
        Ok(())
    }

    /// Converts the frame to packed RGB24 after validating it.
    pub fn to_rgb(&self) -> Result<RgbImage> {
        self.validate()?;
        let (w, h) = (self.width, self.height);
        let mut data = vec![0u8; w * h * 3];
        match self.format {
            PixelFormat::Rgb => self.copy_packed(&mut data, 3, [0, 1, 2]),
            PixelFormat::Rgbx | PixelFormat::Rgba => self.copy_packed(&mut data, 4, [0, 1, 2]),
            PixelFormat::Bgrx | PixelFormat::Bgra => self.copy_packed(&mut data, 4, [2, 1, 0]),
            PixelFormat::I420 => self.convert_yuv420(&mut data, ChromaLayout::Planar),
            PixelFormat::Nv12 => self.convert_yuv420(&mut data, ChromaLayout::Interleaved),
        }
        Ok(RgbImage {
            width: w,
            height: h,
            data,
        })
    }

    /// Packed formats: pick the R, G, B bytes (`order` = their offsets inside a pixel).
    fn copy_packed(&self, out: &mut [u8], bpp: usize, order: [usize; 3]) {
        let (src, stride) = (self.planes[0], self.strides[0]);
        for (y, out_row) in out.chunks_exact_mut(self.width * 3).enumerate() {
            let row = &src[y * stride..y * stride + self.width * bpp];
            for (dst, px) in out_row.chunks_exact_mut(3).zip(row.chunks_exact(bpp)) {
                dst[0] = px[order[0]];
                dst[1] = px[order[1]];
                dst[2] = px[order[2]];
            }
        }
    }

    /// 4:2:0 formats: each chroma sample covers a 2×2 block of luma samples (replicated, no
    /// interpolation; the bicubic downscale that follows smooths far more than this).
    fn convert_yuv420(&self, out: &mut [u8], layout: ChromaLayout) {
        let coeffs = self.yuv.coefficients();
        let (luma, luma_stride) = (self.planes[0], self.strides[0]);
        for (y, out_row) in out.chunks_exact_mut(self.width * 3).enumerate() {
            let luma_row = &luma[y * luma_stride..];
            let cy = y / 2;
            for (x, dst) in out_row.chunks_exact_mut(3).enumerate() {
                let (cb, cr) = match layout {
                    ChromaLayout::Planar => (
                        self.planes[1][cy * self.strides[1] + x / 2],
                        self.planes[2][cy * self.strides[2] + x / 2],
                    ),
                    ChromaLayout::Interleaved => {
                        let i = cy * self.strides[1] + (x / 2) * 2;
                        (self.planes[1][i], self.planes[1][i + 1])
                    }
                };
                dst.copy_from_slice(&coeffs.convert(luma_row[x], cb, cr));
            }
        }
    }
}

#[derive(Clone, Copy)]
enum ChromaLayout {
    /// Separate U and V planes (I420).
    Planar,
    /// One plane of U, V pairs (NV12).
    Interleaved,
}

/// [`PixelFormat::plane_extent`] with overflow checks, for sizes taken from untrusted caps.
fn checked_extent(
    fmt: PixelFormat,
    plane: usize,
    width: usize,
    height: usize,
) -> Result<(usize, usize)> {
    if width.checked_mul(4).is_none() {
        return Err(invalid(format!("{fmt:?} width {width} overflows")));
    }
    Ok(fmt.plane_extent(plane, width, height))
}

fn invalid(msg: String) -> ModelError {
    ModelError::InvalidInput(msg)
}
