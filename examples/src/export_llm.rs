//! Exports the language model of a LLaMA-VID checkpoint as a plain `LlamaForCausalLM`
//! directory that an LLM server (vLLM, transformers) loads as it is:
//!
//! ```text
//! OUT/config.json                 architectures ["LlamaForCausalLM"], model_type "llama", the
//!                                 LLaMA keys with the values the plugin computes with
//! OUT/generation_config.json      bos / eos / pad ids
//! OUT/model.safetensors           embed_tokens, layers.*, norm, lm_head (sharded with an index
//!                                 file past --shard-gb)
//! OUT/tokenizer.*                 the checkpoint's tokenizer files, copied
//! ```
//!
//! Only the language-model tensors are written: vLLM refuses a directory whose weights hold
//! tensors its `LlamaForCausalLM` has no place for (`model.mm_projector.*`, `model.vlm_att_*`),
//! and an index file can only leave out whole files, so the tensors are copied, one at a time
//! (memory stays at the largest tensor). `rotary_emb.inv_freq` buffers are dropped (the server
//! computes them, as the plugin does).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use gstllamavid::model::checkpoint::{Checkpoint, WeightFormat};
use gstllamavid::model::config::{read_json, LlavaConfig};

/// Files of the tokenizer copied when the checkpoint has them.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    /// dtype of the written weights; `None` keeps each tensor's stored dtype.
    pub dtype: Option<DType>,
    pub weight_format: WeightFormat,
    /// Largest safetensors file; more tensors go into the next shard.
    pub shard_bytes: u64,
}

impl ExportOptions {
    pub fn new(model_dir: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            out_dir: out_dir.into(),
            dtype: None,
            weight_format: WeightFormat::Auto,
            shard_bytes: 5_000_000_000,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub tensors: usize,
    pub bytes: u64,
    pub files: Vec<PathBuf>,
}

/// The names of the language model's tensors, in the order they are written, for a config.
pub fn language_model_tensors(config: &LlavaConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_owned()];
    for i in 0..config.num_hidden_layers {
        for part in [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{i}.{part}"));
        }
    }
    names.push("model.norm.weight".to_owned());
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".to_owned());
    }
    names
}

/// The `config.json` of the exported model: the LLaMA keys, with the defaults the plugin
/// applies written out (so the server cannot default differently), nothing of LLaMA-VID's.
pub fn llama_config(config: &LlavaConfig, dtype_name: &str) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads(),
        "head_dim": config.hidden_size / config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "mlp_bias": false,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": dtype_name,
    })
}

fn safetensors_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F64 => "F64",
        other => bail!("cannot export a tensor of dtype {other:?}"),
    })
}

fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Raw little-endian bytes of a CPU tensor.
fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let flat = tensor.flatten_all()?;
    Ok(match flat.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => bail!("cannot export a tensor of dtype {other:?}"),
    })
}

struct Planned {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
}

