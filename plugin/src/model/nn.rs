//! The layers every module builds from, and how a load decides what they become. `Linear` is
//! ours rather than candle's so that the matrix products, where nearly all the time goes, have
//! one place to choose how they run: candle's ops (the GPU's path, and the CPU's when asked
//! for), or the CPU kernels of [`llamavid_kernels::cpu`] in f32, bf16 or int8 (see
//! [`Precision`]), or on a GGUF file's block-quantized weights ([`LoadContext::gguf_linear`]).
//!
//! Modules receive a [`LoadContext`] beside their `VarBuilder` (as candle-transformers modules
//! receive their config): it says, explicitly, which kernels and precision every `Linear` built
//! from it uses. Reduced-precision layers convert their weights once and drop the f32 copy, so
//! peak memory stays at the reduced size.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use half::slice::HalfFloatSliceExt;
use llamavid_kernels::cpu::vit::VitProfile;
use llamavid_kernels::cpu::{self, CpuKernels, CpuLinear, WeightType};

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

    /// The concrete precision to run on `device` with the CPU kernels `cpu` (`None`: candle's
    /// ops run the layers), and a sentence when the request could not be honoured as asked or
    /// will be slow (to show the user).
    pub fn resolve(self, device: &Device, cpu: Option<CpuKernels>) -> (Precision, Option<String>) {
        let requested = self;
        let unavailable = |why: String| {
            let note = (requested != Self::Auto).then(|| format!("precision {requested} {why}"));
            (Self::F32, note)
        };
        match (self, cpu) {
            (Self::F32, _) => (Self::F32, None),
            _ if !device.is_cpu() => unavailable(format!(
                "applies to CPU inference only; the model runs in f32 on {device:?}"
            )),
            (_, None) => unavailable(
                "needs the fused CPU kernels (the candle layers were asked for); running in f32"
                    .into(),
            ),
            (Self::Auto, Some(k)) if fast_reduced_precision(k) => (Self::Bf16, None),
            (Self::Auto, Some(_)) => (Self::F32, None),
            (_, Some(k)) if fast_reduced_precision(k) => (self, None),
            (_, Some(k)) => {
                let kind = self.weight_type();
                let small = cpu::gemv::kernel(k.isa(), kind);
                let large = if k.mkl_reduced_precision(kind) {
                    "MKL's GEMMs without AMX".to_owned()
                } else {
                    format!("our {small} kernels in tiles")
                };
                (
                    self,
                    Some(format!(
                        "precision {self}: decoding runs on the {small} kernels and large \
                         products on {large} (CPU: {})",
                        cpu::CpuFeatures::detect().describe()
                    )),
                )
            }
        }
    }

    /// The weights' type a resolved precision puts in the CPU layers.
    fn weight_type(self) -> WeightType {
        match self {
            Self::Bf16 => WeightType::Bf16,
            Self::Int8 => WeightType::Int8,
            Self::F32 | Self::Auto => WeightType::F32,
        }
    }
}

