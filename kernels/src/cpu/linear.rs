//! A linear layer `y = x · Wᵀ + b` on the CPU: its weights in the layout of one precision, and
//! the one place that decides which kernel runs a product ([`CpuLinear::path`]), from the
//! product's shape, the weights' layout and the model's [`CpuKernels`] (chosen once at load).
//!
//! * **f32**: the checkpoint's tensor itself (or, under `mkl`, MKL's packed layout for layers
//!   that only see many rows).
//! * **bf16**: weights converted once to bf16 (half the bytes), activations converted per call,
//!   products accumulated in f32.
//! * **int8**: weights quantised once per output channel (symmetric, scale = max|w|/127, or
//!   max|w|/63 where the AVX2 kernels run int8: [`CpuKernels::int8_weight_levels`]),
//!   activations quantised per row at every call (dynamic, symmetric, stored +128 as u8),
//!   products accumulated exactly in i32 and rescaled to f32.
//! * **ggml blocks** (a GGUF file's Q4_0 … Q6_K): the file's blocks as they are, products with
//!   ggml's arithmetic ([`super::quant`]).
//!
//! Products of at most [`gemv::MAX_ROWS`] rows (decoding) run on the matrix-vector kernels of
//! [`gemv`] (AVX-512, AVX2 or portable lanes), int8 ones of 2 to 16 rows on AMX CPUs on our
//! AMX tile kernel ([`amx`]); larger ones on MKL's GEMMs (AMX or AVX-512
//! BF16/VNNI for bf16/u8s8), for f32 without MKL on the `gemm` crate, and for bf16/int8 without
//! those instructions (AVX2 CPUs) on the same lanes as the few-row kernels, in tiles: the
//! columns split between the threads, each walking its row blocks, with the [`Epilogue`]
//! applied to each tile while it is in cache.

use candle_core::{Storage, Tensor};

use super::blas::{self, Dims, Mat, Out};
use super::gemv::{self, Schedule, WRows, XRows};
use super::parallel::{for_tiles, SharedMut};
use super::quant::{BlockType, BlockWeights};
use super::scratch::Scratch;
use super::{amx, convert, math, CpuFeatures, Isa, HAS_MKL};
#[cfg(feature = "mkl")]
use super::{mkl, parallel};

/// How the CPU kernels of one model run: chosen once at load, kept by each of its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuKernels {
    isa: Isa,
    row_block: usize,
    /// The largest |q| of int8 weights ([`Self::int8_weight_levels`]).
    int8_levels: i8,
}

impl CpuKernels {
    /// Rows per block of the blocked products: one frame's tokens (257 for EVA at 224 px) per
    /// block. Measured on the benchmark's vision tower (int8, 2 threads, per frame): blocks of
    /// 128 rows 0.531 s for one frame / 0.446 s in a batch of 8, one block per whole product
    /// 0.478 / 0.465 s, blocks of up to 300 rows 0.424 / 0.432 s.
    pub const DEFAULT_ROW_BLOCK: usize = 320;

    pub fn new(isa: Isa) -> Self {
        // Without VNNI (AVX2 kernels), int8 weights take 7 bits: `vpmaddubsw` on u8
        // activations and |w| <= 63 cannot saturate its i16 pair sums (2 · 255 · 63 = 32130),
        // so the products need no sign trick (`vpsignb`, a third of the multiply-port work).
        // Twice the weights' rounding error, for products 1.4x as fast.
        let int8_levels = match gemv::kernel(isa, WeightType::Int8) {
            gemv::Kernel::Avx2 => Self::AVX2_INT8_LEVELS,
            _ => 127,
        };
        Self {
            isa,
            row_block: Self::DEFAULT_ROW_BLOCK,
            int8_levels,
        }
    }

    /// The int8 weights' largest |q| on CPUs whose int8 products run on the AVX2 kernels.
    pub const AVX2_INT8_LEVELS: i8 = 63;

    /// int8 weights quantised to `levels` (at most 127) instead of this CPU's choice: the
    /// kernels of another CPU on the same weights (for tests).
    pub fn with_int8_weight_levels(self, levels: i8) -> Self {
        Self {
            int8_levels: levels.clamp(1, 127),
            ..self
        }
    }

    /// The largest |q| of the int8 weights these kernels quantise: 127 (8 bits), or
    /// [`Self::AVX2_INT8_LEVELS`] where the AVX2 kernels run the int8 products.
    pub fn int8_weight_levels(self) -> i8 {
        self.int8_levels
    }

    /// Blocks of at most `rows` rows in the many-row products (a tuning knob).
    pub fn with_row_block(self, rows: usize) -> Self {
        Self {
            row_block: rows.max(1),
            ..self
        }
    }

    pub fn isa(self) -> Isa {
        self.isa
    }

    pub fn row_block(self) -> usize {
        self.row_block
    }

    /// Whether many-row products of `kind` (bf16 or int8) go to MKL's GEMMs: the build links
    /// MKL and [`mkl_takes_reduced_precision`] says so for this ISA on this CPU.
    pub fn mkl_reduced_precision(self, kind: WeightType) -> bool {
        HAS_MKL && mkl_takes_reduced_precision(self.isa, &CpuFeatures::detect(), kind)
    }
}

/// Whether MKL's GEMMs should take the many-row bf16 and int8 products of a model whose
/// kernels run `isa` on the CPU `cpu`: the CPU has the instructions for them (AMX, or AVX-512
/// BF16 / VNNI), MKL will not use AMX behind our back (it would on an AMX CPU whose AMX we
/// were told not to use, or have not asked permission for), and the CPU is an Intel one.
/// - Without those instructions (AVX2 machines, or an AVX-512 CPU narrowed to AVX2) our own
///   exact kernels take them: MKL's u8 × s8 GEMM may saturate 16-bit intermediate sums
///   without VNNI (oneDNN documents this for its int8 GEMMs), and under a narrowed ISA MKL
///   would still pick its own, wider code. So an AVX2 path runs the same code on an AVX2
///   machine as on a narrowed one, where it is tested.
/// - On other vendors' CPUs MKL's reduced-precision GEMMs are slow. On an AMD EPYC with
///   AVX-512 VNNI and BF16 (2 threads, `products --isa best`), against our AVX-512 tiles on the
///   same machine: int8 115 × 5632 × 2048 took 59.6 ms against 3.77 ms, a frame's 257 × 6144 ×
///   1408 (packed) 51.1 against 6.90 ms; bf16 18.6 against 7.58 ms and 25.2 against 12.0 ms.
///   MKL's sgemm there is as fast as on Intel, so f32 is not affected.
fn mkl_takes_reduced_precision(isa: Isa, cpu: &CpuFeatures, kind: WeightType) -> bool {
    let native = match kind {
        WeightType::F32 | WeightType::Ggml(_) => return false,
        WeightType::Bf16 => isa.avx512_bf16(),
        WeightType::Int8 => isa.avx512_vnni(),
    };
    isa.amx() || (native && !cpu.amx && cpu.intel)
}

