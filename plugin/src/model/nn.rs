//! The layers every module builds from. `Linear` is ours rather than candle's so that the
//! matrix products, where nearly all the time goes, have one place to choose how they run:
//! candle's gemm in f32 (the exact mode, and the only one on GPUs), or the reduced-precision
//! CPU kernels of [`llamavid_kernels::cpu`] (bf16 or int8 weights, see [`Precision`]).
//!
//! The precision is chosen when the model loads: `LlamaVid::load` opens a [`PrecisionScope`]
//! around the construction of its modules, and every `Linear` built inside it converts its
//! weights once, dropping the f32 copy, so peak memory stays at the reduced size.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;

use llamavid_kernels::cpu::{self, CpuFeatures, CpuLinear};

/// Arithmetic of the linear layers (everything else stays f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 weights and products: the exact mode (matches the reference to ~1e-6).
    #[default]
    F32,
    /// bf16 weights and activations, f32 accumulation (AMX through MKL).
    Bf16,
    /// int8 weights per output channel, int8 activations per row, i32 accumulation.
    Int8,
    /// The fastest mode this build and CPU run well: bf16 with AMX and MKL, else f32.
    Auto,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Self::F32, Self::Bf16, Self::Int8, Self::Auto];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Auto => "auto",
        }
    }

    /// The concrete precision to run on `device`, and a sentence when the request could not
    /// be honoured as asked (to show the user).
    pub fn resolve(self, device: &Device) -> (Precision, Option<String>) {
        let cpu = CpuFeatures::get();
        let kernels = cpu.avx512f && cpu.avx512bw && cpu.avx512_bf16 && cpu.avx512_vnni;
        let fast = cpu.reduced_precision() && cpu::HAS_MKL;
        match self {
            Self::F32 => (Self::F32, None),
            _ if !device.is_cpu() => (
                Self::F32,
                (self != Self::Auto).then(|| {
                    format!(
                        "precision {self} applies to CPU inference only; the model runs in f32 \
                         on {device:?}"
                    )
                }),
            ),
            Self::Auto if fast => (Self::Bf16, None),
            Self::Auto => (Self::F32, None),
            Self::Bf16 | Self::Int8 if fast => (self, None),
            Self::Bf16 | Self::Int8 if kernels => (
                self,
                Some(format!(
                    "precision {self}: {}; large products run on the portable AVX-512 kernels \
                     and are slower than f32",
                    if cpu::HAS_MKL {
                        "this CPU has no usable AMX tiles"
                    } else {
                        "this build lacks the `mkl` feature"
                    }
                )),
            ),
            Self::Bf16 | Self::Int8 => (
                Self::F32,
                Some(format!(
                    "precision {self} needs a CPU with AVX-512 BF16 and VNNI (AMX for speed); \
                     running in f32"
                )),
            ),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "int8" | "i8" | "q8" => Ok(Self::Int8),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown precision {other:?} (expected f32, bf16, int8 or auto)"
            )),
        }
    }
}