/// Whether bf16 and int8 run well: AMX through MKL for the large products.
fn fast_reduced_precision(kernels: CpuKernels) -> bool {
    cpu::HAS_MKL && kernels.isa().amx()
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

/// What the linear layers of the modules being built become: passed to every constructor.
#[derive(Clone, Debug, Default)]
pub struct LoadContext {
    /// A resolved precision (F32, Bf16 or Int8) for the CPU layers.
    precision: Precision,
    /// The CPU kernels; `None`: candle's ops (GPU models, or the candle path asked for).
    cpu: Option<CpuKernels>,
    /// Keep f32 and int8 weights only in MKL's packed layout, tuned for products of about
    /// this many rows (feature `mkl`; no effect without it). Without it, int8 weights are
    /// packed only where that is faster at every row count (`CpuLinear::packed_where_faster`).
    pack_rows: Option<usize>,
    /// Where the fused vision blocks add their stage times, when profiling.
    vit_profile: Option<Arc<VitProfile>>,
}

impl LoadContext {
    /// Layers on candle's own ops (f32 weights as loaded).
    pub fn candle() -> Self {
        Self::default()
    }

    /// Layers on the CPU kernels `kernels` in `precision` (resolved: not `Auto`).
    pub fn cpu(precision: Precision, kernels: CpuKernels) -> Self {
        Self {
            precision: if precision == Precision::Auto {
                Precision::F32
            } else {
                precision
            },
            cpu: Some(kernels),
            ..Self::default()
        }
    }

    /// The same, timing the fused vision blocks per stage into `profile`.
    pub fn with_vit_profile(self, profile: Arc<VitProfile>) -> Self {
        Self {
            vit_profile: Some(profile),
            ..self
        }
    }

    /// For layers only ever applied to about `rows` rows at once, such as the vision tower's
    /// (257 per frame): their f32 and int8 weights can live in MKL's packed layout (a
    /// one-frame encode then no longer re-packs 4 GB of f32 weights, or 1 GB of int8 ones).
    pub fn packed_for(&self, rows: usize) -> Self {
        Self {
            pack_rows: Some(rows),
            ..self.clone()
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn cpu_kernels(&self) -> Option<CpuKernels> {
        self.cpu
    }

    pub fn vit_profile(&self) -> Option<&Arc<VitProfile>> {
        self.vit_profile.as_ref()
    }

    /// `y = x · Wᵀ + b` from a weight (out, in) and bias: on the CPU kernels when this context
    /// has them and the weights are f32 CPU tensors, else on candle.
    pub fn linear(&self, weight: Tensor, bias: Option<Tensor>) -> Linear {
        match self.cpu_linear(&weight, bias.as_ref()) {
            Some(kernel) => Linear {
                backend: Backend::Cpu(Arc::new(kernel)),
            },
            None => Linear {
                backend: Backend::Candle(candle_nn::Linear::new(weight, bias)),
            },
        }
    }

    /// A layer on weights (out, in) as a GGUF file stores them. Block-quantized ones stay as
    /// they are: on the CPU kernels of this context, computing as ggml does (see
    /// `llamavid_kernels::cpu::quant`), else (GPU, candle layers, and the types our kernels
    /// lack: Q2_K, Q3_K) in candle's quantized products. F32/F16/BF16 ones become f32 weights
    /// built as [`LoadContext::linear`] builds them (the context's precision applies).
    pub fn gguf_linear(&self, weight: Arc<QTensor>) -> Result<Linear> {
        use cpu::quant::BlockType;
        let block = match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let dense = weight.dequantize(&weight.device())?;
                return Ok(self.linear(dense, None));
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
        if let (Some(block), Some(kernels), true) = (block, self.cpu, weight.device().is_cpu()) {
            let (n, k) = weight.shape().dims2()?;
            let data = weight.data()?.into_owned();
            let kernel = CpuLinear::ggml(block, n, k, data, None, kernels)
                .map_err(candle_core::Error::Msg)?;
            return Ok(Linear {
                backend: Backend::Cpu(Arc::new(kernel)),
            });
        }
        Ok(Linear {
            backend: Backend::Quantized(QMatMul::from_arc(weight)?),
        })
    }

    /// The weights in the layout of a CPU kernel; `None` when none applies (no CPU kernels in
    /// this context, GPU tensors, non-f32 weights).
    fn cpu_linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Option<CpuLinear> {
        let kernels = self.cpu?;
        let applies = weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && weight.rank() == 2
            && bias.is_none_or(|b| b.dtype() == DType::F32 && b.rank() == 1);
        if !applies {
            return None;
        }
        let (n, k) = weight.dims2().ok()?;
        let b = match bias.map(|b| b.to_vec1::<f32>()) {
            None => None,
            Some(Ok(b)) if b.len() == n => Some(b),
            Some(_) => return None,
        };
        let layer = match self.precision.weight_type() {
            // The checkpoint's tensor itself.
            WeightType::F32 => CpuLinear::f32(weight.clone(), b, kernels).ok()?,
            reduced => {
                let w = weight.flatten_all().and_then(|w| w.to_vec1::<f32>()).ok()?;
                CpuLinear::from_f32(reduced, &w, n, k, b, kernels)
            }
        };
        Some(match self.pack_rows {
            Some(rows) => layer.packed_for(rows),
            None => layer.packed_where_faster(),
        })
    }
}

#[derive(Clone)]
enum Backend {
    Candle(candle_nn::Linear),
    /// A GGUF file's weights in candle's quantized products (GPU, or the candle layers).
    Quantized(QMatMul),
    Cpu(Arc<CpuLinear>),
}

/// `y = x · Wᵀ + b` with W stored (out, in) as in PyTorch checkpoints. Built by
/// [`LoadContext::linear`].
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
            Backend::Cpu(kernel) => f
                .debug_struct("Linear")
                .field("out", &kernel.out_features())
                .field("in", &kernel.in_features())
                .field("precision", &self.precision().as_str())
                .finish(),
        }
    }
}

