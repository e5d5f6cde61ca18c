//! What to load and how the loaded model may use the host: the options of `LlamaVid::load`.

use std::path::PathBuf;

use candle_core::{DType, Device};
use llamavid_kernels::cpu::IsaLimit;

use super::checkpoint::WeightFormat;
use super::nn::Precision;

/// What to load and where to run it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The HF model directory (`config.json`, weights, tokenizer).
    pub model_dir: PathBuf,
    /// EVA weights; default: `mm_vision_tower` of `config.json`, resolved beside the model.
    pub vision_tower: Option<PathBuf>,
    /// Folder with the Q-Former's `config.json` and `vocab.txt`; default: `bert-base-uncased`
    /// beside the model.
    pub bert_dir: Option<PathBuf>,
    pub device: Device,
    /// Compute dtype; weights are converted from whatever the files store.
    pub dtype: DType,
    pub weight_format: WeightFormat,
    /// Arithmetic of the linear layers on the CPU (f32 is exact; see `Precision`). Applied
    /// while loading: reduced-precision weights replace the f32 ones layer by layer.
    pub precision: Precision,
    /// A llama.cpp GGUF file (`llama` architecture) to take the language model from instead of
    /// the checkpoint: its block-quantized matrices are used as they are (`precision` then
    /// applies to the vision side and to the GGUF's f32/f16 tensors only). The embedding comes
    /// from the GGUF too, or from the checkpoint when the GGUF has none.
    pub llm_gguf: Option<PathBuf>,
    /// Which language-model weights to load: all of them, or only the token embedding table
    /// when a server generates the captions (`LlamaVid::caption_remote`).
    pub language_model: LanguageModelWeights,
    /// Threads of the model's own compute pool, which runs all of its CPU work (ours and
    /// candle's); `None`: one per core, leaving one core to the pipeline when there are more
    /// than two. Elements sharing a loaded model share its pool.
    pub threads: Option<usize>,
    /// Run the pool's threads at a lower priority (nice +5 on Linux, nothing elsewhere) so that
    /// the pipeline's threads win a busy CPU. Default: on.
    pub lower_thread_priority: bool,
    /// Tune glibc's allocator (`mallopt`) so that freed activations stay in the heap: a
    /// process-wide setting, applied once, by CPU loads only. Default: on (10 to 20% of an
    /// encode); turn it off when the host application tunes its own allocator.
    pub tune_allocator: bool,
    /// The most the CPU kernels may use (a narrowing of what the CPU has). `Best`: everything,
    /// and AMX permission is asked of the OS for the process when bf16/int8 products will use
    /// it; `Avx512` or lower never asks for AMX; `Portable` runs our portable kernels.
    pub cpu_isa: IsaLimit,
    /// Whether the vision tower and the LLaMA layers run as fused CPU kernels (the default) or
    /// through candle's ops, the code the GPU runs (tests and A/B comparisons; f32 only).
    pub cpu_layers: CpuLayers,
    /// Rows per block of the many-row products (tuning; `None`: the kernels' default).
    pub row_block: Option<usize>,
    /// Time the fused vision blocks per stage (`LlamaVid::vision().profile()`): for benchmarks.
    pub profile: bool,
    /// Compute the keys and values of a prompt's text before the video once (the system
    /// prompt, the same for every caption with one conversation template: 35 of the cpu-bench
    /// caption's 115 positions), keep them (a few prompts' worth, in memory), and start every
    /// caption with that prompt from them (`LlamaVid::start_caption`). Default: on; off
    /// prefills every caption whole (for comparisons).
    pub reuse_prompt_prefix: bool,
}

/// How the CPU runs the transformer layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CpuLayers {
    /// Our fused kernels (fast; every precision).
    #[default]
    Fused,
    /// candle's ops, as on the GPU (f32).
    Candle,
}

/// The language-model weights a loaded model holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LanguageModelWeights {
    /// Everything: captions are generated locally.
    #[default]
    All,
    /// The token embedding table only (the prompt's text tokens must be embedded exactly as
    /// the local model would); the decoder layers, final norm and `lm_head` stay on disk, and
    /// `LlamaVid::generate` refuses to run.
    EmbeddingsOnly,
}

impl LoadOptions {
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            vision_tower: None,
            bert_dir: None,
            device: Device::Cpu,
            dtype: DType::F32,
            weight_format: WeightFormat::Auto,
            precision: Precision::F32,
            llm_gguf: None,
            language_model: LanguageModelWeights::All,
            threads: None,
            lower_thread_priority: true,
            tune_allocator: true,
            cpu_isa: IsaLimit::Best,
            cpu_layers: CpuLayers::Fused,
            row_block: None,
            profile: false,
            reuse_prompt_prefix: true,
        }
    }
}
