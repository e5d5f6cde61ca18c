//! Launcher of `cuda/preprocess.cu` on a candle CUDA device.

use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Result, Storage, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{KernelArgs, PreprocessParams};

/// PTX of `cuda/preprocess.cu`, built by `build.rs`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/preprocess.ptx"));
const MODULE: &str = "llamavid_kernels_preprocess";

// SAFETY: `#[repr(C)]`, plain integers, mirrored by `struct PreprocessArgs` (size checked on
// both sides).
unsafe impl DeviceRepr for KernelArgs {}

/// Threads per block: one block per output row, threads over its columns.
fn block_threads(out_width: usize) -> u32 {
    (out_width.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// A frame geometry's weights and normalisation table, uploaded once; runs the kernel on any
/// number of frames of that geometry (same format, size, plane offsets and strides).
pub struct PreprocessPlan {
    device: CudaDevice,
    params: PreprocessParams,
    taps: CudaSlice<i32>,
    table: CudaSlice<f32>,
}

impl PreprocessPlan {
    /// Validates `params` (against a frame large enough for its planes) and uploads the taps
    /// and the normalisation table.
    pub fn new(device: &CudaDevice, params: PreprocessParams) -> Result<Self> {
        let used = params.used_bytes()?;
        params.validate(used.end)?;
        let taps = device.clone_htod(&params.packed_taps())?;
        let table: Vec<f32> = params
            .normalization
            .value_table()
            .iter()
            .flatten()
            .copied()
            .collect();
        let table = device.clone_htod(&table)?;
        Ok(PreprocessPlan {
            device: device.clone(),
            params,
            taps,
            table,
        })
    }

    pub fn params(&self) -> &PreprocessParams {
        &self.params
    }

    /// One frame (`src` = its memory, planes at the plan's offsets) to a `(3, H, W)` tensor of
    /// `dtype` (U8 for the resampled bytes, or F32, F16, BF16 normalised).
    pub fn run(&self, src: &[u8], dtype: DType) -> Result<Tensor> {
        self.run_batch(&[src], dtype)?.squeeze(0)
    }

    /// Several frames to a `(B, 3, H, W)` tensor. Each frame's used bytes are uploaded (and
    /// nothing else), then converted by one launch.
    pub fn run_batch(&self, frames: &[&[u8]], dtype: DType) -> Result<Tensor> {
        let frames: Vec<Source> = frames.iter().map(|&f| Source::Contiguous(f)).collect();
        self.launch(&frames, dtype)
    }

    /// [`Self::run`] for a frame whose planes are separate slices, each starting at its
    /// plane's first byte (a mapped `GstVideoFrame`'s `plane_data`, the model's `FrameView`);
    /// the plan's plane offsets are ignored, its strides used.
    pub fn run_planes(&self, planes: &[&[u8]], dtype: DType) -> Result<Tensor> {
        self.launch(&[Source::Planes(planes)], dtype)?.squeeze(0)
    }

    /// [`Self::run_planes`] for several frames: a `(B, 3, H, W)` tensor.
    pub fn run_planes_batch(&self, frames: &[&[&[u8]]], dtype: DType) -> Result<Tensor> {
        let frames: Vec<Source> = frames.iter().map(|&f| Source::Planes(f)).collect();
        self.launch(&frames, dtype)
    }

    fn launch(&self, frames: &[Source], dtype: DType) -> Result<Tensor> {
        if frames.is_empty() {
            bail!("preprocess: no frames");
        }
        let p = &self.params;
        let len = p.output_len();
        let shape = (frames.len(), 3, p.out_height, p.out_width);
        let storage = match dtype {
            DType::U8 => self.launch_all::<u8>(frames, len, "llamavid_preprocess_u8")?,
            DType::F32 => self.launch_all::<f32>(frames, len, "llamavid_preprocess_f32")?,
            DType::F16 => self.launch_all::<half::f16>(frames, len, "llamavid_preprocess_f16")?,
            DType::BF16 => {
                self.launch_all::<half::bf16>(frames, len, "llamavid_preprocess_bf16")?
            }
            other => bail!("preprocess: unsupported output dtype {other:?}"),
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }

    /// Uploads one frame's used bytes; returns them and the kernel arguments for that layout.
    fn upload(&self, frame: &Source) -> Result<(CudaSlice<u8>, KernelArgs)> {
        match *frame {
            Source::Contiguous(src) => {
                let used = self.params.used_bytes()?;
                if src.len() < used.end {
                    bail!(
                        "preprocess: the frame has {} bytes, its planes need {}",
                        src.len(),
                        used.end
                    );
                }
                let args = self.params.kernel_args(used.start);
                Ok((self.device.clone_htod(&src[used])?, args))
            }
            Source::Planes(planes) => {
                let p = &self.params;
                if planes.len() != p.format.plane_count() {
                    bail!(
                        "preprocess: {:?} needs {} plane(s), got {}",
                        p.format,
                        p.format.plane_count(),
                        planes.len()
                    );
                }
                let (packed, ranges) = p.packed_planes()?;
                for (i, (range, src)) in ranges.iter().zip(planes).enumerate() {
                    if src.len() < range.len() {
                        bail!(
                            "preprocess: plane {i} has {} bytes, needs {}",
                            src.len(),
                            range.len()
                        );
                    }
                }
                let total = ranges.last().map_or(0, |r| r.end);
                // SAFETY: the ranges cover 0..total without gaps; every byte is written below.
                let mut buf = unsafe { self.device.alloc::<u8>(total) }?;
                for (range, src) in ranges.iter().zip(planes) {
                    let mut dst = buf.slice_mut(range.clone());
                    self.device.memcpy_htod(&src[..range.len()], &mut dst)?;
                }
                Ok((buf, packed.kernel_args(0)))
            }
        }
    }

    fn launch_all<T: CudaDType + DeviceRepr>(
        &self,
        frames: &[Source],
        len: usize,
        kernel: &str,
    ) -> Result<CudaStorage> {
        let p = &self.params;
        let func = self.device.get_or_load_custom_func(kernel, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel before it is read.
        let mut out = unsafe { self.device.alloc::<T>(len * frames.len()) }?;
        let cfg = LaunchConfig {
            grid_dim: (p.out_height as u32, 1, 1),
            block_dim: (block_threads(p.out_width), 1, 1),
            shared_mem_bytes: 0,
        };
        for (i, frame) in frames.iter().enumerate() {
            let (src, args) = self.upload(frame)?;
            let mut view = out.slice_mut(i * len..(i + 1) * len);
            let mut builder = func.builder();
            builder.arg(&src);
            builder.arg(&self.taps);
            builder.arg(&self.table);
            builder.arg(&mut view);
            builder.arg(&args);
            // SAFETY: the arguments match the kernel's signature; `validate` (in `new`) checked
            // every index the kernel makes against the planes' extents, and `upload` that the
            // uploaded bytes cover them.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, self.device.clone()))
    }
}

/// Where one frame's bytes are on the host.
enum Source<'a> {
    /// One buffer, planes at the plan's offsets.
    Contiguous(&'a [u8]),
    /// One slice per plane, each from the plane's first byte.
    Planes(&'a [&'a [u8]]),
}

/// One-shot [`PreprocessPlan::run`] (uploads the taps each call: keep a plan for video).
pub fn preprocess(
    device: &CudaDevice,
    params: &PreprocessParams,
    src: &[u8],
    dtype: DType,
) -> Result<Tensor> {
    PreprocessPlan::new(device, params.clone())?.run(src, dtype)
}