thread_local! {
    static LOAD_PRECISION: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// While alive, `Linear` layers built on this thread use `precision` (a resolved one: F32,
/// Bf16 or Int8). Restores the previous setting when dropped.
pub struct PrecisionScope {
    previous: Precision,
}

impl PrecisionScope {
    pub fn enter(precision: Precision) -> Self {
        cpu::tune_allocator();
        let precision = if precision == Precision::Auto {
            Precision::F32
        } else {
            precision
        };
        let previous = LOAD_PRECISION.with(|p| p.replace(precision));
        Self { previous }
    }
}

impl Drop for PrecisionScope {
    fn drop(&mut self) {
        LOAD_PRECISION.with(|p| p.set(self.previous));
    }
}

/// The precision `Linear::new` applies on this thread right now.
pub fn load_precision() -> Precision {
    LOAD_PRECISION.with(Cell::get)
}

thread_local! {
    static LOAD_PACK_ROWS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// While alive, f32 `Linear` layers built on this thread keep their weights only in MKL's
/// packed layout, tuned for products of about `rows` rows (feature `mkl`; no effect without
/// it). For layers that only ever see many rows at once, such as the vision tower's (257 per
/// frame): a one-frame encode no longer re-packs 4 GB of weights.
pub struct PackScope {
    previous: Option<usize>,
}

impl PackScope {
    pub fn enter(rows: usize) -> Self {
        let previous = LOAD_PACK_ROWS.with(|p| p.replace(Some(rows)));
        Self { previous }
    }
}

impl Drop for PackScope {
    fn drop(&mut self) {
        LOAD_PACK_ROWS.with(|p| p.set(self.previous));
    }
}

fn load_pack_rows() -> Option<usize> {
    LOAD_PACK_ROWS.with(Cell::get)
}

#[derive(Clone)]
enum Backend {
    Candle(candle_nn::Linear),
    /// Block-quantized weights as a GGUF file stores them (Q4_K, Q8_0, ...), used as they are.
    Quantized(QMatMul),
    Cpu {
        kernel: Arc<CpuLinear>,
        device: Device,
    },
}

/// `y = x · Wᵀ + b` with W stored (out, in) as in PyTorch checkpoints.
#[derive(Clone)]
pub struct Linear {
    backend: Backend,
}

impl fmt::Debug for Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Candle(l) => f
                .debug_struct("Linear")
                .field("weight", &l.weight().shape())
                .field("precision", &"f32")
                .finish(),
            Backend::Quantized(_) => f
                .debug_struct("Linear")
                .field("precision", &"gguf")
                .finish(),
            Backend::Cpu { kernel, .. } => f
                .debug_struct("Linear")
                .field("out", &kernel.out_features())
                .field("in", &kernel.in_features())
                .field("precision", &self.precision().as_str())
                .finish(),
        }
    }
}

