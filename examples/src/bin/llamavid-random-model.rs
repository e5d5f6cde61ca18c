//! Writes a complete LLaMA-VID deployment with random weights, of the shape a JSON such as
//! `shared/bench/cpu-bench.json` describes, in the release file formats: the HF side as sharded
//! PyTorch zip pickles with their index, the EVA tower as a flat `.pth` state dict (with the
//! extra trailing block the real file has), `bert-base-uncased` config and vocabulary, the CLIP
//! preprocessing config and a LLaMA tokenizer. The result loads with `LlamaVid::load` like a
//! user's model, so benchmarks see real load times and resident memory.
//!
//! ```text
//! llamavid-random-model --shape ../shared/bench/cpu-bench.json --out bench-models/cpu-bench
//!                       [--dtype f32|bf16|f16] [--seed N] [--shard-gb 2] [--force]
//! ```
//!
//! Data is generated and written in streaming fashion (a few MB in memory at a time). The
//! output must be outside the repository or in its git-ignored `bench-models/` folder.

#[path = "../random_model.rs"]
mod random_model;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use gstllamavid::model::torch_save::{self, StorageType};
use random_model::{count, eva_tensors, fill_f32, hf_tensors, ModelShape, Rng, TensorSpec};

const USAGE: &str = "usage: llamavid-random-model --shape FILE.json --out DIR [--dtype f32|bf16] \
[--seed N] [--shard-gb GB] [--name MODEL_DIR_NAME] [--force]";

struct Args {
    shape: PathBuf,
    out: PathBuf,
    dtype: StorageType,
    seed: Option<u64>,
    shard_bytes: u64,
    name: String,
    force: bool,
}

fn parse_args() -> Result<Args> {
    let mut shape = None;
    let mut out = None;
    let mut dtype = StorageType::F32;
    let mut seed = None;
    let mut shard_gb = 2.0f64;
    let mut name = "llama-vid-bench-video".to_owned();
    let mut force = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--shape" => shape = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "f32" | "float32" => StorageType::F32,
                    "bf16" | "bfloat16" => StorageType::Bf16,
                    "f16" | "float16" => StorageType::F16,
                    other => bail!("unknown --dtype {other} (f32, bf16 or f16)"),
                }
            }
            "--seed" => seed = Some(value()?.parse()?),
            "--shard-gb" => shard_gb = value()?.parse()?,
            "--name" => name = value()?,
            "--force" => force = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if !name.contains("vid") {
        bail!("the model directory name must contain \"vid\" (the reference loader requires it)");
    }
    Ok(Args {
        shape: shape.with_context(|| format!("--shape is required\n{USAGE}"))?,
        out: out.with_context(|| format!("--out is required\n{USAGE}"))?,
        dtype,
        seed,
        shard_bytes: (shard_gb * 1e9) as u64,
        name,
        force,
    })
}

/// Refuses to write into the repository, except into its git-ignored `bench-models/`.
fn check_output_dir(out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    if out.starts_with(&repo) && !out.starts_with(repo.join("bench-models")) {
        bail!(
            "{} is inside the repository: write random models outside it or under {}/bench-models \
             (git-ignored); they must never be committed",
            out.display(),
            repo.display()
        );
    }
    Ok(out)
}

