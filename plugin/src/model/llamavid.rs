//! The loaded model and the three operations the element needs: prepare a prompt once,
//! encode frames into their tokens, caption a window of tokens.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};

use super::cancel::{Cancel, CANCELLED};
use super::checkpoint::{Checkpoint, WeightFormat};
use super::config::{read_json, BertConfig, LlavaConfig, VisionOverrides};
use super::eva::{EvaConfig, EvaVit};
use super::files::{self, ModelFiles};
use super::llama::{Llama, LogitsFor};
use super::nn::{Precision, PrecisionScope};
use super::preprocess::{ClipPreprocess, FrameView, ResizeTarget};
use super::prompt::{clean_answer, split_at_image, PromptIds, IMAGE_TOKEN_INDEX};
use super::qformer::{QFormerConfig, TextGuidance};
use super::sampling::{GenerationParams, Sampler};
use super::tokenizer::{BertTokenizer, LlamaTokenizer, QFORMER_MAX_TOKENS};
use super::tokens::{TokenConfig, TokenGenerator};
use super::{ModelError, Result};

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
    /// Threads of the model's own compute pool; `None`: the machine's default (see the
    /// README). Elements sharing a loaded model share its pool.
    pub threads: Option<usize>,
    /// Which language-model weights to load: all of them, or only the token embedding table
    /// when a server generates the captions (`LlamaVid::caption_remote`).
    pub language_model: LanguageModelWeights,
}

/// The language-model weights a loaded model holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LanguageModelWeights {
    /// Everything: captions are generated locally.
    #[default]
    All,
    /// The token embedding table only (the prompt's text tokens must be embedded exactly as
    /// the local model would); the decoder layers, final norm and `lm_head` stay on disk, and
    /// [`LlamaVid::generate`] refuses to run.
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
            threads: None,
            language_model: LanguageModelWeights::All,
        }
    }
}

/// A question prepared for captioning: its Q-Former guidance (used when encoding frames) and
/// the embedded prompt around the `<image>` placeholder (used when captioning).
#[derive(Clone, Debug)]
pub struct CaptionPrompt {
    pub question: String,
    pub guidance: TextGuidance,
    /// LLM ids with the image placeholder (-200), as the reference tokenizes them.
    pub input_ids: Vec<i64>,
    /// Embeddings of the ids before and after the placeholder (1, n, H).
    before: Tensor,
    after: Tensor,
}