impl Linear {
    /// Builds the layer in the precision of the current [`PrecisionScope`] (f32 outside one).
    /// Reduced precision applies to f32 weights on the CPU; anything else stays in candle.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_precision(weight, bias, load_precision())
            .unwrap_or_else(|(weight, bias)| Self::candle(weight, bias))
    }

    /// A layer on weights (out, in) as a GGUF file stores them. Block-quantized ones stay
    /// quantized: on the CPU in our kernels, which compute as ggml does (see
    /// `llamavid_kernels::cpu::quant`), elsewhere (and for Q2_K/Q3_K) in candle's quantized
    /// products; f32/f16/bf16 ones become f32 weights, built as [`Linear::new`] builds them.
    pub fn quantized(weight: Arc<QTensor>) -> Result<Self> {
        use cpu::quant::{BlockType, QuantLinear};
        let block = match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                return Ok(Self::new(weight.dequantize(&weight.device())?, None));
            }
            GgmlDType::Q4_0 => Some(BlockType::Q4_0),
            GgmlDType::Q4_1 => Some(BlockType::Q4_1),
            GgmlDType::Q5_0 => Some(BlockType::Q5_0),
            GgmlDType::Q5_1 => Some(BlockType::Q5_1),
            GgmlDType::Q8_0 => Some(BlockType::Q8_0),
            GgmlDType::Q4K => Some(BlockType::Q4K),
            GgmlDType::Q5K => Some(BlockType::Q5K),
            GgmlDType::Q6K => Some(BlockType::Q6K),
            _ => None,
        };
        let device = weight.device();
        if let (Some(block), true) = (block, device.is_cpu() && !cpu::candle_only()) {
            let (n, k) = weight.shape().dims2()?;
            let kernel = QuantLinear::new(block, n, k, weight.data()?.into_owned())
                .map_err(candle_core::Error::Msg)?;
            return Ok(Self {
                backend: Backend::Cpu {
                    kernel: Arc::new(CpuLinear::Quant(kernel)),
                    device,
                },
            });
        }
        Ok(Self {
            backend: Backend::Quantized(QMatMul::from_arc(weight)?),
        })
    }

    fn candle(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            backend: Backend::Candle(candle_nn::Linear::new(weight, bias)),
        }
    }

    /// Puts the weights in the layout of a CPU kernel; gives them back when none applies
    /// (GPU tensors, non-f32 weights, `LLAMAVID_LINEAR=candle`).
    #[allow(clippy::result_large_err)]
    fn with_precision(
        weight: Tensor,
        bias: Option<Tensor>,
        precision: Precision,
    ) -> std::result::Result<Self, (Tensor, Option<Tensor>)> {
        let applies = !cpu::candle_only()
            && weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && weight.rank() == 2
            && bias
                .as_ref()
                .is_none_or(|b| b.dtype() == DType::F32 && b.rank() == 1);
        if !applies {
            return Err((weight, bias));
        }
        let (n, k) = weight.dims2().expect("rank 2");
        let b = match bias.as_ref().map(|b| b.to_vec1::<f32>()) {
            None => None,
            Some(Ok(b)) if b.len() == n => Some(b),
            Some(_) => return Err((weight, bias)),
        };
        let device = weight.device().clone();
        let kernel = match precision {
            Precision::Bf16 | Precision::Int8 => {
                let w = match weight.flatten_all().and_then(|w| w.to_vec1::<f32>()) {
                    Ok(w) => w,
                    Err(_) => return Err((weight, bias)),
                };
                // The f32 tensor goes now: only the converted copy stays.
                drop(weight);
                drop(bias);
                if precision == Precision::Bf16 {
                    CpuLinear::Bf16(cpu::Bf16Linear::new(&w, n, k, b))
                } else {
                    CpuLinear::Int8(cpu::Int8Linear::new(&w, n, k, b))
                }
            }
            _ => match cpu::F32Linear::new(weight.clone(), b, load_pack_rows()) {
                Ok(l) => CpuLinear::F32(l),
                Err(_) => return Err((weight, bias)),
            },
        };
        Ok(Self {
            backend: Backend::Cpu {
                kernel: Arc::new(kernel),
                device,
            },
        })
    }

    /// The CPU kernel of this layer, when it has one.
    pub fn cpu_kernel(&self) -> Option<&CpuLinear> {
        match &self.backend {
            Backend::Cpu { kernel, .. } => Some(kernel),
            Backend::Candle(_) | Backend::Quantized(_) => None,
        }
    }

    /// The f32 weight (out, in); `None` when the layer holds reduced-precision weights only.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.backend {
            Backend::Candle(l) => Some(l.weight()),
            Backend::Quantized(_) => None,
            Backend::Cpu { kernel, .. } => match &**kernel {
                CpuLinear::F32(l) => l.weight(),
                _ => None,
            },
        }
    }

    /// The f32 bias; `None` without one or in reduced precision.
    pub fn bias(&self) -> Option<&Tensor> {
        match &self.backend {
            Backend::Candle(l) => l.bias(),
            Backend::Cpu { .. } | Backend::Quantized(_) => None,
        }
    }

    /// The arithmetic this layer runs (f32 for GGUF block-quantized weights: see
    /// [`Linear::is_block_quantized`]).
    pub fn precision(&self) -> Precision {
        match &self.backend {
            Backend::Candle(_) | Backend::Quantized(_) => Precision::F32,
            Backend::Cpu { kernel, .. } => match **kernel {
                CpuLinear::Bf16(_) => Precision::Bf16,
                CpuLinear::Int8(_) => Precision::Int8,
                CpuLinear::F32(_) | CpuLinear::Quant(_) => Precision::F32,
            },
        }
    }

    /// Whether the weights are GGUF block-quantized ones.
    pub fn is_block_quantized(&self) -> bool {
        match &self.backend {
            Backend::Quantized(QMatMul::QTensor(_)) => true,
            Backend::Cpu { kernel, .. } => matches!(**kernel, CpuLinear::Quant(_)),
            _ => false,
        }
    }

    /// Bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        match &self.backend {
            Backend::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Backend::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                w.elem_count() * w.dtype().size_in_bytes()
            }
            Backend::Candle(l) => l.weight().elem_count() * l.weight().dtype().size_in_bytes(),
            Backend::Cpu { kernel, .. } => kernel.weight_bytes(),
        }
    }
}

