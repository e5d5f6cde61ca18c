//! The pixel formats a frame may come in: one definition for the model's CPU path, the CPU
//! twin and the CUDA kernel.

/// Pixel layouts accepted from the video pipeline (GStreamer names). The discriminants are
/// the values the CUDA kernel sees (`cuda/preprocess.cu`).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// One plane, 3 bytes per pixel: R, G, B.
    Rgb = 0,
    /// One plane, 4 bytes per pixel: R, G, B, padding.
    Rgbx = 1,
    /// One plane, 4 bytes per pixel: B, G, R, padding.
    Bgrx = 2,
    /// One plane, 4 bytes per pixel: R, G, B, alpha (ignored).
    Rgba = 3,
    /// One plane, 4 bytes per pixel: B, G, R, alpha (ignored).
    Bgra = 4,
    /// Three planes: Y (w × h), U and V (⌈w/2⌉ × ⌈h/2⌉ each).
    I420 = 5,
    /// Two planes: Y (w × h), interleaved UV (⌈w/2⌉ pairs × ⌈h/2⌉ rows).
    Nv12 = 6,
}

impl PixelFormat {
    pub const ALL: [PixelFormat; 7] = [
        PixelFormat::Rgb,
        PixelFormat::Rgbx,
        PixelFormat::Bgrx,
        PixelFormat::Rgba,
        PixelFormat::Bgra,
        PixelFormat::I420,
        PixelFormat::Nv12,
    ];

    /// Where R, G and B sit inside a pixel of a packed format, and its bytes per pixel;
    /// `None` for the YUV formats.
    pub fn packed_layout(self) -> Option<(usize, [usize; 3])> {
        match self {
            PixelFormat::Rgb => Some((3, [0, 1, 2])),
            PixelFormat::Rgbx | PixelFormat::Rgba => Some((4, [0, 1, 2])),
            PixelFormat::Bgrx | PixelFormat::Bgra => Some((4, [2, 1, 0])),
            PixelFormat::I420 | PixelFormat::Nv12 => None,
        }
    }

    /// Number of planes the format stores.
    pub fn plane_count(self) -> usize {
        match self {
            PixelFormat::I420 => 3,
            PixelFormat::Nv12 => 2,
            _ => 1,
        }
    }

    /// Whether the format carries luma/chroma samples that need a [`super::YuvToRgb`]
    /// conversion.
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