impl CaptionPrompt {
    /// Positions the prompt takes in the language model's context (without the video).
    pub fn len(&self) -> usize {
        self.input_ids.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The outcome of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    /// Logits (vocab,) of every step, kept only when asked (tests, debugging).
    pub step_logits: Vec<Tensor>,
    pub stopped_at_eos: bool,
}

/// A caption of a window of frames.
#[derive(Debug, Clone)]
pub struct Caption {
    pub text: String,
    pub token_ids: Vec<u32>,
}

pub struct LlamaVid {
    files: ModelFiles,
    config: LlavaConfig,
    preprocess: ClipPreprocess,
    vision: EvaVit,
    tokens: TokenGenerator,
    llm: Llama,
    llm_tokenizer: LlamaTokenizer,
    qformer_tokenizer: BertTokenizer,
    /// Longest question (in BERT tokens, `[CLS]` and `[SEP]` included) the Q-Former takes.
    qformer_positions: usize,
    device: Device,
    dtype: DType,
    precision: Precision,
    notes: Vec<String>,
}

/// The dimensions of tensor `name`, which must have `rank` of them: the sizes the loader
/// derives the configuration from, checked before anything indexes them.
fn dims_of(file: &Checkpoint, path: &Path, name: &str, rank: usize) -> Result<Vec<usize>> {
    let dims = file.shape(name)?.dims().to_vec();
    if dims.len() != rank || dims.contains(&0) {
        return Err(ModelError::BadTensor {
            path: path.to_owned(),
            tensor: name.into(),
            msg: format!("has shape {dims:?}, expected {rank} non-zero dimensions"),
        });
    }
    Ok(dims)
}

fn eva_config(eva: &Checkpoint, overrides: &VisionOverrides, path: &Path) -> Result<EvaConfig> {
    // cls_token (1, 1, W), patch_embed.proj.weight (W, 3, P, P), pos_embed (1, 1 + G², W).
    let width = dims_of(eva, path, "cls_token", 3)?[2];
    let patch_size = dims_of(eva, path, "patch_embed.proj.weight", 4)?[3];
    let positions = dims_of(eva, path, "pos_embed", 3)?[1];
    let grid = ((positions.saturating_sub(1)) as f64).sqrt() as usize;
    if grid * grid + 1 != positions {
        return Err(ModelError::bad_file(
            path,
            "cls_token / patch_embed / pos_embed do not describe a square ViT",
        ));
    }
    let mlp_hidden = dims_of(eva, path, "blocks.0.mlp.fc1.weight", 2)?[0];
    let blocks_in_file = (0..)
        .take_while(|i| eva.contains(&format!("blocks.{i}.norm1.weight")))
        .count();
    let depth = match overrides.depth {
        Some(depth) => depth,
        // The real model uses all blocks but the last (BLIP-2's second-to-last features).
        None => blocks_in_file.saturating_sub(1),
    };
    if depth == 0 || depth > blocks_in_file {
        return Err(ModelError::bad_file(
            path,
            format!("the file holds {blocks_in_file} blocks, cannot use {depth}"),
        ));
    }
    let num_heads = match overrides.num_heads {
        Some(heads) => heads,
        None if width % 88 == 0 => width / 88,
        None => {
            return Err(ModelError::bad_file(
                path,
                format!(
                    "EVA width {width} is not a multiple of 88: add a vision_config.json with \
                     num_heads to the model directory"
                ),
            ))
        }
    };
    if num_heads == 0 || width % num_heads != 0 {
        return Err(ModelError::bad_file(
            path,
            format!("num_heads {num_heads} does not divide the EVA width {width}"),
        ));
    }
    Ok(EvaConfig {
        width,
        patch_size,
        grid,
        depth,
        num_heads,
        mlp_hidden,
    })
}

impl LlamaVid {
    pub fn load(options: &LoadOptions) -> Result<Self> {
        let model_dir = &options.model_dir;
        if !model_dir.is_dir() {
            return Err(ModelError::MissingFile {
                what: "model directory",
                path: model_dir.clone(),
                hint: "point the model at a LLaMA-VID checkpoint directory (with config.json)"
                    .into(),
            });
        }
        files::check_model_dir(model_dir)?;
        let config_path = model_dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::MissingFile {
                what: "model configuration",
                path: config_path,
                hint: "this directory is not a LLaMA-VID checkpoint: it has no config.json".into(),
            });
        }
        let config: LlavaConfig = read_json(&config_path)?;
        config.validate(&config_path)?;
        let files = ModelFiles::resolve(
            model_dir,
            &config.mm_vision_tower,
            config.image_processor.as_deref(),
            options.vision_tower.as_deref(),
            options.bert_dir.as_deref(),
        )?;
        let mut notes = Vec::new();
        let (device, dtype) = (&options.device, options.dtype);
        let (precision, note) = options.precision.resolve(device);
        notes.extend(note);
        // Every linear layer built from here on converts its weights to `precision`.
        let _precision_scope = PrecisionScope::enter(precision);

        // Vision tower.
        let overrides: VisionOverrides = match &files.vision_overrides {
            Some(path) => read_json(path)?,
            None => VisionOverrides::default(),
        };
        let eva_file = Checkpoint::open_files(std::slice::from_ref(&files.vision_tower))?;
        let eva_cfg = eva_config(&eva_file, &overrides, &files.vision_tower)?;
        if eva_cfg.width != config.mm_hidden_size {
            return Err(ModelError::bad_file(
                &files.config,
                format!(
                    "mm_hidden_size {} differs from the EVA width {} of {}",
                    config.mm_hidden_size,
                    eva_cfg.width,
                    files.vision_tower.display()
                ),
            ));
        }
        let vision = EvaVit::new(&eva_cfg, eva_file.var_builder(dtype, device))?;

