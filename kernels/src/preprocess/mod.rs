//! Frame to model input: raw video memory (packed RGB variants, I420, NV12, any stride) to the
//! normalised channel-first pixels the vision tower takes, in one pass per output pixel.
//!
//! Everything the computation depends on is plain data in [`PreprocessParams`], prepared on the
//! host by the caller: the integer YUV coefficients, the integer resampling weights of each
//! axis (Pillow's bicubic, computed by the model's own code), the crop offset and the
//! normalisation. The CPU twin ([`cpu`]) and the CUDA kernel (`cuda/preprocess.cu`) consume
//! exactly these numbers, so they agree bit for bit; the twin is tested against the model's CPU
//! preprocessing.
//!
//! The arithmetic, per output pixel `(x, y)` of the `out_width × out_height` result:
//!
//! 1. `(rx, ry) = (crop_left + x, crop_top + y)` is the pixel of the resized image under it; when
//!    it falls outside the resized image (a crop larger than the image) the value is 0.
//! 2. For each vertical tap `j` of row `ry` (source row `sy = vertical.starts[ry] + j`): the
//!    horizontal pass value `h = clip8(HALF + Σ_i rgb(sx_i, sy) · wh_i)` with
//!    `sx_i = horizontal.starts[rx] + i`, a uint8 exactly like Pillow's intermediate image.
//! 3. `v = clip8(HALF + Σ_j h_j · wv_j)`, the uint8 resized pixel.
//! 4. The output is `table[c][v]` (see [`Normalization::value_table`]), channel-first.
//!
//! `rgb(sx, sy)` is the source pixel converted to RGB: a byte pick for packed formats, the
//! fixed-point [`YuvCoefficients`] conversion for 4:2:0 formats (chroma replicated over 2×2 blocks).
//! `clip8(a) = clamp(a >> 22, 0, 255)` with an arithmetic shift, `HALF = 1 << 21`; every sum is
//! an `i32`. Computing the horizontal value per vertical tap (instead of once per source row)
//! changes nothing in the result: each is the same deterministic integer function.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod format;
mod taps;
mod yuv;

use candle_core::{bail, Result};

pub use format::PixelFormat;
pub use taps::{centre_crop_offset, clip8, AxisTaps, HALF, PRECISION_BITS};
pub use yuv::{YuvCoefficients, YuvMatrix, YuvRange, YuvToRgb};

/// Where one plane starts in the frame's memory and how far apart its rows are, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Plane {
    pub offset: usize,
    pub stride: usize,
}

/// Rescale then mean/std normalisation, with numpy's arithmetic: `x * rescale` in f64 rounded
/// to f32, then `(v - mean[c]) / std[c]` in f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// `None`: the uint8 value itself.
    pub rescale: Option<f64>,
    /// `(mean, std)` per RGB channel; `None`: no normalisation.
    pub mean_std: Option<([f32; 3], [f32; 3])>,
}

impl Normalization {
    /// The normalised value of every uint8, per channel: `table[c][x]`. Both the CPU twin and
    /// the kernel look values up in this table (the kernel gets it uploaded), so the f32 output
    /// is bit-identical by construction.
    pub fn value_table(&self) -> [[f32; 256]; 3] {
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            for (x, out) in row.iter_mut().enumerate() {
                let v = match self.rescale {
                    Some(s) => (x as f64 * s) as f32,
                    None => x as f32,
                };
                *out = match &self.mean_std {
                    Some((mean, std)) => (v - mean[c]) / std[c],
                    None => v,
                };
            }
        }
        table
    }
}

/// Everything one frame's preprocessing depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessParams {
    pub format: PixelFormat,
    /// Source frame size in pixels.
    pub width: usize,
    pub height: usize,
    /// One entry per plane of `format`: offsets into the frame's memory and strides.
    pub planes: Vec<Plane>,
    /// Used for YUV formats only.
    pub yuv: YuvCoefficients,
    /// Source width → resized width.
    pub horizontal: AxisTaps,
    /// Source height → resized height.
    pub vertical: AxisTaps,
    /// Resized-image column and row under output pixel (0, 0); negative when the crop is
    /// larger than the resized image (the outside is value 0).
    pub crop_left: i64,
    pub crop_top: i64,
    /// Output size (the crop size).
    pub out_width: usize,
    pub out_height: usize,
    pub normalization: Normalization,
}

impl PreprocessParams {
    /// Resized width and height.
    pub fn resized_size(&self) -> (usize, usize) {
        (self.horizontal.out_size(), self.vertical.out_size())
    }

