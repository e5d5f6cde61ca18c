//! The compute kernels of gst-llamavid: the CPU kernels the model runs on (fused vision and
//! LLaMA layers, matrix products in f32, bf16 and int8, MKL bindings), and the GPU kernels of
//! the two hot spots candle has no single op for, with their CPU twins.
//!
//! * [`cpu`]: the CPU's fused transformer layers and linear-layer products (see its docs).
//!
//! The GPU kernels:
//!
//! * [`preprocess`]: raw video memory (RGB, RGBx, BGRx, RGBA, BGRA, I420, NV12, any stride) to
//!   the normalised channel-first pixels of the vision tower, in one pass per frame: Pillow's
//!   antialiased bicubic resize with its uint8 rounding, centre crop, CLIP normalisation.
//!   Integer-exact: kernel, twin and the model's CPU preprocessing agree bit for bit.
//! * [`compress`]: LLaMA-VID's two-token compression for a batch of frames, fused: the
//!   text-guided single-head attention of the query embeddings over the patch keys, softmax,
//!   mean over queries of the weighted raw patches (context), and the patch mean (content).
//!
//! Each has a CPU twin in plain Rust (`cpu` modules), the tested definition of what the kernel
//! computes. Without the `cuda` feature only the twins are built (no CUDA toolkit needed); with
//! it, `build.rs` compiles `cuda/*.cu` to PTX with nvcc and the `cuda` modules launch them on a
//! candle [`candle_core::CudaDevice`].

pub mod compress;
pub mod cpu;
pub mod preprocess;

pub use compress::{compress, compress_with_scale, default_scale, CompressShape, Pooled};
pub use preprocess::{
    AxisTaps, Normalization, PixelFormat, Plane, PreprocessParams, YuvCoefficients, PRECISION_BITS,
};

#[cfg(feature = "cuda")]
pub use preprocess::cuda::PreprocessPlan;

/// Whether this build carries the CUDA kernels.
pub const HAS_CUDA: bool = cfg!(feature = "cuda");
