//! The loaded model and the three operations the element needs: prepare a prompt once,
//! encode frames into their tokens, caption a window of tokens.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use llamavid_kernels::cpu::vit::VitProfile;
use llamavid_kernels::cpu::{host, CpuKernels, Isa};

use super::cancel::{cancelled_or, Cancel};
use super::checkpoint::Checkpoint;
use super::config::{read_json, BertConfig, LlavaConfig, VisionOverrides};
use super::eva::{EvaConfig, EvaVit};
use super::files::{self, ModelFiles};
use super::generation::CaptionSequence;
use super::gguf::GgufLlama;
use super::llama::{CheckpointWeights, Llama};
use super::nn::{LoadContext, Precision};
use super::options::{CpuLayers, LanguageModelWeights, LoadOptions};
use super::pool::ComputePool;
use super::prefix_cache::PrefixCache;
use super::preprocess::{ClipPreprocess, FrameView, ResizeTarget};
use super::prompt::{clean_answer, split_at_image, PromptIds, IMAGE_TOKEN_INDEX};
use super::qformer::{QFormerConfig, TextGuidance};
use super::sampling::GenerationParams;
use super::tokenizer::{BertTokenizer, LlamaTokenizer, QFORMER_MAX_TOKENS};
use super::tokens::{TokenConfig, TokenGenerator};
use super::{ModelError, Result};

/// A question prepared for captioning: its Q-Former guidance (used when encoding frames) and
/// the embedded prompt around the `<image>` placeholder (used when captioning).
#[derive(Clone, Debug)]
pub struct CaptionPrompt {
    pub question: String,
    /// The Q-Former's ids of the question: frames whose prompts have the same ids share one
    /// Q-Former batch in [`LlamaVid::encode_batch`].
    pub qformer_ids: Vec<u32>,
    pub guidance: TextGuidance,
    /// LLM ids with the image placeholder (-200), as the reference tokenizes them.
    pub input_ids: Vec<i64>,
    /// The LLM ids before the placeholder: the opening of every caption's context with this
    /// prompt (see [`LlamaVid::start_caption`]).
    before_ids: Vec<u32>,
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

/// One frame of a batched encode ([`LlamaVid::encode_batch`]) and the prompt that guides its
/// context token.
#[derive(Debug, Clone)]
pub struct FrameToEncode<'a> {
    pub frame: FrameView<'a>,
    pub prompt: &'a CaptionPrompt,
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
    /// Where all of the model's CPU work runs.
    pool: Arc<ComputePool>,
    /// What runs the model, in words (see [`LlamaVid::compute`]).
    compute: String,
    /// Keys and values of the prompts' openings ([`LoadOptions::reuse_prompt_prefix`]).
    prefixes: Option<PrefixCache>,
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

/// The language model from a GGUF file, checked against the checkpoint's configuration (the
/// projectors' width and the tokenizer's vocabulary must fit it); the layers built as `ctx`
/// says, the embedding from the checkpoint when the GGUF has none.
fn load_gguf_llm(
    path: &Path,
    config: &LlavaConfig,
    config_path: &Path,
    checkpoint: &CheckpointWeights,
    dtype: DType,
    device: &Device,
) -> Result<Llama> {
    let gguf = GgufLlama::open(path)?;
    let llm = gguf.config();
    for (what, ours, theirs) in [
        (
            "hidden_size (llama.embedding_length)",
            config.hidden_size,
            llm.hidden_size,
        ),
        (
            "vocab_size (token_embd rows)",
            config.vocab_size,
            llm.vocab_size,
        ),
    ] {
        if ours != theirs {
            return Err(ModelError::bad_file(
                path,
                format!(
                    "{what} is {theirs}, but the checkpoint's {} says {ours}: this GGUF holds \
                     another language model than the one the projectors were trained for",
                    config_path.display()
                ),
            ));
        }
    }
    let weights = gguf.weights(dtype, device, checkpoint.ctx, Some(checkpoint));
    Ok(Llama::from_weights(llm, &weights, dtype, device)?)
}

/// The CPU kernels a load asks for, with AMX permission requested only when bf16/int8
/// products will use it (a process-wide effect, see the README).
fn cpu_kernels(options: &LoadOptions, notes: &mut Vec<String>) -> CpuKernels {
    let mut isa = Isa::detect(options.cpu_isa);
    // Where AMX would run: MKL's bf16 and int8 GEMMs (`mkl` builds; `auto` may become bf16),
    // and in every build our int8 kernel for batched decode steps.
    let reduced = options.precision != Precision::F32;
    let uses_amx =
        (reduced && llamavid_kernels::cpu::HAS_MKL) || options.precision == Precision::Int8;
    if isa.amx() && uses_amx {
        isa = isa.request_amx();
        if !isa.amx() {
            notes.push(
                "the operating system refused this process the AMX tile state; bf16/int8 \
                 products run without AMX"
                    .into(),
            );
        }
    } else {
        // Not needed: never ask.
        isa = isa.narrow(llamavid_kernels::cpu::IsaLimit::Avx512);
    }
    let kernels = CpuKernels::new(isa);
    match options.row_block {
        Some(rows) => kernels.with_row_block(rows),
        None => kernels,
    }
}

/// What the modules are built with, and the precision they run (resolved, never `Auto`).
fn load_context(options: &LoadOptions, notes: &mut Vec<String>) -> (LoadContext, Precision) {
    let device = &options.device;
    let kernels = (device.is_cpu() && options.cpu_layers == CpuLayers::Fused)
        .then(|| cpu_kernels(options, notes));
    let (precision, note) = options.precision.resolve(device, kernels);
    notes.extend(note);
    if !device.is_cpu() {
        return (LoadContext::candle(), precision);
    }
    if options.tune_allocator {
        host::tune_allocator();
    }
    let Some(kernels) = kernels else {
        return (LoadContext::candle(), precision);
    };
    let ctx = LoadContext::cpu(precision, kernels);
    let ctx = if options.profile {
        ctx.with_vit_profile(Arc::new(VitProfile::default()))
    } else {
        ctx
    };
    (ctx, precision)
}

/// The compute of a loaded model in words, for logs.
fn describe_compute(options: &LoadOptions, ctx: &LoadContext, pool: &ComputePool) -> String {
    let threads = format!(
        "{} thread{}{}",
        pool.threads(),
        if pool.threads() == 1 { "" } else { "s" },
        if pool.lowered_priority() {
            " at lowered priority"
        } else {
            ""
        }
    );
    match ctx.cpu_kernels() {
        _ if !options.device.is_cpu() => {
            format!(
                "{:?} in {:?}; CPU work on {threads}",
                options.device, options.dtype
            )
        }
        None => format!("CPU, candle's layers in f32, {threads}"),
        Some(k) => format!(
            "CPU, {} products on the {} kernels{}, {threads}",
            ctx.precision(),
            k.isa(),
            if llamavid_kernels::cpu::HAS_MKL {
                " with MKL"
            } else {
                ""
            }
        ),
    }
}

impl LlamaVid {
    /// Loads the model. Everything it computes while loading (weight conversions) and later
    /// runs in its own thread pool (see [`LoadOptions::threads`]).
    pub fn load(options: &LoadOptions) -> Result<Self> {
        let pool = Arc::new(ComputePool::new(
            options.threads,
            options.lower_thread_priority,
        )?);
        let model_pool = pool.clone();
        pool.install(move || Self::load_in_pool(options, model_pool))
    }

