//! The element's properties: their specs (what `gst-inspect-1.0` shows), defaults, and the
//! element-side settings. The captioning settings (prompt, sampling, window, schedule) live in
//! the captioner's `CaptionSettings`, the one copy the worker reads.

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use gst::glib;
use gst::prelude::*;

use super::{CpuIsa, Dtype, Emit, FramePolicy};
use crate::captioner::models::{Arithmetic, DeviceRequest, ModelRequest};
use crate::captioner::CaptionSettings;
use crate::model::remote::ServerConfig;
use crate::model::{GenerationParams, IsaLimit, LanguageModelWeights};

pub const DEFAULT_PROMPT: &str = "Describe what is happening in the video.";
pub const DEFAULT_DEVICE: &str = "auto";
pub const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_WINDOW_DURATION_MS: u64 = 60_000;
pub const DEFAULT_CAPTION_INTERVAL_MS: u64 = 5000;
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 64;
pub const DEFAULT_TEMPERATURE: f64 = 0.0;
pub const DEFAULT_TOP_P: f64 = 1.0;
pub const DEFAULT_SEED: u64 = 0;
pub const DEFAULT_LATENCY_MS: u64 = 10_000;
/// 0: the model's default pool size.
pub const DEFAULT_THREADS: u32 = 0;
/// 0: the scheduler's default for the device.
pub const DEFAULT_BATCH: u32 = 0;
pub const MS: u64 = 1_000_000;
pub const DEFAULT_LLM_SERVER_TIMEOUT_MS: u64 = 60_000;
/// `change-threshold`: see `captioner::change` for why half the content words.
pub const DEFAULT_CHANGE_THRESHOLD: f64 = 0.5;

/// The settings only the element reads: what to load, and how the streaming thread behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: Option<PathBuf>,
    pub vision_tower: Option<PathBuf>,
    /// A llama.cpp GGUF file to take the language model from.
    pub llm_gguf: Option<PathBuf>,
    pub device: String,
    pub dtype: Dtype,
    pub threads: u32,
    pub encode_batch: u32,
    pub caption_batch: u32,
    pub lower_thread_priority: bool,
    pub tune_allocator: bool,
    pub cpu_isa: CpuIsa,
    pub sample_interval_ms: u64,
    pub latency_ms: u64,
    pub frame_policy: FramePolicy,
    /// Base URL of a vLLM (OpenAI-compatible) server that runs the language model.
    pub llm_server: Option<String>,
    pub llm_server_model: Option<String>,
    pub llm_server_timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: None,
            vision_tower: None,
            llm_gguf: None,
            device: DEFAULT_DEVICE.into(),
            dtype: Dtype::Auto,
            threads: DEFAULT_THREADS,
            encode_batch: DEFAULT_BATCH,
            caption_batch: DEFAULT_BATCH,
            lower_thread_priority: true,
            tune_allocator: true,
            cpu_isa: CpuIsa::Best,
            sample_interval_ms: DEFAULT_SAMPLE_INTERVAL_MS,
            latency_ms: DEFAULT_LATENCY_MS,
            frame_policy: FramePolicy::Auto,
            llm_server: None,
            llm_server_model: None,
            llm_server_timeout_ms: DEFAULT_LLM_SERVER_TIMEOUT_MS,
        }
    }
}

impl Settings {
    /// The model these settings name; `Err` says which property is wrong.
    pub fn model_request(&self) -> Result<ModelRequest, String> {
        let model_dir = self.model.clone().ok_or(
            "No model set: set the `model` property to a LLaMA-VID model directory or a hub id (owner/name)".to_owned(),
        )?;
        let device = self.device.parse::<DeviceRequest>()?;
        if self.llm_gguf.is_some() && self.llm_server.is_some() {
            return Err(
                "`llm-gguf` and `llm-server` are both set: the language model runs either \
                 here from the GGUF file or on the server; unset one"
                    .to_owned(),
            );
        }
        let set = |n: u32| (n > 0).then_some(n as usize);
        Ok(ModelRequest {
            model_dir,
            vision_tower: self.vision_tower.clone(),
            bert_dir: None,
            llm_gguf: self.llm_gguf.clone(),
            device,
            arithmetic: self.dtype.into(),
            threads: set(self.threads),
            encode_batch: set(self.encode_batch),
            caption_batch: set(self.caption_batch),
            // With the language model on a server only its token embeddings are loaded.
            language_model: if self.llm_server.is_some() {
                LanguageModelWeights::EmbeddingsOnly
            } else {
                LanguageModelWeights::All
            },
            lower_thread_priority: self.lower_thread_priority,
            tune_allocator: self.tune_allocator,
            cpu_isa: self.cpu_isa.into(),
        })
    }