impl Linear {
    /// The CPU kernel of this layer, when it has one.
    pub fn cpu_kernel(&self) -> Option<&CpuLinear> {
        match &self.backend {
            Backend::Cpu(kernel) => Some(kernel),
            Backend::Candle(_) | Backend::Quantized(_) => None,
        }
    }

    /// The kernel a product of `rows` rows runs on, in words.
    pub fn path(&self, rows: usize) -> String {
        match &self.backend {
            Backend::Cpu(kernel) => kernel.path(rows).describe(),
            Backend::Candle(_) => "candle".into(),
            Backend::Quantized(_) => "candle QMatMul".into(),
        }
    }

    /// The arithmetic this layer runs; f32 for a GGUF file's block-quantized weights (the
    /// precision setting does not apply to them: see [`Linear::is_block_quantized`]).
    pub fn precision(&self) -> Precision {
        match &self.backend {
            Backend::Candle(_) | Backend::Quantized(_) => Precision::F32,
            Backend::Cpu(kernel) => match kernel.weight_type() {
                WeightType::Bf16 => Precision::Bf16,
                WeightType::Int8 => Precision::Int8,
                WeightType::F32 | WeightType::Ggml(_) => Precision::F32,
            },
        }
    }

    /// Whether the weights are a GGUF file's block-quantized ones.
    pub fn is_block_quantized(&self) -> bool {
        match &self.backend {
            Backend::Quantized(QMatMul::QTensor(_)) => true,
            Backend::Cpu(kernel) => matches!(kernel.weight_type(), WeightType::Ggml(_)),
            _ => false,
        }
    }

    /// Bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        match &self.backend {
            Backend::Candle(l) => l.weight().elem_count() * l.weight().dtype().size_in_bytes(),
            Backend::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Backend::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                w.elem_count() * w.dtype().size_in_bytes()
            }
            Backend::Cpu(kernel) => kernel.weight_bytes(),
        }
    }
}

fn cpu_forward(kernel: &CpuLinear, x: &Tensor) -> Result<Tensor> {
    let device = &Device::Cpu;
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
            Backend::Cpu(kernel) => cpu_forward(kernel, x),
        }
    }
}

/// A linear layer with a bias, from `{weight, bias}` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder, ctx: &LoadContext) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(ctx.linear(weight, Some(bias)))
}

/// A linear layer without a bias, from `weight` under `vb`.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    ctx: &LoadContext,
) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Ok(ctx.linear(weight, None))
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
    profile: Option<&VitProfile>,
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
        profile,
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
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Option<cpu::llama::CacheView<'a>> {
    let data = match storage {
        candle_core::CpuStorage::F32(d) => cpu::llama::KvData::F32(d),
        candle_core::CpuStorage::F16(d) => cpu::llama::KvData::F16(d.reinterpret_cast()),
        _ => return None,
    };
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

/// One sequence's rows in a (ragged) batch of rows: the next `rows` rows, at positions
/// `start..start + rows` of that sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceSpan {
    pub rows: usize,
    pub start: usize,
}