fn main() {
    llamavid_examples::exit_on_error(run());
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let text = std::fs::read_to_string(&args.shape)
        .with_context(|| format!("reading {}", args.shape.display()))?;
    let mut shape = ModelShape::from_json(&serde_json::from_str(&text)?)
        .with_context(|| format!("in {}", args.shape.display()))?;
    if let Some(seed) = args.seed {
        shape.seed = seed;
    }
    let out = check_output_dir(&args.out)?;
    let model_dir = out.join(&args.name);
    if model_dir.join("config.json").exists() && !args.force {
        bail!(
            "{} already holds a model (use --force to overwrite)",
            model_dir.display()
        );
    }
    std::fs::create_dir_all(&model_dir)?;

    let eva = eva_tensors(&shape);
    let hf = hf_tensors(&shape);
    let mut all = eva.clone();
    all.extend(hf.iter().cloned());
    let counts = count(&all);
    println!("parameters (the model as built; buffers and the extra EVA block not counted):");
    let expected = shape.expected_counts;
    let mut mismatch = false;
    for (part, ours, theirs) in [
        ("vision", counts.vision, expected.map(|e| e.vision)),
        ("qformer", counts.qformer, expected.map(|e| e.qformer)),
        (
            "projectors",
            counts.projectors,
            expected.map(|e| e.projectors),
        ),
        ("llm", counts.llm, expected.map(|e| e.llm)),
        ("total", counts.total(), expected.map(|e| e.total())),
    ] {
        let check = match theirs {
            Some(t) if t == ours => "matches the shape file".to_owned(),
            Some(t) => {
                mismatch = true;
                format!("MISMATCH: the shape file says {t}")
            }
            None => "(no param_counts in the shape file)".to_owned(),
        };
        println!("  {part:<11} {ours:>14}  {check}");
    }
    if mismatch {
        bail!("parameter counts differ from the shape file's param_counts");
    }

    let started = Instant::now();
    write_configs(&shape, &args, &out, &model_dir)?;

    // EVA: one flat state dict.
    let eva_path = out.join("model_zoo/LAVIS/eva_vit_g.pth");
    std::fs::create_dir_all(eva_path.parent().unwrap())?;
    write_torch_file(&eva_path, &eva, args.dtype, &shape)?;

    // HF side: shards of at most shard_bytes (a tensor never straddles two).
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut shard_size = 0u64;
    for spec in &hf {
        let bytes = spec.entry(args.dtype).bytes();
        if shard_size > 0 && shard_size + bytes > args.shard_bytes {
            shards.push(Vec::new());
            shard_size = 0;
        }
        shard_size += bytes;
        shards.last_mut().unwrap().push(spec.clone());
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("pytorch_model-{:05}-of-{:05}.bin", i + 1, n);
        for spec in shard {
            weight_map.insert(spec.name.clone(), file.clone());
            total_size += spec.entry(args.dtype).bytes();
        }
        write_torch_file(&model_dir.join(&file), shard, args.dtype, &shape)?;
    }
    write_json(
        &model_dir.join("pytorch_model.bin.index.json"),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    )?;
    println!(
        "wrote {} in {:.1} s ({} HF shards, dtype {:?}, seed {})",
        out.display(),
        started.elapsed().as_secs_f64(),
        n,
        args.dtype,
        shape.seed
    );
    println!("model directory: {}", model_dir.display());
    Ok(())
}

/// Streams `specs` into one `torch.save` file, generating values on a second thread.
fn write_torch_file(
    path: &Path,
    specs: &[TensorSpec],
    dtype: StorageType,
    shape: &ModelShape,
) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let started = Instant::now();
    let entries = specs.iter().map(|s| s.entry(dtype)).collect();
    let mut writer = torch_save::TorchFileWriter::create(path, entries)?;
    let (seed, std) = (shape.seed, shape.std);
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let producer = scope.spawn(move || {
            let mut values = vec![0f32; CHUNK];
            for spec in specs {
                let mut rng = Rng::for_tensor(seed, &spec.name);
                let numel = spec.numel();
                let mut done = 0;
                while done < numel {
                    let n = CHUNK.min(numel - done);
                    let chunk = &mut values[..n];
                    fill_f32(spec, std, &mut rng, done, chunk);
                    let bytes = encode(chunk, if spec.int64 { StorageType::I64 } else { dtype });
                    if tx.send(bytes).is_err() {
                        return;
                    }
                    done += n;
                }
            }
        });
        while writer.next_entry().is_some() {
            writer.write_next(|entry, sink| {
                let mut left = entry.bytes();
                while left > 0 {
                    let bytes = rx.recv().context("value generator stopped")?;
                    left -= bytes.len() as u64;
                    sink(&bytes)?;
                }
                anyhow::Ok(())
            })?;
        }
        producer
            .join()
            .map_err(|_| anyhow::anyhow!("value generator panicked"))?;
        Ok(())
    })?;
    writer.finish()?;
    let bytes = std::fs::metadata(path)?.len();
    println!(
        "  {} ({:.2} GB, {} tensors) in {:.1} s",
        path.display(),
        bytes as f64 / 1e9,
        specs.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn encode(values: &[f32], dtype: StorageType) -> Vec<u8> {
    match dtype {
        StorageType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StorageType::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        StorageType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        StorageType::I64 => values
            .iter()
            .flat_map(|&v| (v as i64).to_le_bytes())
            .collect(),
    }
}

fn torch_dtype_name(dtype: StorageType) -> &'static str {
    match dtype {
        StorageType::Bf16 => "bfloat16",
        StorageType::F16 => "float16",
        _ => "float32",
    }
}