    /// The server configuration when `llm-server` is set (the API key from the environment).
    pub fn server_config(&self) -> Result<Option<ServerConfig>, gst::ErrorMessage> {
        let Some(url) = self.llm_server.clone() else {
            return Ok(None);
        };
        let Some(model) = self.llm_server_model.clone() else {
            return Err(gst::error_msg!(
                gst::LibraryError::Settings,
                ("`llm-server` is set but `llm-server-model` is not: name the model the server serves (its --served-model-name)")
            ));
        };
        let mut config = ServerConfig::new(url, model);
        config.api_key = ServerConfig::api_key_from_env();
        config.request_timeout = Duration::from_millis(self.llm_server_timeout_ms.max(1));
        Ok(Some(config))
    }
}

impl From<Dtype> for Arithmetic {
    fn from(dtype: Dtype) -> Self {
        match dtype {
            Dtype::Auto => Arithmetic::Auto,
            Dtype::F32 => Arithmetic::F32,
            Dtype::Bf16 => Arithmetic::Bf16,
            Dtype::Int8 => Arithmetic::Int8,
        }
    }
}

impl From<CpuIsa> for IsaLimit {
    fn from(isa: CpuIsa) -> Self {
        match isa {
            CpuIsa::Best => IsaLimit::Best,
            CpuIsa::Avx512 => IsaLimit::Avx512,
            CpuIsa::Avx2 => IsaLimit::Avx2,
            CpuIsa::Portable => IsaLimit::Portable,
        }
    }
}

/// The captioning settings at their defaults.
pub fn default_caption_settings() -> CaptionSettings {
    CaptionSettings {
        prompt: DEFAULT_PROMPT.into(),
        params: GenerationParams {
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS as usize,
            temperature: DEFAULT_TEMPERATURE,
            top_p: DEFAULT_TOP_P,
            seed: DEFAULT_SEED,
        },
        window_duration: DEFAULT_WINDOW_DURATION_MS * MS,
        caption_interval: DEFAULT_CAPTION_INTERVAL_MS * MS,
    }
}

fn ms_property(name: &str, nick: &str, blurb: &str, default: u64, min: u64) -> glib::ParamSpec {
    glib::ParamSpecUInt64::builder(name)
        .nick(nick)
        .blurb(blurb)
        .minimum(min)
        .default_value(default)
        .mutable_playing()
        .build()
}

fn statistic(name: &str, nick: &str, blurb: &str) -> glib::ParamSpec {
    glib::ParamSpecUInt64::builder(name)
        .nick(nick)
        .blurb(blurb)
        .read_only()
        .build()
}