    /// Number of output values (3 × out_height × out_width).
    pub fn output_len(&self) -> usize {
        3 * self.out_height * self.out_width
    }

    /// The byte range of the frame's memory the planes use: what has to be uploaded.
    pub fn used_bytes(&self) -> Result<std::ops::Range<usize>> {
        let mut lo = usize::MAX;
        let mut hi = 0;
        for (i, p) in self.planes.iter().enumerate() {
            let end = self
                .plane_len(i)?
                .checked_add(p.offset)
                .ok_or_else(|| candle_core::Error::Msg(format!("plane {i}: size overflows")))?;
            lo = lo.min(p.offset);
            hi = hi.max(end);
        }
        if self.planes.is_empty() {
            bail!("{:?} frame without planes", self.format);
        }
        Ok(lo..hi)
    }

    /// Bytes plane `i` needs from its first byte: `stride * (rows - 1) + row bytes`.
    pub fn plane_len(&self, i: usize) -> Result<usize> {
        let (row_bytes, rows) = self.format.plane_extent(i, self.width, self.height);
        if rows == 0 || row_bytes == 0 {
            bail!(
                "{:?} frame has an empty size {}x{}",
                self.format,
                self.width,
                self.height
            );
        }
        let stride = self.planes.get(i).map_or(row_bytes, |p| p.stride);
        stride
            .checked_mul(rows - 1)
            .and_then(|n| n.checked_add(row_bytes))
            .ok_or_else(|| candle_core::Error::Msg(format!("plane {i}: size overflows")))
    }

    /// The same frame with its planes packed one after another, without gaps, and the byte
    /// range of each plane in that layout: how separately mapped planes are laid out for the
    /// twin and the kernel.
    pub fn packed_planes(&self) -> Result<(PreprocessParams, Vec<std::ops::Range<usize>>)> {
        let mut packed = self.clone();
        let mut ranges = Vec::with_capacity(self.planes.len());
        let mut end = 0usize;
        for (i, plane) in packed.planes.iter_mut().enumerate() {
            let len = self.plane_len(i)?;
            plane.offset = end;
            ranges.push(end..end + len);
            end = end
                .checked_add(len)
                .ok_or_else(|| candle_core::Error::Msg("frame size overflows".into()))?;
        }
        Ok((packed, ranges))
    }

    /// Copies separate plane slices (each starting at its plane's first byte, like the planes
    /// of a mapped `GstVideoFrame` or the model's `FrameView`; the offsets in `self` are
    /// ignored) into one buffer in the [`Self::packed_planes`] layout.
    pub fn pack_planes(&self, planes: &[&[u8]]) -> Result<(PreprocessParams, Vec<u8>)> {
        if planes.len() != self.format.plane_count() {
            bail!(
                "{:?} needs {} plane(s), got {}",
                self.format,
                self.format.plane_count(),
                planes.len()
            );
        }
        let (packed, ranges) = self.packed_planes()?;
        let mut data = vec![0u8; ranges.last().map_or(0, |r| r.end)];
        for (i, (range, src)) in ranges.iter().zip(planes).enumerate() {
            if src.len() < range.len() {
                bail!("plane {i}: {} bytes, needs {}", src.len(), range.len());
            }
            data[range.clone()].copy_from_slice(&src[..range.len()]);
        }
        packed.validate(data.len())?;
        Ok((packed, data))
    }

