//! The element's properties: their specs (what `gst-inspect-1.0` shows), defaults, and the
//! element-side settings. The captioning settings (prompt, sampling, window, schedule) live in
//! the captioner's `CaptionSettings`, the one copy the worker reads.

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use gst::glib;
use gst::prelude::*;

use super::{Dtype, FramePolicy};
use crate::captioner::models::{Arithmetic, DeviceRequest, ModelRequest};
use crate::captioner::CaptionSettings;
use crate::model::remote::ServerConfig;
use crate::model::{GenerationParams, LanguageModelWeights};

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
pub const MS: u64 = 1_000_000;
pub const DEFAULT_LLM_SERVER_TIMEOUT_MS: u64 = 60_000;

/// The settings only the element reads: what to load, and how the streaming thread behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: Option<PathBuf>,
    pub vision_tower: Option<PathBuf>,
    pub device: String,
    pub dtype: Dtype,
    pub threads: u32,
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
            device: DEFAULT_DEVICE.into(),
            dtype: Dtype::Auto,
            threads: DEFAULT_THREADS,
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
            "No model set: set the `model` property to a LLaMA-VID model directory".to_owned(),
        )?;
        let device = self.device.parse::<DeviceRequest>()?;
        Ok(ModelRequest {
            model_dir,
            vision_tower: self.vision_tower.clone(),
            device,
            arithmetic: self.dtype.into(),
            threads: (self.threads > 0).then_some(self.threads as usize),
            // With the language model on a server only its token embeddings are loaded.
            language_model: if self.llm_server.is_some() {
                LanguageModelWeights::EmbeddingsOnly
            } else {
                LanguageModelWeights::All
            },
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
                .blurb("LLaMA-VID model directory (config.json, weights, tokenizer); the EVA weights and bert-base-uncased are looked up beside it")
                .mutable_ready()
                .build(),
            glib::ParamSpecString::builder("vision-tower")
                .nick("Vision tower")
                .blurb("EVA-ViT-G weights file (eva_vit_g.pth); default: mm_vision_tower of config.json, resolved beside the model")
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
            statistic("frames-sampled", "Frames sampled", "Frames picked for encoding"),
            statistic("frames-encoded", "Frames encoded", "Frames turned into tokens"),
            statistic("frames-dropped", "Frames dropped", "Sampled frames dropped because the model was behind"),
            statistic("captions", "Captions", "Captions produced"),
            glib::ParamSpecString::builder("last-caption").nick("Last caption").blurb("Text of the latest caption").read_only().build(),
            statistic("last-caption-latency", "Last caption latency", "Time from the arrival of the latest caption's last frame to the caption, in ms"),
        ]
    });
    PROPERTIES.as_ref()
}