/// Arithmetic of a layer's product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    Bf16,
    Int8,
    /// ggml block-quantized weights from a GGUF file.
    Ggml(BlockType),
}

impl WeightType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Ggml(t) => t.name(),
        }
    }
}

/// What a linear layer does with its result `y = x · Wᵀ + b`. The many-row paths apply it to
/// each block of rows right after the block's product, while the block is still in cache,
/// instead of in one more pass over the whole output (a 257-token frame's MLP activations are
/// 6 MB per layer: those passes were memory-bound, about a tenth of an int8 encode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `out = y`.
    Store,
    /// `out = gelu_erf(y)`: a transformer MLP's first layer.
    Gelu,
    /// `out += y`: a residual connection, `out` holding the residual stream.
    Accumulate,
}

/// The kernel a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductPath {
    /// The few-row kernels of [`gemv`] with these lanes: every weight read once.
    Gemv(gemv::Kernel),
    /// Many rows of reduced precision without an MKL GEMM for them (AVX2 and portable CPUs):
    /// the same lanes in cache-sized tiles, the epilogue applied to each tile.
    Tiles(gemv::Kernel),
    /// f32 tiles on MKL's sgemm (feature `mkl`) or the `gemm` crate.
    Sgemm,
    /// f32 tiles on MKL's packed weights.
    MklPacked,
    /// bf16 tiles on MKL's `gemm_bf16bf16f32` (AMX where permitted).
    MklBf16,
    /// int8 tiles on MKL's `gemm_s8u8s32` (AMX where permitted).
    MklInt8,
    /// int8 tiles on MKL's packed int8 weights.
    MklInt8Packed,
    /// ggml's block dot products ([`super::quant`]) for these instructions, any row count.
    GgmlBlocks(Isa),
    /// int8 products of 2 to [`amx::MAX_ROWS`] rows on our AMX tile kernel ([`amx`]).
    AmxInt8,
}

impl ProductPath {
    pub fn describe(self) -> String {
        match self {
            Self::Gemv(kernel) => format!("gemv ({kernel})"),
            Self::Tiles(kernel) => format!("tiles ({kernel})"),
            Self::Sgemm if HAS_MKL => "MKL sgemm".into(),
            Self::Sgemm => "gemm crate".into(),
            Self::MklPacked => "MKL packed sgemm".into(),
            Self::MklBf16 => "MKL bf16 GEMM".into(),
            Self::MklInt8 => "MKL u8s8 GEMM".into(),
            Self::MklInt8Packed => "MKL packed u8s8 GEMM".into(),
            Self::GgmlBlocks(isa) => format!("ggml block dots ({isa})"),
            Self::AmxInt8 => "AMX int8 tiles".into(),
        }
    }
}

enum Weights {
    F32(F32Weights),
    /// (n, k) row-major bf16 bits.
    Bf16(Vec<u16>),
    Int8(Int8Weights),
    Ggml(BlockWeights),
}

enum F32Weights {
    /// (n, k) row-major: the checkpoint's tensor itself.
    Plain(Tensor),
    /// In MKL's packed layout, one part per column range of the threads' split (then MKL
    /// does not re-pack the weights on every product: 10% of a one-frame encode).
    #[cfg(feature = "mkl")]
    Packed(Vec<(usize, usize, mkl::PackedF32)>),
}

struct Int8Weights {
    /// In ± the layer's [`CpuKernels::int8_weight_levels`].
    q: Int8Values,
    /// Per output channel.
    scale: Vec<f32>,
    /// `-128 · Σ_k q[j, k]`: removes the +128 offset of the u8 activations.
    offset: Vec<i32>,
}

enum Int8Values {
    /// (n, k) row-major.
    Plain(Vec<i8>),
    /// In MKL's packed layout, one part per column range of the threads' split, as
    /// [`F32Weights::Packed`].
    #[cfg(feature = "mkl")]
    Packed(Vec<(usize, usize, mkl::PackedS8)>),
}

/// A linear layer's weights in the layout of one precision's kernels.
pub struct CpuLinear {
    weights: Weights,
    bias: Option<Vec<f32>>,
    n: usize,
    k: usize,
    kernels: CpuKernels,
}

/// `pack(cols, first)` for each thread's column range of the (n, k) weights `w` (as
/// [`parallel::thread_columns`] splits them), `first` pointing at the range's first row.
#[cfg(feature = "mkl")]
fn pack_thread_columns<T, P>(
    w: &[T],
    k: usize,
    pack: impl Fn(usize, *const T) -> P,
) -> Vec<(usize, usize, P)> {
    parallel::thread_columns(w.len() / k)
        .into_iter()
        .map(|(j0, j1)| (j0, j1, pack(j1 - j0, w[j0 * k..].as_ptr())))
        .collect()
}

