//! Frames in, CLIP pixels out: colour conversion, Pillow-exact bicubic resize, crop and
//! normalisation, all integer-exact on the CPU so a GPU twin can reproduce them bit for bit.

pub mod clip;
pub mod color;
pub mod kernel;
pub mod resize;

pub use clip::{ClipPreprocess, Normalize, ResizeTarget, CLIP_MEAN, CLIP_STD};
pub use color::{FrameView, PixelFormat, RgbImage, YuvCoefficients, YuvMatrix, YuvRange, YuvToRgb};
pub use llamavid_kernels::preprocess::{AxisTaps, PRECISION_BITS};
pub use resize::{resize_bicubic, resize_bicubic_window};