/// Runs one LLaMA decoder layer on the CPU kernels, fused: `x + o(attn(rope(q, k), v))` over
/// `rmsnorm(x)`, then `x + down(silu(gate(h)) · up(h))` over `rmsnorm(x)`. `x` (1, R, H) holds
/// the rows of the sequences of `spans`, in order; every product runs on all R rows, attention
/// per sequence. `write_cache(i, k, v)` stores sequence `i`'s keys and values
/// (1, kv_heads, rows, head_dim) in its cache and returns the cache's views
/// (1, kv_heads, start + rows, head_dim). `cos`/`sin` are the RoPE tables
/// (positions, head_dim/2). Returns `None` (the caller then runs its candle ops) unless
/// everything is f32 on the CPU and every linear layer has a CPU kernel.
#[allow(clippy::too_many_arguments)]
pub fn fused_llama_layer(
    x: &Tensor,
    spans: &[SequenceSpan],
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
    mut write_cache: impl FnMut(usize, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
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
        || num_kv_heads == 0
        || !num_heads.is_multiple_of(num_kv_heads)
    {
        return Ok(None);
    }
    let (_, len, hidden) = x.dims3()?;
    if spans.iter().map(|s| s.rows).sum::<usize>() != len {
        candle_core::bail!("the sequences' rows do not add up to the batch's {len}");
    }
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
    let positions: Vec<usize> = spans
        .iter()
        .flat_map(|s| s.start..s.start + s.rows)
        .collect();
    let end = spans.iter().map(|s| s.start + s.rows).max().unwrap_or(0);
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
        if cos.len() < end * head_dim / 2 || sin.len() < end * head_dim / 2 {
            candle_core::bail!("positions {end} exceed the rotary tables");
        }
        layer.qkv(&data, &positions, cos, sin)
    };
    // Each sequence's (rows, kv_heads, d) rows to its cache's (1, kv_heads, rows, d): in
    // f16 where the layers are our int8 or bf16 ones (as llama.cpp's caches are by default).
    // A decode step reads every cached position of every sequence: with four cpu-bench
    // captions, 9% of an int8 step went to reading an f32 cache. f16 rounds each key and value
    // by 2^-11 (relative), well below the int8 products' rounding of their activations (2^-8
    // of a row's largest). A GGUF model's blocks keep f32 caches: that decoder is held to
    // llama.cpp run with f32 caches (gguf_llama_cpp), whose near ties f16 would tip.
    let kv_width = num_kv_heads * head_dim;
    let kv_f16 = matches!(
        qk.weight_type(),
        cpu::WeightType::Int8 | cpu::WeightType::Bf16
    );
    let isa = qk.kernels().isa();
    let to_heads = |t: &[f32], rows: usize| -> Result<Tensor> {
        let shape = (rows, num_kv_heads, head_dim);
        let t = if kv_f16 {
            let mut halves = vec![half::f16::ZERO; t.len()];
            cpu::convert::to_f16(isa, t, halves.reinterpret_cast_mut());
            Tensor::from_vec(halves, shape, x.device())?
        } else {
            Tensor::from_slice(t, shape, x.device())?
        };
        t.transpose(0, 1)?.contiguous()?.unsqueeze(0)
    };
    let mut views = Vec::with_capacity(spans.len());
    let mut first = 0;
    for (i, span) in spans.iter().enumerate() {
        let rows = first * kv_width..(first + span.rows) * kv_width;
        let (keys, values) = write_cache(
            i,
            &to_heads(&k[rows.clone()], span.rows)?,
            &to_heads(&v[rows], span.rows)?,
        )?;
        views.push((keys, values));
        first += span.rows;
    }
    drop((k, v));
    {
        let guards: Vec<_> = views
            .iter()
            .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let mut sequences = Vec::with_capacity(spans.len());
        for (span, ((ks, kl), (vs, vl))) in spans.iter().zip(&guards) {
            let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&**ks, &**vs) else {
                candle_core::bail!("the KV cache is not on the CPU");
            };
            let (Some(keys), Some(values)) = (cache_view(ks, kl), cache_view(vs, vl)) else {
                candle_core::bail!("unexpected KV cache layout {:?}", kl);
            };
            if keys.len != span.start + span.rows || values.len != keys.len {
                candle_core::bail!(
                    "KV cache holds {} positions, expected {}",
                    keys.len,
                    span.start + span.rows
                );
            }
            sequences.push(cpu::llama::SequenceRows {
                rows: span.rows,
                start: span.start,
                keys,
                values,
            });
        }
        layer.finish(&mut data, &q, &sequences);
    }
    Ok(Some(Tensor::from_vec(data, (1, len, hidden), x.device())?))
}
