//! Captions a video file or a directory of frames with a LLaMA-VID model, outside GStreamer
//! pipelines: for users who want one caption of a clip, and for debugging the model.
//!
//! ```text
//! llamavid-caption --model DIR|owner/name[@revision] [--prompt TEXT]
//!                  [--vision-tower FILE|URL|owner/name/path] [--max-new-tokens N]
//!                  [--temperature T] [--top-p P] [--seed S] [--max-frames N] [--fps F]
//!                  [--weights auto|bin|safetensors] [--json] [--llm-gguf FILE]
//!                  [--llm-server URL --llm-server-model NAME [--llm-server-timeout SECONDS]]
//!                  VIDEO_OR_FRAME_DIR
//! ```
//! A hub id is fetched into the Hugging Face cache first, with a progress bar (HF_ENDPOINT,
//! HF_HOME, HF_TOKEN, HF_HUB_OFFLINE apply, as for the element).
//!
//! With `--llm-server`, the language model runs on that vLLM server (started with
//! `--enable-prompt-embeds`, serving the output of `llamavid-export-llm` under NAME): only the
//! vision side and the token embeddings are loaded here. An API key is read from
//! `LLAMAVID_LLM_SERVER_API_KEY`. `--json` prints `{"text": ..., "token_ids": [...]}`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gstllamavid::captioner::BatchLimits;
use gstllamavid::model::preprocess::FrameView;
use gstllamavid::model::remote::{RemoteLanguageModel, ServerConfig};
use gstllamavid::model::{
    Cancel, FrameToEncode, GenerationParams, LanguageModelWeights, LlamaVid, LoadOptions,
    WeightFormat,
};
use llamavid_examples::progress::fetch_model;
use llamavid_examples::{decode_image_dir, decode_video};

const USAGE: &str = "usage: llamavid-caption --model DIR|owner/name[@revision] [--prompt TEXT] \
[--vision-tower FILE|URL|owner/name/path] \
[--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--max-frames N] [--fps F] \
[--weights auto|bin|safetensors] [--json] [--llm-gguf FILE] [--llm-server URL --llm-server-model NAME \
[--llm-server-timeout SECONDS]] VIDEO_OR_FRAME_DIR";

