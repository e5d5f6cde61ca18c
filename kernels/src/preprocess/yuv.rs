//! Y'CbCr to R'G'B' in fixed point: the matrices and ranges, and the integer coefficients
//! every path (the model's CPU conversion, the CPU twin, the CUDA kernel) computes with.

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

/// Fixed-point Y'CbCr → R'G'B' coefficients, scaled by `1 << YuvCoefficients::SHIFT`. The
/// kernel takes this struct by value (`#[repr(C)]`, mirrored in `cuda/preprocess.cu`).
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
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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
