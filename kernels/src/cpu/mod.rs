//! The CPU kernels the model runs on: fused transformer layers on flat f32 buffers and the
//! linear layers' products in f32, bf16 and int8.
//!
//! * [`linear`]: a layer's weights in one precision's layout and the single dispatch point of
//!   its products ([`CpuLinear::path`]): the few-row kernels of [`gemv`] (decoding), MKL's GEMMs
//!   under the `mkl` feature (AMX bf16/u8s8, packed f32), the `gemm` crate for f32 without MKL.
//! * [`vit`], [`llama`]: one EVA-ViT block and one LLaMA decoder layer, fused (no intermediate
//!   tensors; GELU and residual adds applied to each tile of a product while it is in cache).
//! * [`quant`]: products on ggml's block-quantized weights (GGUF files) with ggml's arithmetic,
//!   reached through the same [`CpuLinear::path`].
//! * [`math`] (norms, softmax, GELU, SiLU), [`convert`] (bf16, int8 quantisation), [`blas`]
//!   (single-threaded tile products), [`parallel`] (how work is split), [`scratch`] (reused
//!   buffers).
//! * [`features`]: what the CPU has ([`CpuFeatures`]) and what a model may use ([`Isa`]).
//!   Every kernel compiled for an extension is reached only through an `Isa` that proves it.
//! * [`host`]: the only effects on the host process (allocator tuning, AMX permission, thread
//!   priority), each called only by a model load that asks for it.
//!
//! The kernels run on the rayon pool they are called in (the model installs its own) and never
//! start threads; MKL is linked with its sequential layer and each call is split by output
//! columns into one task per thread.

// The early `return`s below end a feature-dependent branch (`mkl` or x86 adds code after them).
#![allow(clippy::needless_return, clippy::too_many_arguments)]

pub mod amx;
pub mod blas;
pub mod convert;
pub mod features;
pub mod gemv;
pub mod host;
pub mod linear;
pub mod llama;
pub mod math;
#[cfg(feature = "mkl")]
mod mkl;
pub mod parallel;
pub mod quant;
pub mod scratch;
pub mod vit;

pub use features::{CpuFeatures, Isa, IsaLimit};
pub use linear::{CpuKernels, CpuLinear, Epilogue, ProductPath, WeightType};
pub use scratch::Scratch;

/// Whether this build links oneMKL (cargo feature `mkl`).
pub const HAS_MKL: bool = cfg!(feature = "mkl");

/// Defines `$name(isa, args)` running `$body` compiled for the widest vector level `isa`
/// proves (AVX-512, AVX2, else the baseline): plain loops in the body get vectorised for the
/// wider registers. The features enabled per level are exactly what [`Isa::avx512`] and
/// [`Isa::avx2`] guarantee.
macro_rules! isa_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::cpu::isa_fn! {
            $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name(isa: $crate::cpu::Isa, $($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if isa.avx512() {
                    // SAFETY: `isa` proves every feature `avx512` enables.
                    return unsafe { avx512($($arg),*) };
                }
                if isa.avx2() {
                    // SAFETY: `isa` proves every feature `avx2` enables.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = isa;
            body($($arg),*)
        }
    };
}
pub(crate) use isa_fn;