        // Preprocessing must produce the image size the position embedding was trained for.
        let preprocess = match &files.preprocessor_config {
            Some(path) => ClipPreprocess::from_config_file(path)?,
            None => {
                notes.push(format!(
                    "no preprocessor_config.json found for image_processor {:?}; using the CLIP \
                     constants at {} px",
                    config.image_processor,
                    eva_cfg.image_size()
                ));
                let size = eva_cfg.image_size();
                ClipPreprocess {
                    resize: ResizeTarget::ShortestEdge(size),
                    crop: Some((size, size)),
                    ..ClipPreprocess::clip_224()
                }
            }
        };
        let size = eva_cfg.image_size();
        let square = match (preprocess.crop, preprocess.resize) {
            (Some(crop), _) => crop == (size, size),
            (None, ResizeTarget::Exact { height, width }) => (height, width) == (size, size),
            _ => false,
        };
        if !square {
            return Err(ModelError::bad_file(
                files.preprocessor_config.as_deref().unwrap_or(&files.config),
                format!(
                    "the preprocessing (resize {:?}, crop {:?}) does not give the vision tower's \
                     {} px square (pos_embed grid {}); resizing position embeddings is not supported",
                    preprocess.resize,
                    preprocess.crop,
                    eva_cfg.image_size(),
                    eva_cfg.grid
                ),
            ));
        }

        // Q-Former, projectors and LLM from the HF checkpoint.
        let bert: BertConfig = read_json(&files.bert_config)?;
        bert.validate(&files.bert_config)?;
        let qformer_positions = bert.max_position_embeddings;
        let hf = Checkpoint::open_model_dir(model_dir, options.weight_format)?;
        let word_rows = dims_of(
            &hf,
            model_dir,
            "model.vlm_att_encoder.bert.embeddings.word_embeddings.weight",
            2,
        )?[0];
        let token_cfg = TokenConfig {
            qformer: QFormerConfig {
                bert,
                vocab_rows: word_rows,
                encoder_width: eva_cfg.width,
            },
            num_queries: config.num_query,
            vision_width: eva_cfg.width,
            llm_width: config.hidden_size,
            grid: eva_cfg.grid,
            pooling: config.content_pooling(&files.config)?,
            projector_type: config.mm_projector_type.clone(),
        };
        let vb = hf.var_builder(dtype, device);
        let tokens = TokenGenerator::new(&token_cfg, vb.pp("model"))?;
        let llm = match options.language_model {
            LanguageModelWeights::All => Llama::new(&config, vb)?,
            LanguageModelWeights::EmbeddingsOnly => Llama::embeddings_only(&config, vb)?,
        };

        let llm_tokenizer = LlamaTokenizer::from_model_dir(model_dir)?;
        let qformer_tokenizer = BertTokenizer::from_vocab_file(&files.bert_vocab)?;

        Ok(Self {
            files,
            config,
            preprocess,
            vision,
            tokens,
            llm,
            llm_tokenizer,
            qformer_tokenizer,
            qformer_positions,
            device: device.clone(),
            dtype,
            precision,
            notes,
        })
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The arithmetic of the linear layers, as resolved at load (never `Auto`).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Things the loader decided that a user may want to know (fallbacks taken).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn preprocessing(&self) -> &ClipPreprocess {
        &self.preprocess
    }

    pub fn vision(&self) -> &EvaVit {
        &self.vision
    }

    pub fn token_generator(&self) -> &TokenGenerator {
        &self.tokens
    }

    pub fn llm(&self) -> &Llama {
        &self.llm
    }

    pub fn llm_tokenizer(&self) -> &LlamaTokenizer {
        &self.llm_tokenizer
    }

    pub fn qformer_tokenizer(&self) -> &BertTokenizer {
        &self.qformer_tokenizer
    }

    /// LLM tokens each frame becomes: its context token and its content token(s).
    pub fn tokens_per_frame(&self) -> usize {
        1 + self.tokens.content_tokens_per_frame()
    }

    /// Prepares `question` once: BERT ids for the Q-Former, and the `vicuna_v1` prompt
    /// tokenized chunk by chunk around its image and embedded. The question is text: a
    /// `<image>` or a special token's text inside it is tokenized as the characters it is.
    pub fn prompt(&self, question: &str) -> Result<CaptionPrompt> {
        // The reference truncates to 256 BERT tokens; a Q-Former with fewer positions (the
        // fixtures') takes fewer.
        let qformer_len = QFORMER_MAX_TOKENS.min(self.qformer_positions);
        let qformer_ids = self
            .qformer_tokenizer
            .encode_literal_with_max_len(question, qformer_len)?;
        let guidance = self.tokens.text_guidance(&qformer_ids)?;
        let parts = PromptIds::for_question(&self.llm_tokenizer, question)?;
        let input_ids = parts
            .before
            .iter()
            .map(|&id| i64::from(id))
            .chain([IMAGE_TOKEN_INDEX])
            .chain(parts.after.iter().map(|&id| i64::from(id)))
            .collect();
        Ok(CaptionPrompt {
            question: question.to_owned(),
            guidance,
            before: self.llm.embed(&parts.before)?,
            after: self.llm.embed(&parts.after)?,
            input_ids,
        })
    }