impl Planned {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// Writes one safetensors file: the header (offsets known from the shapes), then each tensor
/// read from the checkpoint and converted, one at a time.
fn write_safetensors(path: &Path, checkpoint: &Checkpoint, tensors: &[Planned]) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.bytes();
        header.insert(
            t.name.clone(),
            json!({"dtype": safetensors_dtype(t.dtype)?, "shape": t.shape,
                   "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))?;
    // The data starts 8-byte aligned, as the safetensors library writes it.
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for t in tensors {
        let tensor = checkpoint.load(&t.name)?.to_dtype(t.dtype)?;
        if tensor.dims() != t.shape.as_slice() {
            bail!(
                "{}: shape changed while exporting ({:?} vs {:?})",
                t.name,
                tensor.dims(),
                t.shape
            );
        }
        out.write_all(&tensor_bytes(&tensor)?)?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Exports the language model of `options.model_dir` into `options.out_dir`.
pub fn export_language_model(options: &ExportOptions) -> Result<ExportSummary> {
    let model_dir = &options.model_dir;
    let config_path = model_dir.join("config.json");
    let config: LlavaConfig = read_json(&config_path)?;
    config.validate(&config_path)?;
    let checkpoint = Checkpoint::open_model_dir(model_dir, options.weight_format)?;

    let mut planned = Vec::new();
    for name in language_model_tensors(&config) {
        if !checkpoint.contains(&name) {
            bail!(
                "{}: tensor {name} is missing; not a complete LLaMA-VID checkpoint",
                checkpoint.origin().display()
            );
        }
        let shape = checkpoint.shape(&name)?.dims().to_vec();
        let dtype = match options.dtype {
            Some(dtype) => dtype,
            // Reading the dtype needs the tensor; shards hold one dtype in practice, so the
            // first tensor's (the embedding) stands for all when none is asked for.
            None => match planned.first() {
                Some(Planned { dtype, .. }) => *dtype,
                None => checkpoint.load(&name)?.dtype(),
            },
        };
        planned.push(Planned { name, dtype, shape });
    }
    let dtype = planned[0].dtype;

    std::fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("creating {}", options.out_dir.display()))?;
    let mut shards: Vec<Vec<Planned>> = vec![Vec::new()];
    let mut shard_size = 0u64;
    for t in planned {
        if shard_size > 0 && shard_size + t.bytes() > options.shard_bytes {
            shards.push(Vec::new());
            shard_size = 0;
        }
        shard_size += t.bytes();
        shards.last_mut().expect("one shard").push(t);
    }
    let n = shards.len();
    let mut summary = ExportSummary {
        tensors: 0,
        bytes: 0,
        files: Vec::new(),
    };
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = options.out_dir.join(&file);
        write_safetensors(&path, &checkpoint, shard)?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone());
            summary.tensors += 1;
            summary.bytes += t.bytes();
        }
        summary.files.push(path);
    }
    if n > 1 {
        let path = options.out_dir.join("model.safetensors.index.json");
        write_json(
            &path,
            &json!({"metadata": {"total_size": summary.bytes}, "weight_map": weight_map}),
        )?;
        summary.files.push(path);
    }

    let path = options.out_dir.join("config.json");
    write_json(&path, &llama_config(&config, torch_dtype_name(dtype)))?;
    summary.files.push(path);
    let generation = model_dir.join("generation_config.json");
    let path = options.out_dir.join("generation_config.json");
    if generation.is_file() {
        std::fs::copy(&generation, &path)?;
    } else {
        write_json(
            &path,
            &json!({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}),
        )?;
    }
    summary.files.push(path);

    let mut has_tokenizer = false;
    for name in TOKENIZER_FILES {
        let from = model_dir.join(name);
        if from.is_file() {
            let to = options.out_dir.join(name);
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            has_tokenizer |= name == "tokenizer.model" || name == "tokenizer.json";
            summary.files.push(to);
        }
    }
    if !has_tokenizer {
        bail!(
            "{} has neither tokenizer.model nor tokenizer.json: a served model needs its tokenizer",
            model_dir.display()
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model directory of the fixture: `LLAMAVID_FIXTURE` (relative to the repository
    /// root), else `../shared/fixtures/llamavid-tiny-a`, as the plugin's fixture tests find it.
    fn fixture_model() -> PathBuf {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let root = match std::env::var_os("LLAMAVID_FIXTURE") {
            Some(dir) => repo.join(dir),
            None => repo.join("../shared/fixtures/llamavid-tiny-a"),
        };
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("fixture {} not found ({e})", root.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.join("config.json").is_file() && p.join("pytorch_model.bin.index.json").is_file()
            })
            .collect();
        dirs.sort();
        dirs.into_iter()
            .next()
            .expect("the fixture has a model directory")
    }

    #[test]
    fn exports_exactly_the_language_model_tensors_with_their_values() -> Result<()> {
        let model = fixture_model();
        let out = tempfile::tempdir()?;
        let options = ExportOptions::new(&model, out.path().join("llm"));
        let summary = export_language_model(&options)?;

        let config: LlavaConfig = read_json(&model.join("config.json"))?;
        let expected = language_model_tensors(&config);
        assert_eq!(summary.tensors, expected.len());

        let source = Checkpoint::open_model_dir(&model, WeightFormat::Auto)?;
        let exported = Checkpoint::open_model_dir(&options.out_dir, WeightFormat::Safetensors)?;
        let mut names: Vec<&str> = exported.names();
        names.sort_unstable();
        let mut wanted: Vec<&str> = expected.iter().map(String::as_str).collect();
        wanted.sort_unstable();
        assert_eq!(
            names, wanted,
            "exactly the LM tensors, no mm_projector / vlm_att"
        );
        for name in &expected {
            let a = source.load(name)?.flatten_all()?.to_dtype(DType::F32)?;
            let b = exported.load(name)?.flatten_all()?.to_dtype(DType::F32)?;
            assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?, "{name}");
        }

        let written: Value = serde_json::from_str(&std::fs::read_to_string(
            options.out_dir.join("config.json"),
        )?)?;
        assert_eq!(written["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(written["model_type"], "llama");
        assert_eq!(written["num_key_value_heads"], config.num_kv_heads());
        assert!(written.get("mm_vision_tower").is_none());
        assert!(options.out_dir.join("tokenizer.json").is_file());
        Ok(())
    }

    #[test]
    fn shards_past_the_limit_with_an_index() -> Result<()> {
        let model = fixture_model();
        let out = tempfile::tempdir()?;
        let mut options = ExportOptions::new(&model, out.path().join("llm"));
        options.shard_bytes = 64 * 1024;
        options.dtype = Some(DType::BF16);
        let summary = export_language_model(&options)?;
        assert!(options
            .out_dir
            .join("model.safetensors.index.json")
            .is_file());
        assert!(!options.out_dir.join("model.safetensors").exists());
        let exported = Checkpoint::open_model_dir(&options.out_dir, WeightFormat::Safetensors)?;
        assert_eq!(exported.names().len(), summary.tensors);
        let embed = exported.load("model.embed_tokens.weight")?;
        assert_eq!(embed.dtype(), DType::BF16);
        Ok(())
    }
}