fn write_configs(shape: &ModelShape, args: &Args, out: &Path, model_dir: &Path) -> Result<()> {
    let s = shape;
    let processor = format!("clip-patch14-{}", s.image_size);
    write_json(
        &model_dir.join("config.json"),
        &json!({
            "architectures": ["LlavaLlamaAttForCausalLM"],
            "bert_type": "qformer_pretrain",
            "bos_token_id": 1,
            "compress_type": s.compress_type,
            "eos_token_id": 2,
            "freeze_mm_mlp_adapter": false,
            "hidden_act": "silu",
            "hidden_size": s.llm_hidden,
            "image_aspect_ratio": "pad",
            "image_grid_pinpoints": null,
            "image_processor": format!("./llamavid/processor/{processor}"),
            "initializer_range": 0.02,
            "intermediate_size": s.llm_intermediate,
            "max_position_embeddings": s.llm_max_position,
            "max_token": 2048,
            "mm_hidden_size": s.vision_width,
            "mm_projector_type": s.projector_type,
            "mm_use_im_patch_token": false,
            "mm_use_im_start_end": false,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth",
            "model_type": "llava",
            "num_attention_heads": s.llm_heads,
            "num_hidden_layers": s.llm_layers,
            "num_key_value_heads": s.llm_kv_heads,
            "num_query": s.num_query,
            "pad_token_id": 0,
            "pretraining_tp": 1,
            "rms_norm_eps": s.rms_eps,
            "rope_scaling": null,
            "rope_theta": s.rope_theta,
            "tie_word_embeddings": false,
            "torch_dtype": torch_dtype_name(args.dtype),
            "transformers_version": "4.31.0",
            "tune_mm_mlp_adapter": false,
            "use_cache": true,
            "use_mm_proj": true,
            "vocab_size": s.llm_vocab
        }),
    )?;
    write_json(
        &model_dir.join("generation_config.json"),
        &json!({"_from_model_config": true, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0, "transformers_version": "4.31.0"}),
    )?;
    write_json(
        &model_dir.join("vision_config.json"),
        &json!({"num_heads": s.vision_heads, "depth": s.vision_depth_used}),
    )?;
    write_json(
        &model_dir.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "LlamaTokenizer", "add_bos_token": true,
                "add_eos_token": false, "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "pad_token": null, "clean_up_tokenization_spaces": false,
                "legacy": false, "model_max_length": 2048, "padding_side": "right",
                "sp_model_kwargs": {}}),
    )?;
    write_json(
        &model_dir.join("special_tokens_map.json"),
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "pad_token": "<unk>"}),
    )?;
    write_json(
        &model_dir.join("tokenizer.json"),
        &llama_tokenizer_json(s.llm_vocab)?,
    )?;

    let bert = out.join("bert-base-uncased");
    write_json(
        &bert.join("config.json"),
        &json!({
            "architectures": ["BertForMaskedLM"],
            "attention_probs_dropout_prob": 0.1,
            "gradient_checkpointing": false,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": s.bert_hidden,
            "initializer_range": 0.02,
            "intermediate_size": s.bert_intermediate,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": s.bert_max_position,
            "model_type": "bert",
            "num_attention_heads": s.bert_heads,
            "num_hidden_layers": s.bert_layers,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "transformers_version": "4.31.0",
            "type_vocab_size": 2,
            "use_cache": true,
            "vocab_size": s.bert_vocab
        }),
    )?;
    std::fs::write(bert.join("vocab.txt"), bert_vocab(s.bert_vocab)?)?;

    write_json(
        &out.join(format!(
            "llamavid/processor/{processor}/preprocessor_config.json"
        )),
        &json!({
            "crop_size": s.image_size,
            "do_center_crop": true,
            "do_normalize": true,
            "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": s.image_size
        }),
    )?;
    Ok(())
}