fn cpu_forward(kernel: &CpuLinear, device: &Device, x: &Tensor) -> Result<Tensor> {
    let k = kernel.in_features();
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!(
            "linear layer expects inputs of width {k}, got shape {:?}",
            dims
        );
    }
    let m = x.elem_count() / k;
    let input_dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
    let out = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("reduced-precision linear layers run on the CPU only");
        };
        let data = &storage.as_slice::<f32>()?[layout.start_offset()..][..m * k];
        kernel.forward(data, m)
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = kernel.out_features();
    Tensor::from_vec(out, out_dims, device)?.to_dtype(input_dtype)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Candle(l) => l.forward(x),
            Backend::Quantized(q) => q.forward(x),
            Backend::Cpu { kernel, device } => cpu_forward(kernel, device, x),
        }
    }
}

/// A linear layer with a bias, from `{weight, bias}` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

/// A linear layer without a bias, from `weight` under `vb`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Ok(Linear::new(weight, None))
}

/// The f32 data of a CPU tensor, as a vector (copied once).
fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Runs one pre-LN ViT block (EVA's) on the CPU kernels, fused:
/// `x + attn(norm1(x))` then `x + fc2(gelu_erf(fc1(norm2(x))))`, where `attn` splits `qkv(h)`
/// into `num_heads` heads, scales the scores by `scale`, softmaxes and projects with `proj`.
/// Returns `None` (the caller then runs its candle ops) unless `x` is an f32 CPU tensor
/// (B, N, C) and every linear layer has a CPU kernel. Same arithmetic as the unfused ops up to
/// rounding order (f32), or the layers' reduced precision.
#[allow(clippy::too_many_arguments)]
pub fn fused_vit_block(
    x: &Tensor,
    norm1: &candle_nn::LayerNorm,
    qkv: &Linear,
    proj: &Linear,
    num_heads: usize,
    scale: f64,
    norm2: &candle_nn::LayerNorm,
    fc1: &Linear,
    fc2: &Linear,
) -> Result<Option<Tensor>> {
    let (Some(qkv_k), Some(proj_k), Some(fc1_k), Some(fc2_k)) = (
        qkv.cpu_kernel(),
        proj.cpu_kernel(),
        fc1.cpu_kernel(),
        fc2.cpu_kernel(),
    ) else {
        return Ok(None);
    };
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 3 {
        return Ok(None);
    }
    let (batch, tokens, width) = x.dims3()?;
    if qkv_k.in_features() != width || qkv_k.out_features() != 3 * width || width % num_heads != 0 {
        return Ok(None);
    }
    let (n1w, n2w) = (cpu_f32(norm1.weight())?, cpu_f32(norm2.weight())?);
    let n1b = norm1.bias().map(cpu_f32).transpose()?;
    let n2b = norm2.bias().map(cpu_f32).transpose()?;
    let block = cpu::vit::VitBlock {
        norm1: cpu::vit::Norm {
            weight: &n1w,
            bias: n1b.as_deref(),
            eps: norm1.eps() as f32,
        },
        qkv: qkv_k,
        proj: proj_k,
        norm2: cpu::vit::Norm {
            weight: &n2w,
            bias: n2b.as_deref(),
            eps: norm2.eps() as f32,
        },
        fc1: fc1_k,
        fc2: fc2_k,
        num_heads,
        scale: scale as f32,
    };
    let mut data = cpu_f32(x)?;
    block.forward(&mut data, batch, tokens);
    Ok(Some(Tensor::from_vec(
        data,
        (batch, tokens, width),
        x.device(),
    )?))
}

/// A cache tensor (1, kv_heads, positions, head_dim), possibly a narrowed view, as strides.
fn cache_view<'a>(
    data: &'a [f32],
    layout: &candle_core::Layout,
) -> Option<cpu::llama::CacheView<'a>> {
    let dims = layout.dims();
    let stride = layout.stride();
    if dims.len() != 4 || dims[0] != 1 || stride[3] != 1 {
        return None;
    }
    Some(cpu::llama::CacheView {
        data,
        offset: layout.start_offset(),
        head_stride: stride[1],
        token_stride: stride[2],
        len: dims[2],
    })
}