impl CpuLinear {
    /// f32 weights: `w` is an (n, k) f32 tensor on the CPU (kept as it is).
    pub fn f32(
        w: Tensor,
        bias: Option<Vec<f32>>,
        kernels: CpuKernels,
    ) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        Ok(Self::with_weights(
            Weights::F32(F32Weights::Plain(w)),
            bias,
            n,
            k,
            kernels,
        ))
    }

    /// The layer with its weights kept only in MKL's packed layout, tuned for products of
    /// about `rows` rows, where its many-row products run on MKL (f32 weights, and int8 ones
    /// where [`CpuKernels::mkl_reduced_precision`] allows): for layers only ever applied to
    /// many rows at once, such as a vision tower's. Then a product no longer copies the
    /// weights into that layout on every call. Other layers, and builds without `mkl`, stay
    /// as they are. Packing splits the columns for the current thread pool: build the layer
    /// in the pool that will run it.
    pub fn packed_for(self, rows: usize) -> Self {
        #[cfg(feature = "mkl")]
        {
            let k = self.k;
            match &self.weights {
                Weights::F32(F32Weights::Plain(_)) => {
                    let parts = self.with_f32_weights(|w| {
                        // SAFETY: `first` starts `cols` rows of k inside the weights.
                        pack_thread_columns(w, k, |cols, first| unsafe {
                            mkl::PackedF32::new(rows, cols, k, first, k)
                        })
                    });
                    // The plain tensor goes now: only the packed copy stays.
                    let weights = Weights::F32(F32Weights::Packed(parts));
                    return Self { weights, ..self };
                }
                Weights::Int8(Int8Weights {
                    q: Int8Values::Plain(q),
                    ..
                }) if self.kernels.mkl_reduced_precision(WeightType::Int8) => {
                    // SAFETY: `first` starts `cols` rows of k inside the weights.
                    let parts = pack_thread_columns(q, k, |cols, first| unsafe {
                        mkl::PackedS8::new(rows, cols, k, first, k)
                    });
                    let Weights::Int8(w) = self.weights else {
                        unreachable!()
                    };
                    let weights = Weights::Int8(Int8Weights {
                        q: Int8Values::Packed(parts),
                        ..w
                    });
                    return Self { weights, ..self };
                }
                _ => {}
            }
        }
        #[cfg(not(feature = "mkl"))]
        let _ = rows;
        self
    }

    /// The layer with int8 weights in MKL's packed layout where that is faster at every row
    /// count, one row included: on AMX CPUs whose many-row int8 products run on MKL. There,
    /// MKL's products on packed weights read them at the memory's bandwidth from one row on,
    /// and a prefill no longer copies them into that layout on every call (products bench,
    /// `--cold 64`, 5632 × 2048, one run: 1 row 0.349 ms against 0.390 ms on our VNNI gemv,
    /// 4 rows 0.362 ms against 0.456 ms on our AMX tiles, 115 rows 0.90 ms against 1.49 ms). For
    /// layers applied to any number of rows (a language model's decode steps, batched steps
    /// and prefills). Elsewhere (VNNI without AMX, unmeasured; AVX2; builds without `mkl`)
    /// the layer stays as it is.
    pub fn packed_where_faster(self) -> Self {
        let amx_mkl =
            self.kernels.isa.amx() && self.kernels.mkl_reduced_precision(WeightType::Int8);
        if amx_mkl && self.weight_type() == WeightType::Int8 {
            self.packed_for(Self::ANY_ROWS_PACK_HINT)
        } else {
            self
        }
    }

    /// The row count MKL's layout is tuned for in [`Self::packed_where_faster`]: packed for 115
    /// or for 460 rows measured the same at 1 to 460 rows.
    const ANY_ROWS_PACK_HINT: usize = 256;

    /// Weights of type `kind` from `w`, (n, k) row-major f32: converted once to bf16 or
    /// quantised per output channel to int8 (f32 weights are copied into a tensor). ggml
    /// blocks are not made here: they come from a file ([`CpuLinear::ggml`]).
    pub fn from_f32(
        kind: WeightType,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<Vec<f32>>,
        kernels: CpuKernels,
    ) -> Self {
        assert_eq!(w.len(), n * k, "({n}, {k}) weights");
        let weights = match kind {
            WeightType::F32 => {
                let t = Tensor::from_slice(w, (n, k), &candle_core::Device::Cpu);
                Weights::F32(F32Weights::Plain(t.expect("a CPU tensor of the weights")))
            }
            WeightType::Bf16 => {
                let mut bits = vec![0u16; w.len()];
                convert::to_bf16(kernels.isa, w, &mut bits);
                Weights::Bf16(bits)
            }
            WeightType::Int8 => {
                let (q, scale, offset) =
                    convert::quantize_weights(kernels.isa, w, k, kernels.int8_levels);
                Weights::Int8(Int8Weights {
                    q: Int8Values::Plain(q),
                    scale,
                    offset,
                })
            }
            // A caller's slip, not an input error: no precision maps to ggml blocks.
            WeightType::Ggml(t) => panic!("{t:?} weights come from a GGUF file (CpuLinear::ggml)"),
        };
        Self::with_weights(weights, bias, n, k, kernels)
    }

    /// ggml block-quantized weights: `data` holds `n` rows of `k` values in blocks of `t`, as
    /// a GGUF file stores them (kept as they are). Errs when the sizes do not fit.
    pub fn ggml(
        t: BlockType,
        n: usize,
        k: usize,
        data: Vec<u8>,
        bias: Option<Vec<f32>>,
        kernels: CpuKernels,
    ) -> Result<Self, String> {
        let weights = Weights::Ggml(BlockWeights::new(t, n, k, data)?);
        Ok(Self::with_weights(weights, bias, n, k, kernels))
    }

    /// The weights as f32 (n, k) when they are ggml blocks (for checks).
    pub fn dequantized_blocks(&self) -> Option<Vec<f32>> {
        match &self.weights {
            Weights::Ggml(w) => Some(w.dequantize()),
            _ => None,
        }
    }

    fn with_weights(
        weights: Weights,
        bias: Option<Vec<f32>>,
        n: usize,
        k: usize,
        kernels: CpuKernels,
    ) -> Self {
        assert!(bias.as_ref().is_none_or(|b| b.len() == n), "bias of {n}");
        Self {
            weights,
            bias,
            n,
            k,
            kernels,
        }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    pub fn kernels(&self) -> CpuKernels {
        self.kernels
    }

    pub fn weight_type(&self) -> WeightType {
        match &self.weights {
            Weights::F32(_) => WeightType::F32,
            Weights::Bf16(_) => WeightType::Bf16,
            Weights::Int8(_) => WeightType::Int8,
            Weights::Ggml(w) => WeightType::Ggml(w.block_type()),
        }
    }

    /// Bytes held by the weights (MKL's packed layout: those reserved; only the part MKL
    /// writes is resident).
    pub fn weight_bytes(&self) -> usize {
        match &self.weights {
            Weights::F32(F32Weights::Plain(w)) => w.elem_count() * 4,
            #[cfg(feature = "mkl")]
            Weights::F32(F32Weights::Packed(parts)) => {
                parts.iter().map(|(_, _, p)| p.bytes()).sum()
            }
            Weights::Bf16(w) => w.len() * 2,
            Weights::Int8(w) => {
                let values = match &w.q {
                    Int8Values::Plain(q) => q.len(),
                    #[cfg(feature = "mkl")]
                    Int8Values::Packed(parts) => parts.iter().map(|(_, _, p)| p.bytes()).sum(),
                };
                values + w.scale.len() * 8
            }
            Weights::Ggml(w) => w.bytes(),
        }
    }

    /// The kernel a product of `m` rows runs on: the one dispatch point of every product.
    pub fn path(&self, m: usize) -> ProductPath {
        let isa = self.kernels.isa;
        let few = m <= gemv::MAX_ROWS;
        let kind = self.weight_type();
        let ours = gemv::kernel(isa, kind);
        match &self.weights {
            #[cfg(feature = "mkl")]
            Weights::F32(F32Weights::Packed(_)) => ProductPath::MklPacked,
            #[cfg(feature = "mkl")]
            Weights::Int8(Int8Weights {
                q: Int8Values::Packed(_),
                ..
            }) => ProductPath::MklInt8Packed,
            Weights::F32(_) if few && isa.avx2() => ProductPath::Gemv(ours),
            Weights::F32(_) => ProductPath::Sgemm,
            Weights::Ggml(_) => ProductPath::GgmlBlocks(isa),
            // One row stays on `vpdpbusd`: both are bound by the weights' bandwidth there, and
            // AMX measured no faster (cold 5632 × 2048: 0.397 ms against 0.386 ms); from 2
            // rows on the tiles are (8 rows: 0.44 against 0.59 ms).
            Weights::Int8(_) if amx::available(isa) && (2..=amx::MAX_ROWS).contains(&m) => {
                ProductPath::AmxInt8
            }
            _ if few => ProductPath::Gemv(ours),
            _ if !self.kernels.mkl_reduced_precision(kind) => ProductPath::Tiles(ours),
            Weights::Bf16(_) => ProductPath::MklBf16,
            Weights::Int8(_) => ProductPath::MklInt8,
        }
    }

    /// `out = x · Wᵀ + b` for `x` (m, k) row-major f32 and `out` (m, n).
    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.forward_with(x, m, out, Epilogue::Store);
    }

    /// `out = x · Wᵀ + b` as a new vector.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.n];
        self.forward_into(x, m, &mut out);
        out
    }

    /// The product with its result handled by `epilogue` (`out` holds the residual for
    /// [`Epilogue::Accumulate`]).
    pub fn forward_with(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue) {
        let (n, k, isa) = (self.n, self.k, self.kernels.isa);
        assert_eq!(x.len(), m * k, "activations of {m} rows of {k}");
        assert_eq!(out.len(), m * n, "output of {m} rows of {n}");
        if m == 0 {
            return;
        }
        let path = self.path(m);
        match &self.weights {
            Weights::F32(F32Weights::Plain(_)) => self.with_f32_weights(|w| {
                self.product(path, XRows::F32(x), WRows::F32(w), m, out, epilogue)
            }),
            #[cfg(feature = "mkl")]
            Weights::F32(F32Weights::Packed(parts)) => self.packed(parts, x, m, out, epilogue),
            Weights::Bf16(w) => {
                let mut xb = Scratch::<u16>::new(m * k);
                convert::to_bf16(isa, x, &mut xb);
                self.product(path, XRows::Bf16(&xb), WRows::Bf16(w), m, out, epilogue)
            }
            Weights::Int8(w) => {
                let mut xq = Scratch::<u8>::new(m * k);
                let mut xs = Scratch::<f32>::new(m);
                convert::quantize_rows(isa, x, k, &mut xq, &mut xs);
                let x = XRows::Int8 { q: &xq, scale: &xs };
                // Without `mkl`, `Plain` is the only layout.
                #[allow(clippy::infallible_destructuring_match)]
                let q = match &w.q {
                    Int8Values::Plain(q) => q,
                    #[cfg(feature = "mkl")]
                    Int8Values::Packed(parts) => {
                        return self.int8_packed(parts, x, w, m, out, epilogue)
                    }
                };
                let w = WRows::Int8 {
                    q,
                    levels: self.kernels.int8_levels,
                    scale: &w.scale,
                    offset: &w.offset,
                };
                self.product(path, x, w, m, out, epilogue)
            }
            Weights::Ggml(w) => {
                let ProductPath::GgmlBlocks(isa) = path else {
                    unreachable!("{path:?} for ggml blocks")
                };
                w.product(isa, x, (m, n, k), self.bias.as_deref(), out, epilogue)
            }
        }
    }

    fn product(
        &self,
        path: ProductPath,
        x: XRows,
        w: WRows,
        m: usize,
        out: &mut [f32],
        epilogue: Epilogue,
    ) {
        let (n, k, isa) = (self.n, self.k, self.kernels.isa);
        match path {
            ProductPath::Gemv(_) | ProductPath::Tiles(_) => {
                let schedule = if matches!(path, ProductPath::Gemv(_)) {
                    Schedule::Columns
                } else {
                    Schedule::Tiles {
                        row_block: self.kernels.row_block,
                    }
                };
                let bias = self.bias.as_deref();
                gemv::product(isa, x, m, w, n, k, bias, out, epilogue, schedule)
            }
            ProductPath::Sgemm | ProductPath::MklBf16 => {
                let c = SharedMut::new(out);
                for_tiles(m, n, self.kernels.row_block, |i0, i1, j0, j1| {
                    let (rows, cols) = (i1 - i0, j1 - j0);
                    // SAFETY: A rows i0..i1 of the (m, k) activations, B rows j0..j1 of the
                    // (n, k) weights (both checked against m, n, k), C the (rows, cols) tile
                    // at (i0, j0) of the (m, n) output, which no other tile touches.
                    unsafe {
                        let tile = c.get().add(i0 * n + j0);
                        let bias = self.bias.as_deref().map(|b| &b[j0..j1]);
                        let beta = prepare_tile(isa, tile, rows, cols, n, bias, epilogue);
                        let d = Dims {
                            m: rows,
                            n: cols,
                            k,
                        };
                        let out = Out { ptr: tile, ld: n };
                        match (x, w) {
                            (XRows::F32(x), WRows::F32(w)) => blas::sgemm(
                                d,
                                Mat::rows(x.as_ptr().add(i0 * k), k),
                                Mat::columns(w.as_ptr().add(j0 * k), k),
                                out,
                                beta != 0.0,
                            ),
                            #[cfg(feature = "mkl")]
                            (XRows::Bf16(x), WRows::Bf16(w)) => mkl::gemm(
                                d,
                                Mat::rows(x.as_ptr().add(i0 * k), k),
                                Mat::columns(w.as_ptr().add(j0 * k), k),
                                out,
                                beta,
                            ),
                            _ => unreachable!("{path:?} for these operands"),
                        }
                        finish_tile(isa, tile, rows, cols, n, epilogue);
                    }
                });
            }
            #[cfg(feature = "mkl")]
            ProductPath::MklInt8 => self.int8_tiles(x, w, m, out, epilogue),
            ProductPath::AmxInt8 => {
                let (
                    XRows::Int8 { q: xq, scale: xs },
                    WRows::Int8 {
                        q: wq,
                        scale: ws,
                        offset,
                        ..
                    },
                ) = (x, w)
                else {
                    unreachable!("AMX int8 tiles for other operands")
                };
                let operands = amx::Int8Product {
                    x: xq,
                    xs,
                    w: wq,
                    ws,
                    offset,
                    m,
                    n,
                    k,
                    bias: self.bias.as_deref(),
                };
                amx::product(isa, &operands, out, epilogue)
            }
            _ => unreachable!("{path:?} without MKL"),
        }
    }

    /// int8 tiles on MKL: exact i32 products into a per-tile scratch, then each row rescaled
    /// into the output with the epilogue.
    #[cfg(feature = "mkl")]
    fn int8_tiles(&self, x: XRows, w: WRows, m: usize, out: &mut [f32], epilogue: Epilogue) {
        let (
            XRows::Int8 { q: xq, scale: xs },
            WRows::Int8 {
                q: wq,
                scale: ws,
                offset,
                ..
            },
        ) = (x, w)
        else {
            unreachable!("int8 tiles for other operands")
        };
        let (n, k) = (self.n, self.k);
        let y = SharedMut::new(out);
        for_tiles(m, n, self.kernels.row_block, |i0, i1, j0, j1| {
            let (rows, cols) = (i1 - i0, j1 - j0);
            let mut acc = Scratch::<i32>::new(rows * cols);
            // SAFETY: A rows i0..i1 of the (m, k) activations, B rows j0..j1 of the (n, k)
            // weights, the int32 products into this task's (rows, cols) scratch.
            unsafe {
                mkl::u8s8_nt(
                    rows,
                    cols,
                    k,
                    xq.as_ptr().add(i0 * k),
                    wq.as_ptr().add(j0 * k),
                    k,
                    acc.as_mut_ptr(),
                    cols,
                    offset.as_ptr().add(j0),
                );
            }
            // The output tile at (i0, j0): no other tile touches it.
            self.finish_int8_tile(&acc, (i0, j0, j1), xs, ws, y, epilogue);
        });
    }

    /// The int32 products `acc` of the output tile at rows `i0..`, columns `j0..j1`, rescaled
    /// into `y` ((m, n), this tile touched by no other task) with the bias and the epilogue.
    #[cfg(feature = "mkl")]
    fn finish_int8_tile(
        &self,
        acc: &[i32],
        (i0, j0, j1): (usize, usize, usize),
        xs: &[f32],
        ws: &[f32],
        y: SharedMut<f32>,
        epilogue: Epilogue,
    ) {
        let (n, isa, cols) = (self.n, self.kernels.isa, j1 - j0);
        let bias = self.bias.as_deref().map(|b| &b[j0..j1]);
        for (r, acc_row) in acc.chunks(cols).enumerate() {
            // SAFETY: a row of this tile, inside the (m, n) output (the callers' tiles are).
            let out_row =
                unsafe { std::slice::from_raw_parts_mut(y.get().add((i0 + r) * n + j0), cols) };
            rescale_row(
                isa,
                acc_row,
                xs[i0 + r],
                &ws[j0..j1],
                bias,
                epilogue == Epilogue::Accumulate,
                out_row,
            );
            if epilogue == Epilogue::Gelu {
                math::gelu(isa, out_row);
            }
        }
    }

    /// int8 products on MKL's packed weights: each part (a column range) walks the row
    /// blocks, each block finished as [`Self::int8_tiles`]' are.
    #[cfg(feature = "mkl")]
    fn int8_packed(
        &self,
        parts: &[(usize, usize, mkl::PackedS8)],
        x: XRows,
        w: &Int8Weights,
        m: usize,
        out: &mut [f32],
        epilogue: Epilogue,
    ) {
        let XRows::Int8 { q: xq, scale: xs } = x else {
            unreachable!("packed int8 products of other activations")
        };
        let k = self.k;
        let y = SharedMut::new(out);
        parallel::for_row_blocks(
            m,
            self.kernels.row_block,
            parts,
            |i0, i1, &(j0, j1, ref part)| {
                let (rows, cols) = (i1 - i0, j1 - j0);
                let mut acc = Scratch::<i32>::new(rows * cols);
                // SAFETY: A rows i0..i1 of the (m, k) activations, this part's packed columns,
                // the int32 products into this task's (rows, cols) scratch.
                unsafe {
                    part.product(
                        rows,
                        xq.as_ptr().add(i0 * k),
                        acc.as_mut_ptr(),
                        cols,
                        w.offset.as_ptr().add(j0),
                    );
                }
                // The output tile at (i0, j0): no other task touches it.
                self.finish_int8_tile(&acc, (i0, j0, j1), xs, &w.scale, y, epilogue);
            },
        );
    }

    /// f32 products on MKL's packed weights: each part (a column range) walks the row blocks.
    #[cfg(feature = "mkl")]
    fn packed(
        &self,
        parts: &[(usize, usize, mkl::PackedF32)],
        x: &[f32],
        m: usize,
        out: &mut [f32],
        epilogue: Epilogue,
    ) {
        let (n, k, isa) = (self.n, self.k, self.kernels.isa);
        let c = SharedMut::new(out);
        parallel::for_row_blocks(
            m,
            self.kernels.row_block,
            parts,
            |i0, i1, &(j0, j1, ref part)| {
                // SAFETY: as in `product`: rows i0..i1 of x, the tile at (i0, j0) of this
                // part's columns.
                unsafe {
                    let tile = c.get().add(i0 * n + j0);
                    let bias = self.bias.as_deref().map(|b| &b[j0..j1]);
                    let beta = prepare_tile(isa, tile, i1 - i0, j1 - j0, n, bias, epilogue);
                    part.product(i1 - i0, x.as_ptr().add(i0 * k), beta, tile, n);
                    finish_tile(isa, tile, i1 - i0, j1 - j0, n, epilogue);
                }
            },
        );
    }

    /// Calls `f` with the plain (n, k) f32 weights as a slice.
    fn with_f32_weights<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let Weights::F32(F32Weights::Plain(w)) = &self.weights else {
            unreachable!("only plain f32 weights are read as a slice")
        };
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            unreachable!("CpuLinear holds a CPU tensor")
        };
        f(
            &storage.as_slice::<f32>().expect("f32 weights")[layout.start_offset()..]
                [..self.n * self.k],
        )
    }
}

