//! Raw video memory in, tightly packed RGB24 out.
//!
//! The vision tower was trained on RGB frames decoded by `decord`, so every format a GStreamer
//! pipeline may hand us is turned into plain RGB24 first. The YUV path uses fixed-point integer
//! arithmetic only: a GPU kernel given the same [`YuvCoefficients`] reproduces it bit for bit.

pub use llamavid_kernels::preprocess::{
    PixelFormat, YuvCoefficients, YuvMatrix, YuvRange, YuvToRgb,
};

use crate::model::error::{ModelError, Result};

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
        match (self.format.packed_layout(), self.format) {
            (Some((bpp, order)), _) => self.copy_packed(&mut data, bpp, order),
            (None, PixelFormat::I420) => self.convert_yuv420(&mut data, ChromaLayout::Planar),
            (None, _) => self.convert_yuv420(&mut data, ChromaLayout::Interleaved),
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
