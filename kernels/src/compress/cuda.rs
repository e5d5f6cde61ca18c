//! Launcher of `cuda/compress.cu` on a candle CUDA device.

use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Result, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{CompressShape, Pooled, BLOCK, MAX_SHARED_BYTES};

/// PTX of `cuda/compress.cu`, built by `build.rs`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/compress.ptx"));
const MODULE: &str = "llamavid_kernels_compress";

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("compress: unsupported dtype {other:?} (f32, f16 or bf16)"),
    })
}

fn check_limits(s: CompressShape) -> Result<()> {
    if s.attention_shared_bytes() > MAX_SHARED_BYTES || s.pool_shared_bytes() > MAX_SHARED_BYTES {
        bail!(
            "compress: width {} with {} patches needs {} bytes of shared memory (at most {})",
            s.width,
            s.patches,
            s.attention_shared_bytes(),
            MAX_SHARED_BYTES
        );
    }
    if s.batch > 65_535 {
        bail!("compress: at most 65535 frames per call, got {}", s.batch);
    }
    Ok(())
}

fn wrap<T: CudaDType>(device: &CudaDevice, slice: CudaSlice<T>, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// Runs both kernels on CUDA tensors of one dtype (f32, f16, bf16).
pub fn compress(
    device: &CudaDevice,
    text_queries: &Tensor,
    keys: &Tensor,
    patches: &Tensor,
    shape: CompressShape,
    scale: f32,
) -> Result<Pooled> {
    match text_queries.dtype() {
        DType::F32 => run::<f32>(device, text_queries, keys, patches, shape, scale),
        DType::F16 => run::<half::f16>(device, text_queries, keys, patches, shape, scale),
        DType::BF16 => run::<half::bf16>(device, text_queries, keys, patches, shape, scale),
        other => bail!("compress: unsupported dtype {other:?}"),
    }
}

/// The attention weights alone, `(B, Q, N)` f32: the first kernel's output, for checking it
/// against [`super::cpu::attention`].
pub fn attention(
    device: &CudaDevice,
    text_queries: &Tensor,
    keys: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let s = CompressShape::of(text_queries, keys, keys)?;
    if keys.dtype() != text_queries.dtype() {
        bail!("compress: dtypes differ");
    }
    match text_queries.dtype() {
        DType::F32 => attention_t::<f32>(device, text_queries, keys, s, scale),
        DType::F16 => attention_t::<half::f16>(device, text_queries, keys, s, scale),
        DType::BF16 => attention_t::<half::bf16>(device, text_queries, keys, s, scale),
        other => bail!("compress: unsupported dtype {other:?}"),
    }
}

fn attention_t<T: CudaDType + DeviceRepr>(
    device: &CudaDevice,
    text_queries: &Tensor,
    keys: &Tensor,
    s: CompressShape,
    scale: f32,
) -> Result<Tensor> {
    check_limits(s)?;
    let text_queries = text_queries.contiguous()?;
    let keys = keys.contiguous()?;
    let (tq_storage, tq_layout) = text_queries.storage_and_layout();
    let (k_storage, k_layout) = keys.storage_and_layout();
    let tq = device_view::<T>(&tq_storage, tq_layout, s.batch * s.queries * s.width)?;
    let k = device_view::<T>(&k_storage, k_layout, s.batch * s.patches * s.width)?;
    let attn = launch_attention(device, &tq, &k, s, scale, suffix(text_queries.dtype())?)?;
    Ok(wrap(device, attn, &[s.batch, s.queries, s.patches]))
}

/// The contiguous device elements of a tensor's storage.
fn device_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
    len: usize,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(storage) = storage else {
        bail!("compress: inputs must be on a CUDA device");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("compress: input is not contiguous");
    };
    if end - start != len {
        bail!(
            "compress: expected {len} elements, the tensor has {}",
            end - start
        );
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

fn launch_attention<T: CudaDType + DeviceRepr>(
    device: &CudaDevice,
    tq: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
    s: CompressShape,
    scale: f32,
    suffix: &str,
) -> Result<CudaSlice<f32>> {
    let (q_i, n_i, w_i) = (s.queries as i32, s.patches as i32, s.width as i32);
    // SAFETY: the kernel writes every element (one block per (q, b), all n).
    let mut attn = unsafe { device.alloc::<f32>(s.batch * s.queries * s.patches) }?;
    let func = device.get_or_load_custom_func(
        &format!("llamavid_compress_attention_{suffix}"),
        MODULE,
        PTX,
    )?;
    let cfg = LaunchConfig {
        grid_dim: (s.queries as u32, s.batch as u32, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: s.attention_shared_bytes() as u32,
    };
    let mut b = func.builder();
    b.arg(tq);
    b.arg(k);
    b.arg(&mut attn);
    b.arg(&q_i);
    b.arg(&n_i);
    b.arg(&w_i);
    b.arg(&scale);
    // SAFETY: arguments match `llamavid_compress_attention_*`; `CompressShape::of` and
    // `check_limits` bound every index and the shared memory.
    unsafe { b.launch(cfg) }.w()?;
    Ok(attn)
}

fn run<T: CudaDType + DeviceRepr>(
    device: &CudaDevice,
    text_queries: &Tensor,
    keys: &Tensor,
    patches: &Tensor,
    s: CompressShape,
    scale: f32,
) -> Result<Pooled> {
    check_limits(s)?;
    let suffix = suffix(text_queries.dtype())?;
    let text_queries = text_queries.contiguous()?;
    let keys = keys.contiguous()?;
    let patches = patches.contiguous()?;
    let (tq_storage, tq_layout) = text_queries.storage_and_layout();
    let (k_storage, k_layout) = keys.storage_and_layout();
    let (v_storage, v_layout) = patches.storage_and_layout();
    let tq = device_view::<T>(&tq_storage, tq_layout, s.batch * s.queries * s.width)?;
    let k = device_view::<T>(&k_storage, k_layout, s.batch * s.patches * s.width)?;
    let v = device_view::<T>(&v_storage, v_layout, s.batch * s.patches * s.width)?;

    let attn = launch_attention(device, &tq, &k, s, scale, suffix)?;

    let (q_i, n_i, w_i) = (s.queries as i32, s.patches as i32, s.width as i32);
    // SAFETY: the pooling kernel writes every element (one thread per (b, w)).
    let mut context = unsafe { device.alloc::<T>(s.batch * s.width) }?;
    let mut content = unsafe { device.alloc::<T>(s.batch * s.width) }?;
    let func =
        device.get_or_load_custom_func(&format!("llamavid_compress_pool_{suffix}"), MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (s.width.div_ceil(BLOCK) as u32, s.batch as u32, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: s.pool_shared_bytes() as u32,
    };
    let mut b = func.builder();
    b.arg(&attn);
    b.arg(&v);
    b.arg(&mut context);
    b.arg(&mut content);
    b.arg(&q_i);
    b.arg(&n_i);
    b.arg(&w_i);
    // SAFETY: arguments match `llamavid_compress_pool_*`; sizes checked above.
    unsafe { b.launch(cfg) }.w()?;

    Ok(Pooled {
        context: wrap(device, context, &[s.batch, s.width]),
        content: wrap(device, content, &[s.batch, s.width]),
    })
}
