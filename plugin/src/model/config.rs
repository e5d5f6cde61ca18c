//! The configuration files of a LLaMA-VID deployment, and the values no file stores.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{ModelError, Result};

/// Reads and parses a JSON configuration file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::bad_file(path, format!("invalid JSON: {e}")))
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_num_query() -> usize {
    32
}
fn default_bos() -> u32 {
    1
}
fn default_eos() -> u32 {
    2
}

/// `config.json` of the HF model directory (`LlavaConfig`: LLaMA keys plus LLaMA-VID's `mm_*` keys).
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_bos")]
    pub bos_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Path of the EVA weights, relative to the working directory of the reference code.
    pub mm_vision_tower: String,
    /// Directory of the CLIP `preprocessor_config.json`, relative like `mm_vision_tower`.
    #[serde(default)]
    pub image_processor: Option<String>,
    pub mm_hidden_size: usize,
    #[serde(default)]
    pub mm_projector_type: Option<String>,
    #[serde(default = "default_num_query")]
    pub num_query: usize,
    #[serde(default)]
    pub compress_type: Option<String>,
    #[serde(default)]
    pub bert_type: Option<String>,
    #[serde(default)]
    pub mm_vision_select_feature: Option<String>,
}

impl LlavaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Checks what this implementation relies on, so that an unsupported checkpoint is refused
    /// at load time with the field named rather than producing garbage.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(ModelError::bad_file(path, msg));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.num_kv_heads())
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("rope_scaling is not supported (LLaMA-VID checkpoints use none)".into());
        }
        if let Some(kind) = &self.bert_type {
            if !kind.contains("qformer") {
                return bad(format!(
                    "bert_type `{kind}` is not supported: only the Q-Former variants (`qformer_pretrain`) are"
                ));
            }
        }
        match self.mm_projector_type.as_deref() {
            None | Some("linear") | Some("mlp2x_gelu") => {}
            Some(other) => return bad(format!("mm_projector_type `{other}` is not supported")),
        }
        self.content_pooling(path)?;
        Ok(())
    }

    /// How the content token(s) of a frame are pooled from its patch features.
    pub fn content_pooling(&self, path: &Path) -> Result<ContentPooling> {
        ContentPooling::parse(self.compress_type.as_deref()).ok_or_else(|| {
            ModelError::bad_file(
                path,
                format!("compress_type {:?} is not supported", self.compress_type),
            )
        })
    }
}

/// `compress_type` of the checkpoint: the video model uses `mean` (one content token per frame);
/// the image-only checkpoints use none (every patch) or `grid:N` (N×N average pooling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentPooling {
    Mean,
    Grid(usize),
    AllPatches,
}

impl ContentPooling {
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value {
            None => Some(Self::AllPatches),
            Some("mean") => Some(Self::Mean),
            Some(grid) => {
                let n: usize = grid.strip_prefix("grid:")?.trim().parse().ok()?;
                (n > 0).then_some(Self::Grid(n))
            }
        }
    }

    /// Content tokens per frame for a square patch grid of `grid` × `grid`.
    pub fn tokens_per_frame(self, grid: usize) -> usize {
        match self {
            Self::Mean => 1,
            Self::Grid(n) => n * n,
            Self::AllPatches => grid * grid,
        }
    }
}

/// `vision_config.json`: this project's optional file for the two EVA values that no release file
/// stores. Without it, the real model's values apply (width / 88 heads; all blocks but the last).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VisionOverrides {
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default)]
    pub depth: Option<usize>,
}

/// The Q-Former's hyper-parameters, read from the `bert-base-uncased` `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_bert_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_bert_act")]
    pub hidden_act: String,
}

fn default_bert_eps() -> f64 {
    1e-12
}
fn default_bert_act() -> String {
    "gelu".into()
}

impl BertConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ModelError::bad_file(
                path,
                "hidden_size is not a multiple of num_attention_heads",
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(ModelError::bad_file(
                path,
                format!(
                    "hidden_act `{}` is not supported (the Q-Former uses gelu)",
                    self.hidden_act
                ),
            ));
        }
        Ok(())
    }
}