/// Runs one LLaMA decoder layer on the CPU kernels, fused: `x + o(attn(rope(q, k), v))` over
/// `rmsnorm(x)`, then `x + down(silu(gate(h)) · up(h))` over `rmsnorm(x)`, appending this
/// step's keys and values to `cache` (dimension 2, like `llama.rs`). `cos`/`sin` are the RoPE
/// tables (positions, head_dim/2); `x` (1, S, H) sits at positions `start..start + S`.
/// Returns `None` (the caller then runs its candle ops) unless everything is f32 on the CPU
/// and every linear layer has a CPU kernel.
#[allow(clippy::too_many_arguments)]
pub fn fused_llama_layer(
    x: &Tensor,
    start: usize,
    cos: &Tensor,
    sin: &Tensor,
    input_norm: &candle_nn::RmsNorm,
    q: &Linear,
    k: &Linear,
    v: &Linear,
    o: &Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    post_norm: &candle_nn::RmsNorm,
    gate: &Linear,
    up: &Linear,
    down: &Linear,
    cache: &mut candle_nn::kv_cache::KvCache,
) -> Result<Option<Tensor>> {
    let kernels = [q, k, v, o, gate, up, down].map(Linear::cpu_kernel);
    let [Some(qk), Some(kk), Some(vk), Some(ok), Some(gk), Some(uk), Some(dk)] = kernels else {
        return Ok(None);
    };
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || cos.dtype() != DType::F32
        || sin.dtype() != DType::F32
        || x.rank() != 3
        || x.dim(0)? != 1
        || cache.k_cache().dim() != 2
        || num_kv_heads == 0
        || !num_heads.is_multiple_of(num_kv_heads)
    {
        return Ok(None);
    }
    let (_, len, hidden) = x.dims3()?;
    let (in_w, post_w) = (cpu_f32(input_norm.weight())?, cpu_f32(post_norm.weight())?);
    let layer = cpu::llama::LlamaLayer {
        input_norm: &in_w,
        post_norm: &post_w,
        eps: input_norm.eps() as f32,
        q: qk,
        k: kk,
        v: vk,
        o: ok,
        gate: gk,
        up: uk,
        down: dk,
        num_heads,
        num_kv_heads,
        head_dim,
    };
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let mut data = cpu_f32(x)?;
    let (q, k, v) = {
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let (Storage::Cpu(cs), Storage::Cpu(ss)) = (&*cs, &*ss) else {
            return Ok(None);
        };
        let cos = &cs.as_slice::<f32>()?[cl.start_offset()..];
        let sin = &ss.as_slice::<f32>()?[sl.start_offset()..];
        if cos.len() < (start + len) * head_dim / 2 || sin.len() < (start + len) * head_dim / 2 {
            candle_core::bail!("positions {} exceed the rotary tables", start + len);
        }
        layer.qkv(&data, len, start, cos, sin)
    };
    // (S, kv_heads, d) rows to the cache's (1, kv_heads, S, d).
    let to_heads = |t: Vec<f32>| -> Result<Tensor> {
        Tensor::from_vec(t, (len, num_kv_heads, head_dim), x.device())?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)
    };
    let (keys, values) = cache.append(&to_heads(k)?, &to_heads(v)?)?;
    {
        let (ks, kl) = keys.storage_and_layout();
        let (vs, vl) = values.storage_and_layout();
        let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&*ks, &*vs) else {
            candle_core::bail!("the KV cache is not on the CPU");
        };
        let (Some(kview), Some(vview)) = (
            cache_view(ks.as_slice::<f32>()?, kl),
            cache_view(vs.as_slice::<f32>()?, vl),
        ) else {
            candle_core::bail!("unexpected KV cache layout {:?}", kl);
        };
        if kview.len != start + len {
            candle_core::bail!(
                "KV cache holds {} positions, expected {}",
                kview.len,
                start + len
            );
        }
        layer.finish(&mut data, len, start, &q, &kview, &vview);
    }
    Ok(Some(Tensor::from_vec(data, (1, len, hidden), x.device())?))
}