/// Before a product accumulates into the tile (rows of `cols` at stride `ld`): the bias is
/// written (or added, when the tile already holds a residual). Returns the `beta` the product
/// then needs.
///
/// # Safety
/// `c` must point at `rows` rows of `cols` writable floats at stride `ld`.
unsafe fn prepare_tile(
    isa: Isa,
    c: *mut f32,
    rows: usize,
    cols: usize,
    ld: usize,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
) -> f32 {
    let accumulate = epilogue == Epilogue::Accumulate;
    if let Some(b) = bias {
        for r in 0..rows {
            let row = std::slice::from_raw_parts_mut(c.add(r * ld), cols);
            if accumulate {
                math::add_assign(isa, row, b);
            } else {
                row.copy_from_slice(b);
            }
        }
    }
    if accumulate || bias.is_some() {
        1.0
    } else {
        0.0
    }
}

/// After a product wrote the tile: the GELU, when asked for.
///
/// # Safety
/// As for [`prepare_tile`].
unsafe fn finish_tile(
    isa: Isa,
    c: *mut f32,
    rows: usize,
    cols: usize,
    ld: usize,
    epilogue: Epilogue,
) {
    if epilogue == Epilogue::Gelu {
        for r in 0..rows {
            math::gelu(isa, std::slice::from_raw_parts_mut(c.add(r * ld), cols));
        }
    }
}