    /// Frames of video that fit in the language model's context next to `prompt` and a caption
    /// of `max_new_tokens`: the window's bound besides its duration (0 when not even one frame
    /// fits; captions are then shortened to make room for one).
    pub fn frames_that_fit(&self, prompt: &CaptionPrompt, max_new_tokens: usize) -> usize {
        let room = self
            .llm
            .max_positions()
            .saturating_sub(prompt.len() + max_new_tokens);
        room / self.tokens_per_frame()
    }

    /// A prompt from ids tokenized elsewhere: the LLM ids with the image placeholder (-200)
    /// and the Q-Former's BERT ids (benchmarks feed recorded ids this way).
    pub fn prompt_from_ids(
        &self,
        question: &str,
        input_ids: Vec<i64>,
        qformer_ids: &[u32],
    ) -> Result<CaptionPrompt> {
        let guidance = self.tokens.text_guidance(qformer_ids)?;
        let parts = split_at_image(&input_ids)?;
        Ok(CaptionPrompt {
            question: question.to_owned(),
            guidance,
            before: self.llm.embed(&parts.before)?,
            after: self.llm.embed(&parts.after)?,
            input_ids,
        })
    }

    /// Frames to pixels (B, 3, S, S) on the compute device.
    pub fn preprocess(&self, frames: &[FrameView]) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(device) = &self.device {
            // Only the sampled frame's planes are uploaded; the one-pass kernel does the
            // conversion, resize, crop and normalisation on the GPU (kernels/preprocess).
            let mut pixels = Vec::with_capacity(frames.len());
            for frame in frames {
                frame.validate()?;
                let plan = llamavid_kernels::PreprocessPlan::new(
                    device,
                    self.preprocess.kernel_params(frame),
                )?;
                pixels.push(plan.run_planes(&frame.planes, self.dtype)?);
            }
            return Ok(Tensor::stack(&pixels, 0)?);
        }
        let pixels = self.preprocess.tensor(frames, &self.device)?;
        Ok(pixels.to_dtype(self.dtype)?)
    }

    /// Pixels (B, 3, S, S) to frame tokens (B, tokens_per_frame, H): context token first.
    pub fn encode_pixels(&self, pixels: &Tensor, prompt: &CaptionPrompt) -> Result<Tensor> {
        self.encode_pixels_cancellable(pixels, prompt, Cancel::NEVER)
    }

    /// [`Self::encode_pixels`], checking `cancel` between layers.
    pub fn encode_pixels_cancellable(
        &self,
        pixels: &Tensor,
        prompt: &CaptionPrompt,
        cancel: Cancel,
    ) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let features = self
                .vision
                .forward_cancellable(&pixels.to_dtype(self.dtype)?, cancel)?;
            self.tokens
                .forward_cancellable(&prompt.guidance, &features, cancel)
        };
        run().map_err(cancelled_or)
    }

    /// Raw frames to frame tokens (B, tokens_per_frame, H).
    pub fn encode_frames(&self, frames: &[FrameView], prompt: &CaptionPrompt) -> Result<Tensor> {
        self.encode_frames_cancellable(frames, prompt, Cancel::NEVER)
    }

    /// [`Self::encode_frames`], checking `cancel` between layers: a cancelled encode returns
    /// [`ModelError::Cancelled`] within one layer's time.
    pub fn encode_frames_cancellable(
        &self,
        frames: &[FrameView],
        prompt: &CaptionPrompt,
        cancel: Cancel,
    ) -> Result<Tensor> {
        cancel.check().map_err(cancelled_or)?;
        self.encode_pixels_cancellable(&self.preprocess(frames)?, prompt, cancel)
    }

    /// The LLM input: prompt embeddings with the video tokens (N, H) spliced at `<image>`.
    pub fn input_embeddings(
        &self,
        prompt: &CaptionPrompt,
        video_tokens: &Tensor,
    ) -> Result<Tensor> {
        let video = video_tokens.to_dtype(self.dtype)?.unsqueeze(0)?;
        Ok(Tensor::cat(&[&prompt.before, &video, &prompt.after], 1)?)
    }

    /// Prefill on `embeddings` (1, S, H) then decode token by token with the KV cache until
    /// EOS, `max_new_tokens` or the context is full. `cancel` is checked between layers (and
    /// so between tokens).
    pub fn generate(
        &self,
        embeddings: &Tensor,
        params: &GenerationParams,
        keep_step_logits: bool,
        cancel: Option<&AtomicBool>,
    ) -> Result<Generation> {
        self.generate_cancellable(
            embeddings,
            params,
            keep_step_logits,
            Cancel::from_option(cancel),
        )
    }

    /// [`Self::generate`] with any [`Cancel`], checked before every layer of the prefill and
    /// of each step: a cancelled generation returns [`ModelError::Cancelled`] within one
    /// layer's time.
    pub fn generate_cancellable(
        &self,
        embeddings: &Tensor,
        params: &GenerationParams,
        keep_step_logits: bool,
        cancel: Cancel,
    ) -> Result<Generation> {
        if !self.llm.has_decoder() {
            return Err(ModelError::InvalidInput(
                "this model was loaded with the token embeddings only (its language model runs \
                 on a server): it cannot generate locally"
                    .into(),
            ));
        }
        let prefill_len = embeddings.dim(1)?;
        let room = self.llm.max_positions().saturating_sub(prefill_len);
        let max_new = params.max_new_tokens.min(room + 1);
        let mut cache = self.llm.new_cache(prefill_len + max_new);
        let mut sampler = Sampler::new(params);
        let eos = self.llm_tokenizer.eos_id();
        let mut out = Generation {
            token_ids: Vec::new(),
            step_logits: Vec::new(),
            stopped_at_eos: false,
        };
        if max_new == 0 {
            return Ok(out);
        }
        let mut logits = self
            .llm
            .forward_cancellable(
                embeddings,
                &mut cache,
                LogitsFor::LastPosition,
                None,
                cancel,
            )
            .map_err(cancelled_or)?;
        loop {
            if cancel.is_cancelled() {
                return Err(ModelError::Cancelled);
            }
            let row = logits.flatten_all()?;
            let token = sampler.next(&row.to_vec1::<f32>()?);
            if keep_step_logits {
                out.step_logits.push(row);
            }
            if token == eos {
                out.stopped_at_eos = true;
                break;
            }
            out.token_ids.push(token);
            if out.token_ids.len() >= max_new {
                break;
            }
            let next = self.llm.embed(&[token])?;
            logits = self
                .llm
                .forward_cancellable(&next, &mut cache, LogitsFor::LastPosition, None, cancel)
                .map_err(cancelled_or)?;
        }
        Ok(out)
    }

    /// Captions a window of frame tokens (N, H), laid out frame by frame.
    pub fn caption(
        &self,
        video_tokens: &Tensor,
        prompt: &CaptionPrompt,
        params: &GenerationParams,
        cancel: Option<&AtomicBool>,
    ) -> Result<Caption> {
        let embeddings = self.input_embeddings(prompt, video_tokens)?;
        let generation = self.generate(&embeddings, params, false, cancel)?;
        self.caption_from_ids(generation.token_ids)
    }

    /// The caption of generated ids: decoded and cleaned as the reference does.
    pub fn caption_from_ids(&self, token_ids: Vec<u32>) -> Result<Caption> {
        let text = self.llm_tokenizer.decode(&token_ids)?;
        Ok(Caption {
            text: clean_answer(&text).to_owned(),
            token_ids,
        })
    }
}

/// `Cancelled` when `error` is what [`Cancel::check`] returns, the error itself otherwise.
fn cancelled_or(error: candle_core::Error) -> ModelError {
    if matches!(&error, candle_core::Error::Msg(m) if m == CANCELLED) {
        ModelError::Cancelled
    } else {
        ModelError::Tensor(error)
    }
}