/// Every property of the element.
pub fn properties() -> &'static [glib::ParamSpec] {
    static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
        vec![
            glib::ParamSpecString::builder("model")
                .nick("Model")
                .blurb("LLaMA-VID model: a directory (config.json, weights, tokenizer; the EVA weights and bert-base-uncased are looked up beside it) or a Hugging Face hub id owner/name[@revision], downloaded into the hub cache with bert-base-uncased and the EVA weights")
                .mutable_ready()
                .build(),
            glib::ParamSpecString::builder("vision-tower")
                .nick("Vision tower")
                .blurb("EVA-ViT-G weights (eva_vit_g.pth): a file, an https:// URL, or a hub file owner/name/path[@revision]; default: mm_vision_tower of config.json resolved beside a local model, the LAVIS URL for a hub model")
                .mutable_ready()
                .build(),
            glib::ParamSpecString::builder("llm-gguf")
                .nick("Language model GGUF")
                .blurb("llama.cpp GGUF file (llama architecture: F32/F16/BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, e.g. written by llamavid-export-gguf) to take the language model from instead of the checkpoint; the vision side and the tokenizer still come from the model directory")
                .mutable_ready()
                .build(),
            glib::ParamSpecString::builder("prompt")
                .nick("Prompt")
                .blurb("Question asked about the video, taken as plain text; a change applies to the next caption and to frames encoded after it. A prompt that cannot be used (empty, or too long for the language model's context) is refused with a warning and the previous one stays")
                .default_value(Some(DEFAULT_PROMPT))
                .mutable_playing()
                .build(),
            glib::ParamSpecString::builder("device")
                .nick("Device")
                .blurb("Where the model runs: auto (CUDA if built with it and a GPU is present, else CPU), cpu, cuda or cuda:N. Elements naming the same model, device and dtype share one loaded copy")
                .default_value(Some(DEFAULT_DEVICE))
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("threads")
                .nick("Threads")
                .blurb("Threads of the model's own compute pool on the CPU; 0: one per core, leaving one core for the pipeline on machines with more than two. Elements sharing a model share its pool: the first to load it sets the size (a different value later gets a warning)")
                .maximum(1024)
                .default_value(DEFAULT_THREADS)
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("encode-batch")
                .nick("Encode batch")
                .blurb("Most sampled frames (of all elements sharing the model) its scheduler encodes together; 0: 4 on the CPU, 16 on CUDA. Set by the element that loads the model")
                .maximum(256)
                .default_value(DEFAULT_BATCH)
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("caption-batch")
                .nick("Caption batch")
                .blurb("Most captions (of all elements sharing the model) its scheduler decodes together, one forward per token; 0: 8 on the CPU, 32 on CUDA. Set by the element that loads the model")
                .maximum(256)
                .default_value(DEFAULT_BATCH)
                .mutable_ready()
                .build(),
            glib::ParamSpecBoolean::builder("lower-thread-priority")
                .nick("Lower thread priority")
                .blurb("Run the model's compute threads at a lower priority (nice +5 on Linux) so that the pipeline's threads win a busy CPU; false leaves their priority alone. Elements sharing a model share its threads: the first to load it decides (a different value later gets a warning)")
                .default_value(true)
                .mutable_ready()
                .build(),
            glib::ParamSpecBoolean::builder("tune-allocator")
                .nick("Tune allocator")
                .blurb("Tune glibc's allocator (mallopt: freed activations stay in the heap, 10 to 20% of an encode), a process-wide setting made once by the first CPU load; false when the application tunes its own allocator. The first element to load a model decides (a different value later gets a warning)")
                .default_value(true)
                .mutable_ready()
                .build(),
            glib::ParamSpecEnum::builder_with_default("cpu-isa", CpuIsa::Best)
                .nick("CPU instruction set")
                .blurb("The most the model's CPU kernels may use, a narrowing of what the CPU has: best (AMX included, whose permission is then asked for the process), avx512 (never AMX), avx2, portable. Elements asking for different values load separate copies of the model")
                .mutable_ready()
                .build(),
            ms_property("sample-interval", "Sample interval", "Running time between sampled frames, in ms (the fps-1 checkpoints were trained on one frame per second)", DEFAULT_SAMPLE_INTERVAL_MS, 1),
            ms_property("window-duration", "Window duration", "Running time of video the caption describes, in ms: older frames leave the window. The language model's context bounds it too: at most (context − prompt − max-new-tokens) / tokens-per-frame frames are kept, the oldest leaving first (a warning says so once)", DEFAULT_WINDOW_DURATION_MS, 0),
            ms_property("caption-interval", "Caption interval", "Running time between captions, in ms", DEFAULT_CAPTION_INTERVAL_MS, 1),
            glib::ParamSpecUInt::builder("max-new-tokens")
                .nick("Max new tokens")
                .blurb("Longest caption, in tokens; the room it takes in the language model's context is not available to the window")
                .minimum(1)
                .maximum(4096)
                .default_value(DEFAULT_MAX_NEW_TOKENS)
                .mutable_playing()
                .build(),
            glib::ParamSpecDouble::builder("temperature")
                .nick("Temperature")
                .blurb("Sampling temperature; 0 is greedy (deterministic) decoding")
                .minimum(0.0)
                .maximum(10.0)
                .default_value(DEFAULT_TEMPERATURE)
                .mutable_playing()
                .build(),
            glib::ParamSpecDouble::builder("top-p")
                .nick("Top p")
                .blurb("Nucleus sampling: probability mass kept when temperature > 0")
                .minimum(0.0)
                .maximum(1.0)
                .default_value(DEFAULT_TOP_P)
                .mutable_playing()
                .build(),
            glib::ParamSpecUInt64::builder("seed")
                .nick("Seed")
                .blurb("Random seed of sampling (each caption starts from it)")
                .default_value(DEFAULT_SEED)
                .mutable_playing()
                .build(),
            ms_property("latency", "Latency", "Processing latency declared to live pipelines for text_src, in ms; a warning is posted when a caption comes later", DEFAULT_LATENCY_MS, 0),
            glib::ParamSpecEnum::builder_with_default("dtype", Dtype::Auto)
                .nick("Data type")
                .blurb("Arithmetic of the model: f32 is exact; bf16 and int8 are faster reduced-precision CPU modes (int8 keeps up with a camera on 2 cores; see the README's performance section); auto is bf16 on AMX CPUs in an mkl build, f16 on CUDA, else f32")
                .mutable_ready()
                .build(),
            glib::ParamSpecEnum::builder_with_default("frame-policy", FramePolicy::Auto)
                .nick("Frame policy")
                .blurb("When the model falls behind: drop sampled frames (never stalls video) or wait (every frame encoded); auto drops when upstream is live (asked with a latency query, else from the source's is-live property and clock flags; unknown counts as live)")
                .mutable_playing()
                .build(),
            glib::ParamSpecString::builder("llm-server")
                .nick("Language-model server")
                .blurb("Base URL of a vLLM (OpenAI-compatible) server started with --enable-prompt-embeds that runs the language model, e.g. http://gpu-host:8000; empty: run it here. The API key, if any, is read from LLAMAVID_LLM_SERVER_API_KEY")
                .mutable_ready()
                .build(),
            glib::ParamSpecString::builder("llm-server-model")
                .nick("Language-model server model")
                .blurb("Name under which the server serves this checkpoint's language model (exported with llamavid-export-llm; vLLM's --served-model-name)")
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt64::builder("llm-server-timeout")
                .nick("Language-model server timeout")
                .blurb("Longest wait for one caption from the server, in ms; captions due meanwhile are skipped as late")
                .minimum(1)
                .default_value(DEFAULT_LLM_SERVER_TIMEOUT_MS)
                .mutable_ready()
                .build(),
            glib::ParamSpecEnum::builder_with_default("emit", Emit::Always)
                .nick("Emit")
                .blurb("Which captions leave the element (text_src, bus message, meta): always, or on-change: only a caption whose content words differ from the last emitted caption's by at least change-threshold (for surveillance events); the others still count in the statistics and leave a GAP on text_src")
                .mutable_playing()
                .build(),
            glib::ParamSpecDouble::builder("change-threshold")
                .nick("Change threshold")
                .blurb("With emit=on-change, how different a caption must be from the last emitted one: the Jaccard distance of their content words (case-folded words without punctuation, articles, auxiliaries, prepositions, pronouns), 0 = same words, 1 = none shared. Lower fires on rephrasings of the same scene (false alarms), higher misses real but small changes; 0 emits every caption")
                .minimum(0.0)
                .maximum(1.0)
                .default_value(DEFAULT_CHANGE_THRESHOLD)
                .mutable_playing()
                .build(),
            statistic("frames-sampled", "Frames sampled", "Frames picked for encoding"),
            statistic("frames-encoded", "Frames encoded", "Frames turned into tokens"),
            statistic("frames-dropped", "Frames dropped", "Sampled frames dropped because the model was behind"),
            statistic("frames-batched", "Frames batched", "Frames encoded together with others (a batch of 2 or more, frames of other elements sharing the model included)"),
            statistic("captions", "Captions", "Captions produced, emitted or suppressed by emit=on-change"),
            statistic("captions-suppressed", "Captions suppressed", "Captions emit=on-change held back as too close to the last emitted one"),
            glib::ParamSpecString::builder("last-caption").nick("Last caption").blurb("Text of the latest caption produced (emitted or not)").read_only().build(),
            statistic("last-caption-latency", "Last caption latency", "Time from the arrival of the latest caption's last frame to the caption, in ms"),
        ]
    });
    PROPERTIES.as_ref()
}