super::isa_fn! {
    /// One output row of the int8 product: `y = acc · xs · ws + bias`, stored or added.
    #[cfg(feature = "mkl")]
    fn rescale_row(
        acc: &[i32],
        xs: f32,
        ws: &[f32],
        bias: Option<&[f32]>,
        accumulate: bool,
        out: &mut [f32],
    ) {
        // Four plain loops (rather than one with branches inside) so that each vectorises.
        let products = acc.iter().zip(ws).map(|(&a, &s)| a as f32 * xs * s);
        match (bias, accumulate) {
            (Some(b), false) => {
                for ((o, p), &b) in out.iter_mut().zip(products).zip(b) {
                    *o = p + b;
                }
            }
            (Some(b), true) => {
                for ((o, p), &b) in out.iter_mut().zip(products).zip(b) {
                    *o += p + b;
                }
            }
            (None, false) => out.iter_mut().zip(products).for_each(|(o, p)| *o = p),
            (None, true) => out.iter_mut().zip(products).for_each(|(o, p)| *o += p),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::cpu::IsaLimit;

    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[j * k + t] as f64;
                }
                out[i * n + j] = s as f32 + b.map_or(0.0, |b| b[j]);
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A line on the real stderr (not captured by the test harness), so that a skipped part
    /// shows in every `cargo test` run.
    fn report_skip(what: &str, why: &str) {
        let _ = writeln!(std::io::stderr().lock(), "skipped: {what}: {why}");
    }

    /// The ISAs to test: every one this CPU runs, plus a visible line for each level it lacks.
    fn isas() -> Vec<Isa> {
        let best = Isa::detect(IsaLimit::Best);
        if !best.avx2() {
            report_skip("AVX2 kernels", "this CPU lacks AVX2/FMA/F16C");
        }
        if !best.avx512() {
            report_skip("AVX-512 kernels", "this CPU lacks AVX-512 F/BW/VL/DQ");
        }
        if !best.avx512_bf16() || !best.avx512_vnni() {
            report_skip(
                "AVX-512 BF16/VNNI kernels",
                "this CPU lacks AVX-512 BF16 or VNNI",
            );
        }
        if !HAS_MKL {
            report_skip("MKL products", "this build lacks the `mkl` feature");
        } else if !best.amx() {
            report_skip("MKL AMX products", "this CPU lacks AMX");
        }
        let mut isas = Isa::available();
        isas.extend(amx_tiles());
        isas
    }

    /// This CPU's ISA with the AMX tile permission granted (as a model load asks for it), for
    /// our AMX kernels; `None`, after a visible line, where the CPU lacks AMX. On a CPU with
    /// AMX whose OS refuses the permission the kernels go unchecked: that fails under CI=true.
    fn amx_tiles() -> Option<Isa> {
        let best = Isa::detect(IsaLimit::Best);
        if !best.amx() {
            report_skip(
                "AMX int8 tiles",
                "this CPU lacks AMX (tiles, int8 and OS support)",
            );
            return None;
        }
        let granted = best.request_amx();
        if !granted.amx_tiles() {
            let in_ci = matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"));
            assert!(
                !in_ci,
                "CI=true, this CPU has AMX, but the OS refused the tile state: the AMX kernels \
                 went unchecked"
            );
            report_skip(
                "AMX int8 tiles",
                "the OS refused this process the AMX tile state",
            );
            return None;
        }
        Some(granted)
    }

    /// Every layer of `layers` against the f64 product, for row counts of the few-row kernels,
    /// of the GEMMs and of several row blocks, with each epilogue.
    fn check(layers: &[(CpuLinear, String, f32)], w: &[f32], bias: &[f32], n: usize, k: usize) {
        for m in [1, 3, 4, 5, 9, 40, 700] {
            let x = data(m * k, 3 + m as u32);
            let exact = reference(&x, w, Some(bias), m, n, k);
            let mut exact_gelu = exact.clone();
            math::gelu(Isa::portable(), &mut exact_gelu);
            let residual = data(m * n, 99);
            let exact_sum: Vec<f32> = residual.iter().zip(&exact).map(|(r, y)| r + y).collect();
            for (layer, name, bound) in layers {
                let path = layer.path(m).describe();
                let mut y = vec![f32::NAN; m * n];
                layer.forward_into(&x, m, &mut y);
                let e = max_err(&y, &exact);
                assert!(e < *bound, "{name} m={m} ({path}): {e}");
                layer.forward_with(&x, m, &mut y, Epilogue::Gelu);
                let e = max_err(&y, &exact_gelu);
                assert!(e < *bound, "{name} + gelu m={m} ({path}): {e}");
                let mut y = residual.clone();
                layer.forward_with(&x, m, &mut y, Epilogue::Accumulate);
                let e = max_err(&y, &exact_sum);
                assert!(e < *bound, "{name} + residual m={m} ({path}): {e}");
            }
        }
    }

    // k with a tail (not a multiple of 64), n not a multiple of 4.
    const N: usize = 37;
    const K: usize = 200;

    #[test]
    fn f32_products_stay_close_to_f64() {
        let (w, bias) = (data(N * K, 1), data(N, 2));
        let mut layers = Vec::new();
        for isa in isas() {
            let kernels = CpuKernels::new(isa).with_row_block(256);
            let tensor = || Tensor::from_vec(w.clone(), (N, K), &candle_core::Device::Cpu);
            let plain = CpuLinear::f32(tensor().unwrap(), Some(bias.clone()), kernels);
            layers.push((plain.unwrap(), format!("f32 {isa}"), 1e-4));
            // Packed for 17 rows, used for other row counts too (MKL builds only).
            let packed = CpuLinear::f32(tensor().unwrap(), Some(bias.clone()), kernels);
            layers.push((
                packed.unwrap().packed_for(17),
                format!("f32 packed {isa}"),
                1e-4,
            ));
        }
        check(&layers, &w, &bias, N, K);
    }

    #[test]
    fn bf16_and_int8_products_stay_close_to_f64() {
        // |x|, |w| <= 1 and k <= 200, so bf16 rounding (2^-9 relative on each operand) bounds
        // the error by about 200 · 2 · 2^-9 ≈ 0.8 in the worst case, 0.05 typically; int8 by
        // about twice that. Two shapes: k = 200 and 77 leave tails for every vector width
        // (8, 16, 32, 64 elements), n = 37 and 9 partial blocks of 2 and 4 weight rows.
        for (n, k) in [(N, K), (9, 77)] {
            let (w, bias) = (data(n * k, 1), data(n, 2));
            let mut layers = Vec::new();
            for isa in isas() {
                let kernels = CpuKernels::new(isa).with_row_block(256);
                for (kind, bound) in [(WeightType::Bf16, 0.1), (WeightType::Int8, 0.2)] {
                    let layer = || CpuLinear::from_f32(kind, &w, n, k, Some(bias.clone()), kernels);
                    layers.push((layer(), format!("{} {isa}", kind.as_str()), bound));
                    // MKL's packed int8 weights where its GEMM runs them (bf16 stays).
                    let packed = layer().packed_for(17);
                    layers.push((packed, format!("{} packed {isa}", kind.as_str()), bound));
                }
            }
            check(&layers, &w, &bias, n, k);
        }
    }

    /// The int8 sums are exact in i32 on every path, so every ISA's int8 product equals the
    /// portable one bit for bit; bf16 products are exact in f32, so only the summation order
    /// differs. Much tighter than the f64 bounds above: a lane that drops or repeats an
    /// element of a tail would show here.
    #[test]
    fn every_isa_agrees_with_the_portable_kernels() {
        // Beside the shapes above: whole AMX tiles (n = 48, k = 128), a last tile of one
        // channel and a k tail (33, 150), fewer channels and bytes than one tile (7, 20).
        for (n, k) in [(N, K), (9, 77), (48, 128), (33, 150), (7, 20)] {
            let (w, bias) = (data(n * k, 1), data(n, 2));
            // int8 on weights of 8 and of 7 bits (the AVX2 kernels' two lanes).
            for (kind, levels) in [
                (WeightType::Bf16, 127),
                (WeightType::Int8, 127),
                (WeightType::Int8, CpuKernels::AVX2_INT8_LEVELS),
            ] {
                let layer = |isa| {
                    let kernels = CpuKernels::new(isa)
                        .with_row_block(256)
                        .with_int8_weight_levels(levels);
                    CpuLinear::from_f32(kind, &w, n, k, Some(bias.clone()), kernels)
                };
                let portable = layer(Isa::portable());
                // Each ISA's layers, and the same packed for MKL where its GEMM runs them.
                for ours in isas()
                    .into_iter()
                    .flat_map(|isa| [layer(isa), layer(isa).packed_for(17)])
                {
                    let isa = ours.kernels().isa();
                    // Every row count of the few-row kernels (8) and of the AMX tiles (16),
                    // one past them, and many.
                    for m in (1..=17).chain([300]) {
                        let x = data(m * k, 7 + m as u32);
                        let path = ours.path(m).describe();
                        let bound = if kind == WeightType::Int8 { 0.0 } else { 1e-5 };
                        let (want, got) = (portable.forward(&x, m), ours.forward(&x, m));
                        let e = max_err(&got, &want);
                        assert!(e <= bound, "{kind:?}/{levels} {isa} m={m} ({path}): {e}");
                        // A residual added to the same products: exact for int8 as well.
                        let residual = data(m * n, 13);
                        let (mut want, mut got) = (residual.clone(), residual.clone());
                        portable.forward_with(&x, m, &mut want, Epilogue::Accumulate);
                        ours.forward_with(&x, m, &mut got, Epilogue::Accumulate);
                        let e = max_err(&got, &want);
                        assert!(
                            e <= bound,
                            "{kind:?}/{levels} {isa} m={m} +res ({path}): {e}"
                        );
                        // The GELU of this ISA's lanes (which round differently from the
                        // portable ones) on the portable products: applied, and to each output.
                        let mut want = portable.forward(&x, m);
                        math::gelu(isa, &mut want);
                        let mut got = vec![f32::NAN; m * n];
                        ours.forward_with(&x, m, &mut got, Epilogue::Gelu);
                        let e = max_err(&got, &want);
                        assert!(
                            e <= 1e-5,
                            "{kind:?}/{levels} {isa} m={m} gelu ({path}): {e}"
                        );
                    }
                }
            }
        }
    }

    /// The int8 kernels' worst case: every weight and activation at ±1 quantises to the
    /// extremes of both quantisers (±127, or ±63 for 7-bit weights), so every pair of
    /// products reaches ±2 · 127 · 127 (or 2 · 255 · 63 on the u8 activations), where a
    /// saturating i16 pair sum would show. Every ISA must give the portable outputs bit for
    /// bit, and the exact ±1 dot products.
    #[test]
    fn int8_products_at_the_quantisers_extremes_are_exact() {
        let sign = |v: f32| if v < 0.0 { -1.0 } else { 1.0 };
        for ((n, k), levels) in [(N, K), (9, 77), (8, 1408)]
            .into_iter()
            .flat_map(|shape| [(shape, 127), (shape, CpuKernels::AVX2_INT8_LEVELS)])
        {
            let w: Vec<f32> = data(n * k, 5).into_iter().map(sign).collect();
            let layer = |isa| {
                let kernels = CpuKernels::new(isa)
                    .with_row_block(256)
                    .with_int8_weight_levels(levels);
                CpuLinear::from_f32(WeightType::Int8, &w, n, k, None, kernels)
            };
            let portable = layer(Isa::portable());
            for m in [1, 4, 5, 16, 300] {
                // Rows equal to a weight row (all products +127²), to its negation (all
                // -127²), and random signs.
                let x: Vec<f32> = (0..m)
                    .flat_map(|i| {
                        let row = &w[(i % n) * k..][..k];
                        let random = data(k, 11 + i as u32);
                        (0..k).map(move |t| match i % 3 {
                            0 => row[t],
                            1 => -row[t],
                            _ => sign(random[t]),
                        })
                    })
                    .collect();
                let exact = reference(&x, &w, None, m, n, k);
                let want = portable.forward(&x, m);
                assert!(max_err(&want, &exact) < 1e-3, "portable m={m} k={k}");
                for isa in isas() {
                    let ours = layer(isa);
                    let got = ours.forward(&x, m);
                    let path = ours.path(m).describe();
                    assert_eq!(got, want, "{isa} m={m} k={k} levels {levels} ({path})");
                }
            }
        }
    }

    #[test]
    fn every_precision_has_a_path_for_every_shape() {
        let w = data(N * K, 1);
        let portable = CpuKernels::new(Isa::portable());
        for kind in [WeightType::Bf16, WeightType::Int8] {
            let layer = CpuLinear::from_f32(kind, &w, N, K, None, portable);
            assert_eq!(layer.path(1), ProductPath::Gemv(gemv::Kernel::Portable));
            // No MKL GEMM without the instructions for it: our tiles take many rows.
            assert_eq!(layer.path(100), ProductPath::Tiles(gemv::Kernel::Portable));
        }
    }

    /// Issue 10: int8 products of 2 to 16 rows (batched decode steps) run on the AMX tiles
    /// exactly when the ISA proves the tile permission; never under the AVX-512 limit, nor
    /// from detection alone (no permission asked), nor for other precisions.
    #[test]
    fn amx_tiles_take_the_few_row_int8_products_only_with_the_permission() {
        let w = data(N * K, 1);
        let layer = |isa, kind| CpuLinear::from_f32(kind, &w, N, K, None, CpuKernels::new(isa));
        let unrequested = Isa::detect(IsaLimit::Best);
        assert!(!unrequested.amx_tiles());
        let avx512 = Isa::detect(IsaLimit::Avx512).request_amx();
        assert!(!avx512.amx_tiles() && !avx512.amx());
        for isa in [unrequested, avx512] {
            let int8 = layer(isa, WeightType::Int8);
            for m in [1, 2, 8, 16, 17] {
                assert_ne!(int8.path(m), ProductPath::AmxInt8, "{isa} m={m}");
            }
        }
        let Some(tiles) = amx_tiles() else {
            return;
        };
        let int8 = layer(tiles, WeightType::Int8);
        assert_eq!(int8.path(1), ProductPath::Gemv(gemv::Kernel::Avx512Vnni));
        for m in 2..=amx::MAX_ROWS {
            assert_eq!(int8.path(m), ProductPath::AmxInt8, "m={m}");
        }
        assert_ne!(int8.path(amx::MAX_ROWS + 1), ProductPath::AmxInt8);
        for kind in [WeightType::F32, WeightType::Bf16] {
            let other = layer(tiles, kind);
            assert_ne!(other.path(4), ProductPath::AmxInt8, "{kind:?}");
        }
    }

    /// MKL's bf16 and int8 GEMMs only where they are fast and safe: AMX in use, or AVX-512
    /// BF16 / VNNI on an Intel CPU without AMX. An AMD CPU with the same instructions, an AMX
    /// CPU whose AMX is excluded, and AVX2 keep our own tiles; f32 never asks.
    #[test]
    fn mkl_takes_reduced_precision_only_on_intel_cpus_with_the_instructions() {
        let zen4 = CpuFeatures {
            avx2: true,
            fma: true,
            f16c: true,
            avx512f: true,
            avx512bw: true,
            avx512vl: true,
            avx512dq: true,
            avx512_bf16: true,
            avx512_vnni: true,
            amx: false,
            intel: false,
        };
        let ice_lake = CpuFeatures {
            intel: true,
            ..zen4
        };
        let sapphire_rapids = CpuFeatures {
            amx: true,
            ..ice_lake
        };
        let rule = |cpu: &CpuFeatures, limit, kind| {
            mkl_takes_reduced_precision(Isa::of_described_cpu(cpu).narrow(limit), cpu, kind)
        };
        for kind in [WeightType::Bf16, WeightType::Int8] {
            assert!(!rule(&zen4, IsaLimit::Best, kind), "{kind:?}");
            assert!(rule(&ice_lake, IsaLimit::Best, kind), "{kind:?}");
            assert!(!rule(&ice_lake, IsaLimit::Avx2, kind), "{kind:?}");
            // MKL uses AMX there (asking the permission itself); under the AVX-512 limit it
            // would too, behind our back, so our tiles take the products.
            assert!(rule(&sapphire_rapids, IsaLimit::Best, kind), "{kind:?}");
            assert!(!rule(&sapphire_rapids, IsaLimit::Avx512, kind), "{kind:?}");
        }
        for cpu in [zen4, ice_lake, sapphire_rapids] {
            assert!(!rule(&cpu, IsaLimit::Best, WeightType::F32));
        }
    }

    /// Issue 16: under the AVX2 limit (an AVX2 + FMA CPU without AVX-512, or this CPU narrowed
    /// to one) every product runs our AVX2 lanes or the f32 GEMM, never an AVX-512 kernel nor
    /// MKL's reduced-precision GEMMs (which would pick their own wider code).
    #[test]
    fn avx2_limit_runs_the_avx2_kernels_for_every_precision_and_shape() {
        let isa = Isa::detect(IsaLimit::Avx2);
        if !isa.avx2() {
            return report_skip("AVX2 dispatch", "this CPU lacks AVX2/FMA/F16C");
        }
        assert!(!isa.avx512() && !isa.avx512_bf16() && !isa.avx512_vnni() && !isa.amx());
        assert_eq!(isa.name(), "avx2");
        let w = data(N * K, 1);
        let kernels = CpuKernels::new(isa);
        for kind in [WeightType::F32, WeightType::Bf16, WeightType::Int8] {
            assert_eq!(gemv::kernel(isa, kind), gemv::Kernel::Avx2, "{kind:?}");
            assert!(!kernels.mkl_reduced_precision(kind), "{kind:?}");
            let layer = CpuLinear::from_f32(kind, &w, N, K, None, kernels);
            for m in 1..=gemv::MAX_ROWS {
                assert_eq!(layer.path(m), ProductPath::Gemv(gemv::Kernel::Avx2));
            }
            let many = if kind == WeightType::F32 {
                ProductPath::Sgemm
            } else {
                ProductPath::Tiles(gemv::Kernel::Avx2)
            };
            assert_eq!(layer.path(gemv::MAX_ROWS + 1), many, "{kind:?}");
            assert_eq!(layer.path(2056), many, "{kind:?}");
        }
    }
}