struct Args {
    model: String,
    input: PathBuf,
    prompt: String,
    vision_tower: Option<String>,
    llm_gguf: Option<PathBuf>,
    params: GenerationParams,
    max_frames: usize,
    fps: f64,
    weights: WeightFormat,
    json: bool,
    llm_server: Option<ServerConfig>,
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let mut input = None;
    let mut prompt = "Describe what is happening in the video.".to_owned();
    let mut vision_tower = None;
    let mut llm_gguf = None;
    let mut params = GenerationParams {
        max_new_tokens: 128,
        ..GenerationParams::default()
    };
    let mut max_frames = 180;
    let mut fps = 1.0;
    let mut weights = WeightFormat::Auto;
    let mut json = false;
    let mut llm_server = None;
    let mut llm_server_model = None;
    let mut llm_server_timeout = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--model" => model = Some(value()?),
            "--prompt" => prompt = value()?,
            "--vision-tower" => vision_tower = Some(value()?),
            "--llm-gguf" => llm_gguf = Some(PathBuf::from(value()?)),
            "--max-new-tokens" => params.max_new_tokens = value()?.parse()?,
            "--temperature" => params.temperature = value()?.parse()?,
            "--top-p" => params.top_p = value()?.parse()?,
            "--seed" => params.seed = value()?.parse()?,
            "--max-frames" => max_frames = value()?.parse()?,
            "--fps" => fps = value()?.parse()?,
            "--json" => json = true,
            "--llm-server" => llm_server = Some(value()?),
            "--llm-server-model" => llm_server_model = Some(value()?),
            "--llm-server-timeout" => llm_server_timeout = Some(value()?.parse::<f64>()?),
            "--weights" => {
                weights = value()?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--weights: {e}\n{USAGE}"))?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other if other.starts_with('-') => bail!("unknown option {other}\n{USAGE}"),
            other => input = Some(PathBuf::from(other)),
        }
    }
    let llm_server = match (llm_server, llm_server_model) {
        (Some(url), Some(name)) => {
            let mut config = ServerConfig::new(url, name);
            config.api_key = ServerConfig::api_key_from_env();
            if let Some(seconds) = llm_server_timeout {
                config.request_timeout = std::time::Duration::from_secs_f64(seconds);
            }
            Some(config)
        }
        (None, None) => None,
        _ => bail!("--llm-server and --llm-server-model go together\n{USAGE}"),
    };
    Ok(Args {
        model: model.with_context(|| format!("--model is required\n{USAGE}"))?,
        input: input
            .with_context(|| format!("a video file or frame directory is required\n{USAGE}"))?,
        prompt,
        vision_tower,
        llm_gguf,
        params,
        max_frames,
        fps,
        weights,
        json,
        llm_server,
    })
}

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn run() -> Result<()> {
    let args = parse_args()?;
    gst::init()?;

    let fetched = fetch_model(&args.model, args.vision_tower.as_deref(), args.weights)?;
    let started = Instant::now();
    let mut options = LoadOptions::new(&fetched.model_dir);
    options.vision_tower = fetched.vision_tower.clone();
    options.bert_dir = fetched.bert_dir.clone();
    options.llm_gguf = args.llm_gguf.clone();
    options.weight_format = args.weights;
    let remote = match &args.llm_server {
        Some(config) => {
            // The decoder runs on the server: only the token embeddings are needed here.
            options.language_model = LanguageModelWeights::EmbeddingsOnly;
            Some(RemoteLanguageModel::new(config.clone())?)
        }
        None => None,
    };
    let model = LlamaVid::load(&options)?;
    for note in model.notes() {
        eprintln!("note: {note}");
    }
    eprintln!("model loaded in {:.2?}", started.elapsed());

    let frames = if args.input.is_dir() {
        decode_image_dir(&args.input, args.max_frames)?
    } else {
        decode_video(&args.input, args.fps, args.max_frames)?
    };
    eprintln!("{} frames sampled", frames.len());

    let started = Instant::now();
    let prompt = model.prompt(&args.prompt)?;
    // Frames go to the model in batches of the size the element's scheduler uses by default on
    // this device (a GPU runs each batch as one; the CPU runs its frames side by side).
    let batch = BatchLimits::default_for(!model.device().is_cpu()).encode;
    let mut tokens = Vec::with_capacity(frames.len());
    for (chunk, batch_frames) in frames.chunks(batch).enumerate() {
        let items: Vec<FrameToEncode> = batch_frames
            .iter()
            .map(|frame| FrameToEncode {
                frame: FrameView::packed_rgb(frame.width, frame.height, &frame.data),
                prompt: &prompt,
            })
            .collect();
        for (i, result) in model
            .encode_batch(&items, Cancel::NEVER)?
            .into_iter()
            .enumerate()
        {
            let index = chunk * batch + i;
            tokens.push(result.with_context(|| format!("frame {index} could not be encoded"))?);
        }
    }
    let video = candle_core::Tensor::cat(&tokens, 0)?;
    eprintln!(
        "encoded in {:.2?} ({} tokens)",
        started.elapsed(),
        video.dim(0)?
    );

    let started = Instant::now();
    let caption = match &remote {
        Some(remote) => model.caption_remote(&video, &prompt, &args.params, remote, None)?,
        None => model.caption(&video, &prompt, &args.params, None)?,
    };
    eprintln!(
        "captioned in {:.2?} ({} tokens{})",
        started.elapsed(),
        caption.token_ids.len(),
        match &args.llm_server {
            Some(config) => format!(", by {} at {}", config.model, config.url),
            None => String::new(),
        }
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"text": caption.text, "token_ids": caption.token_ids})
        );
    } else {
        println!("{}", caption.text);
    }
    Ok(())
}