    fn load_in_pool(options: &LoadOptions, pool: Arc<ComputePool>) -> Result<Self> {
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
        // Every linear layer built with `ctx` converts its weights to `precision`.
        let (ctx, precision) = load_context(options, &mut notes);
        let compute = describe_compute(options, &ctx, &pool);

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
        let vision = EvaVit::new(&eva_cfg, eva_file.var_builder(dtype, device), &ctx)?;

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
        let tokens = TokenGenerator::new(&token_cfg, vb.pp("model"), &ctx)?;
        let llm = match (options.language_model, &options.llm_gguf) {
            (LanguageModelWeights::EmbeddingsOnly, _) => Llama::embeddings_only(&config, vb)?,
            (LanguageModelWeights::All, None) => Llama::new(&config, vb, &ctx)?,
            (LanguageModelWeights::All, Some(path)) => {
                let checkpoint = CheckpointWeights { vb, ctx: &ctx };
                load_gguf_llm(path, &config, &files.config, &checkpoint, dtype, device)?
            }
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
            pool,
            compute,
            prefixes: options.reuse_prompt_prefix.then(PrefixCache::default),
        })
    }

    /// Runs `f` in the model's thread pool: for callers that drive its parts (`vision()`,
    /// `token_generator()`, `llm()`) directly; the operations of `LlamaVid` itself do so already.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// The kernel each kind of product takes on this CPU, in words (benchmarks, logs).
    pub fn product_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        let frame = 1 + self.vision.config().num_patches();
        if let Some(qkv) = self.vision.first_qkv() {
            out.push(format!(
                "vision tower ({frame} rows per frame): {}",
                qkv.path(frame)
            ));
        }
        if let Some((q, lm_head)) = self.llm.sample_layers() {
            // Any product of more rows than the few-row kernels take goes the same way.
            out.push(format!("LLaMA prefill (many rows): {}", q.path(frame)));
            out.push(format!("LLaMA decode (1 row): {}", q.path(1)));
            out.push(format!("lm_head (1 row): {}", lm_head.path(1)));
        }
        out
    }

    /// The model's thread pool.
    pub fn pool(&self) -> &ComputePool {
        &self.pool
    }

    /// What runs the model, in words: device, precision, the CPU kernels chosen for this CPU,
    /// threads (for the element's log).
    pub fn compute(&self) -> &str {
        &self.compute
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
        self.install(|| {
            // The reference truncates to 256 BERT tokens; a Q-Former with fewer positions (the
            // fixtures') takes fewer.
            let qformer_len = QFORMER_MAX_TOKENS.min(self.qformer_positions);
            let qformer_ids = self
                .qformer_tokenizer
                .encode_literal_with_max_len(question, qformer_len)?;
            let parts = PromptIds::for_question(&self.llm_tokenizer, question)?;
            let input_ids = parts
                .before
                .iter()
                .map(|&id| i64::from(id))
                .chain([IMAGE_TOKEN_INDEX])
                .chain(parts.after.iter().map(|&id| i64::from(id)))
                .collect();
            self.prompt_from_ids(question, input_ids, &qformer_ids)
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
        self.install(|| {
            let guidance = self.tokens.text_guidance(qformer_ids)?;
            let parts = split_at_image(&input_ids)?;
            Ok(CaptionPrompt {
                question: question.to_owned(),
                qformer_ids: qformer_ids.to_vec(),
                guidance,
                before: self.llm.embed(&parts.before)?,
                after: self.llm.embed(&parts.after)?,
                before_ids: parts.before,
                input_ids,
            })
        })
    }

    /// Frames to pixels (B, 3, S, S) on the compute device.
    pub fn preprocess(&self, frames: &[FrameView]) -> Result<Tensor> {
        self.install(|| self.preprocess_in_pool(frames))
    }

    fn preprocess_in_pool(&self, frames: &[FrameView]) -> Result<Tensor> {
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
        self.install(run).map_err(cancelled_or)
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

    /// Frames of several streams, each with its own prompt, encoded together: every frame is
    /// checked and preprocessed on its own (a bad frame fails alone), the vision tower takes
    /// all good frames at once ([`Self::vision_features`]), and the prompt-dependent part (the
    /// Q-Former guided by the question, the context token) runs once per group of frames whose
    /// prompts have the same Q-Former ids. Returns one result per frame, in order: its tokens
    /// (tokens_per_frame, H), as [`Self::encode_frames`] gives them one at a time. `cancel`
    /// (checked between layers) fails the whole call with [`ModelError::Cancelled`].
    pub fn encode_batch(
        &self,
        frames: &[FrameToEncode],
        cancel: Cancel,
    ) -> Result<Vec<Result<Tensor>>> {
        self.install(|| {
            cancel.check().map_err(cancelled_or)?;
            // `None` for the good frames until their tokens are known.
            let mut results: Vec<Option<Result<Tensor>>> = Vec::with_capacity(frames.len());
            let mut good = Vec::new();
            let mut pixels = Vec::new();
            for (i, item) in frames.iter().enumerate() {
                match self.preprocess_in_pool(std::slice::from_ref(&item.frame)) {
                    Ok(p) => {
                        good.push(i);
                        pixels.push(p);
                        results.push(None);
                    }
                    Err(e) => results.push(Some(Err(e))),
                }
            }
            let run = || -> candle_core::Result<Vec<(usize, Tensor)>> {
                let features = self.vision_features(&pixels, cancel)?;
                // Groups of the good frames (by their index in `features`) sharing Q-Former ids.
                let mut groups: Vec<(&CaptionPrompt, Vec<u32>)> = Vec::new();
                for (row, &i) in good.iter().enumerate() {
                    let prompt = frames[i].prompt;
                    match groups
                        .iter_mut()
                        .find(|(p, _)| p.qformer_ids == prompt.qformer_ids)
                    {
                        Some((_, rows)) => rows.push(row as u32),
                        None => groups.push((prompt, vec![row as u32])),
                    }
                }
                let mut out = Vec::with_capacity(good.len());
                for (prompt, rows) in groups {
                    let group = match rows.len() == good.len() {
                        true => features.clone(),
                        false => features
                            .index_select(&Tensor::new(rows.as_slice(), features.device())?, 0)?,
                    };
                    let tokens =
                        self.tokens
                            .forward_cancellable(&prompt.guidance, &group, cancel)?;
                    for (j, &row) in rows.iter().enumerate() {
                        out.push((good[row as usize], tokens.get(j)?));
                    }
                }
                Ok(out)
            };
            if !good.is_empty() {
                for (i, tokens) in run().map_err(cancelled_or)? {
                    results[i] = Some(Ok(tokens));
                }
            }
            Ok(results
                .into_iter()
                .map(|r| r.expect("every good frame has its tokens"))
                .collect())
        })
    }

    /// The vision tower's features (B, 1 + patches, width) of the frames' `pixels` (each
    /// (1, 3, S, S)). On a GPU, one batch. On the CPU with more than one thread, the frames
    /// run side by side, one task per frame (each frame's products still split over any
    /// thread that is free). Whole encodes measured so (multi_stream, int8 on AMX, four
    /// streams): 0.97-1.04x the frames/s of one worker per stream, against 0.91-0.93x for the
    /// tower run once over the batch. Most likely two frames in the same layer at once read
    /// its weights from memory about once, as a batch does, while each keeps one frame's
    /// activations in cache, and what one frame runs on one thread overlaps the other's
    /// products. A frame's features are the ones it gets alone either way (the tower's sums
    /// never depend on the batch).
    fn vision_features(&self, pixels: &[Tensor], cancel: Cancel) -> candle_core::Result<Tensor> {
        let side_by_side = self.device.is_cpu() && self.pool.threads() > 1 && pixels.len() > 1;
        if !side_by_side {
            let pixels = Tensor::cat(pixels, 0)?.to_dtype(self.dtype)?;
            return self.vision.forward_cancellable(&pixels, cancel);
        }
        use rayon::prelude::*;
        let features = pixels
            .par_iter()
            .map(|p| {
                self.vision
                    .forward_cancellable(&p.to_dtype(self.dtype)?, cancel)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&features, 0)
    }

    /// The LLM input: prompt embeddings with the video tokens (N, H) spliced at `<image>`.
    pub fn input_embeddings(
        &self,
        prompt: &CaptionPrompt,
        video_tokens: &Tensor,
    ) -> Result<Tensor> {
        self.install(|| {
            let video = video_tokens.to_dtype(self.dtype)?.unsqueeze(0)?;
            Ok(Tensor::cat(&[&prompt.before, &video, &prompt.after], 1)?)
        })
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
        let mut sequence = self.start_sequence(embeddings, params)?;
        if keep_step_logits {
            sequence = sequence.keeping_step_logits();
        }
        self.finish_alone(sequence, cancel)
    }

    /// Steps `sequence` on its own until it finishes.
    fn finish_alone(&self, mut sequence: CaptionSequence, cancel: Cancel) -> Result<Generation> {
        while !sequence.is_finished() {
            self.step(&mut [&mut sequence], cancel)?;
        }
        Ok(sequence.into_generation())
    }

    /// A sequence that captions the window of frame tokens `video_tokens` (N, H) with
    /// `prompt` (see [`Self::start_sequence`] for what follows). With
    /// [`LoadOptions::reuse_prompt_prefix`], its context starts from the kept keys and values
    /// of the prompt's text before the video (computed by the first caption that needs them),
    /// and its first step prefills only the rest: the same arithmetic on the same rows (the
    /// `reused_prompt_prefix_*` tests hold it to the whole prefill).
    pub fn start_caption(
        &self,
        prompt: &CaptionPrompt,
        video_tokens: &Tensor,
        params: &GenerationParams,
    ) -> Result<CaptionSequence> {
        let embeddings = self.input_embeddings(prompt, video_tokens)?;
        let prefix = match &self.prefixes {
            Some(kept) if !prompt.before_ids.is_empty() && self.llm.has_decoder() => {
                Some(self.install(|| kept.get_or_compute(&self.llm, &prompt.before_ids))?)
            }
            _ => None,
        };
        self.start_sequence_after(&embeddings, prefix.as_deref(), params)
    }

    /// Captions a window of frame tokens (N, H), laid out frame by frame.
    pub fn caption(
        &self,
        video_tokens: &Tensor,
        prompt: &CaptionPrompt,
        params: &GenerationParams,
        cancel: Option<&AtomicBool>,
    ) -> Result<Caption> {
        let sequence = self.start_caption(prompt, video_tokens, params)?;
        let generation = self.finish_alone(sequence, Cancel::from_option(cancel))?;
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