    /// Checks every index the computation will make against a frame of `src_len` bytes, so the
    /// twin cannot panic and the kernel cannot read out of bounds.
    pub fn validate(&self, src_len: usize) -> Result<()> {
        let fmt = self.format;
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || w > (i32::MAX as usize) / 4 || h > i32::MAX as usize {
            bail!("{fmt:?} frame size {w}x{h} is empty or too large");
        }
        if self.planes.len() != fmt.plane_count() {
            bail!(
                "{fmt:?} needs {} plane(s), got {}",
                fmt.plane_count(),
                self.planes.len()
            );
        }
        for (i, p) in self.planes.iter().enumerate() {
            let (row_bytes, _) = fmt.plane_extent(i, w, h);
            if p.stride < row_bytes {
                bail!(
                    "{fmt:?} {w}x{h} plane {i}: stride {} < row of {row_bytes} bytes",
                    p.stride
                );
            }
            if p.stride > i64::MAX as usize || p.offset > i64::MAX as usize {
                bail!("{fmt:?} plane {i}: stride or offset too large");
            }
        }
        let used = self.used_bytes()?;
        if used.end > src_len {
            bail!(
                "{fmt:?} {w}x{h}: planes need {} bytes, the frame has {src_len}",
                used.end
            );
        }
        if self.horizontal.in_size != w || self.vertical.in_size != h {
            bail!(
                "taps are for a {}x{} source, the frame is {w}x{h}",
                self.horizontal.in_size,
                self.vertical.in_size
            );
        }
        self.horizontal.validate("horizontal")?;
        self.vertical.validate("vertical")?;
        let lim = i32::MAX as i64 / 2;
        if self.out_width == 0
            || self.out_height == 0
            || self.out_width as i64 > lim
            || self.out_height as i64 > lim
            || self.crop_left.abs() > lim
            || self.crop_top.abs() > lim
            || self.output_len() > i32::MAX as usize
        {
            bail!(
                "output {}x{} at ({}, {}) is empty or too large",
                self.out_width,
                self.out_height,
                self.crop_left,
                self.crop_top
            );
        }
        Ok(())
    }

    /// The scalar arguments of the kernel for a frame whose used bytes start at `base` of the
    /// uploaded memory (see [`Self::used_bytes`]), with the taps laid out as in
    /// [`Self::packed_taps`]. Call [`Self::validate`] first.
    pub fn kernel_args(&self, base: usize) -> KernelArgs {
        let mut plane_offset = [0i64; 3];
        let mut plane_stride = [0i64; 3];
        for (i, p) in self.planes.iter().enumerate() {
            plane_offset[i] = (p.offset - base) as i64;
            plane_stride[i] = p.stride as i64;
        }
        let (rw, rh) = self.resized_size();
        let h = &self.horizontal;
        let v = &self.vertical;
        let h_starts = 0;
        let h_counts = h_starts + rw;
        let h_weights = h_counts + rw;
        let v_starts = h_weights + h.weights.len();
        let v_counts = v_starts + rh;
        let v_weights = v_counts + rh;
        KernelArgs {
            plane_offset,
            plane_stride,
            format: self.format as i32,
            width: self.width as i32,
            height: self.height as i32,
            yuv: self.yuv,
            resized_width: rw as i32,
            resized_height: rh as i32,
            crop_left: self.crop_left as i32,
            crop_top: self.crop_top as i32,
            out_width: self.out_width as i32,
            out_height: self.out_height as i32,
            h_ksize: h.ksize as i32,
            v_ksize: v.ksize as i32,
            h_starts: h_starts as i32,
            h_counts: h_counts as i32,
            h_weights: h_weights as i32,
            v_starts: v_starts as i32,
            v_counts: v_counts as i32,
            v_weights: v_weights as i32,
            reserved: 0,
        }
    }

    /// Both axes' taps in one `i32` array, the layout [`KernelArgs`] indexes: horizontal
    /// starts, counts, weights, then vertical starts, counts, weights.
    pub fn packed_taps(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for axis in [&self.horizontal, &self.vertical] {
            out.extend(axis.starts.iter().map(|&s| s as i32));
            out.extend(axis.counts.iter().map(|&c| c as i32));
            out.extend_from_slice(&axis.weights);
        }
        out
    }
}

/// The kernel's by-value parameter block, mirrored by `struct PreprocessArgs` in
/// `cuda/preprocess.cu` (144 bytes, checked on both sides).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelArgs {
    /// Byte offsets of the planes in the uploaded memory, and their strides.
    pub plane_offset: [i64; 3],
    pub plane_stride: [i64; 3],
    pub format: i32,
    pub width: i32,
    pub height: i32,
    pub yuv: YuvCoefficients,
    pub resized_width: i32,
    pub resized_height: i32,
    pub crop_left: i32,
    pub crop_top: i32,
    pub out_width: i32,
    pub out_height: i32,
    pub h_ksize: i32,
    pub v_ksize: i32,
    /// Element offsets of the six tap arrays in the packed taps buffer.
    pub h_starts: i32,
    pub h_counts: i32,
    pub h_weights: i32,
    pub v_starts: i32,
    pub v_counts: i32,
    pub v_weights: i32,
    pub reserved: i32,
}

const _: () = assert!(std::mem::size_of::<KernelArgs>() == 144);
const _: () = assert!(std::mem::align_of::<KernelArgs>() == 8);
const _: () = assert!(std::mem::size_of::<YuvCoefficients>() == 24);