/// A `bert-base-uncased`-like vocabulary of exactly `size` lines: the specials at their usual
/// ids, the question's words, single characters and `##` pieces, then filler words.
fn bert_vocab(size: usize) -> Result<String> {
    let mut words: Vec<String> = vec!["[PAD]".into()];
    words.extend((0..99).map(|i| format!("[unused{i}]")));
    words.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    let mut seen: std::collections::HashSet<String> = words.iter().cloned().collect();
    let mut push = |w: String, words: &mut Vec<String>| {
        if seen.insert(w.clone()) {
            words.push(w);
        }
    };
    for c in "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~".chars() {
        push(c.to_string(), &mut words);
    }
    for w in [
        "the",
        "a",
        "video",
        "what",
        "is",
        "happening",
        "in",
        "describe",
        "this",
        "please",
        "briefly",
        "detail",
        "of",
        "and",
        "man",
        "woman",
        "person",
        "people",
    ] {
        push(w.to_string(), &mut words);
    }
    for c in "abcdefghijklmnopqrstuvwxyz0123456789".chars() {
        push(format!("##{c}"), &mut words);
    }
    let mut i = 0;
    while words.len() < size {
        push(format!("filler{i}"), &mut words);
        i += 1;
    }
    if words.len() != size {
        bail!("a BERT vocabulary of {size} entries is too small for the specials");
    }
    Ok(words.join("\n") + "\n")
}

/// A valid LLaMA-style `tokenizer.json`: BPE with byte fallback, `<unk>`/`<s>`/`</s>` at
/// 0/1/2, the 256 byte tokens, common single characters, then filler pieces up to `size`.
fn llama_tokenizer_json(size: usize) -> Result<serde_json::Value> {
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    vocab.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let mut seen: std::collections::HashSet<String> = vocab.iter().cloned().collect();
    let mut add = |p: String, vocab: &mut Vec<String>| {
        if seen.insert(p.clone()) {
            vocab.push(p);
        }
    };
    add("\u{2581}".into(), &mut vocab);
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-".chars() {
        add(c.to_string(), &mut vocab);
        add(format!("\u{2581}{c}"), &mut vocab);
    }
    let mut i = 0;
    while vocab.len() < size {
        add(format!("\u{2581}filler{i}"), &mut vocab);
        i += 1;
    }
    if vocab.len() != size {
        bail!("a LLaMA vocabulary of {size} entries is too small for the byte tokens");
    }
    // Merges that build the "▁x" pieces, so that text uses them.
    let merges: Vec<String> = vocab
        .iter()
        .filter_map(|p| {
            let rest = p.strip_prefix('\u{2581}')?;
            (rest.chars().count() == 1).then(|| format!("\u{2581} {rest}"))
        })
        .collect();
    let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), json!(i)))
        .collect();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges
        }
    }))
}
