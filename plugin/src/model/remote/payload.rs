//! The body of a `/v1/completions` request carrying prompt embeddings, in the format of vLLM
//! 0.32 (`vllm/entrypoints/openai/completion/protocol.py`, `CompletionRequest`, decoded by
//! `vllm/renderers/embed_utils.py`, `safe_load_prompt_embeds`):
//!
//! - `prompt_embeds`: standard base64 (with padding) of the bytes `torch.save(tensor)` writes
//!   for one tensor of shape (n_tokens, hidden) in a float dtype; the server loads it with
//!   `torch.load(weights_only=True)`, checks the hidden size and casts it to the model's dtype.
//!   No BOS is added: the embeddings already start with the prompt's.
//! - the sampling fields, all sent explicitly (the server's defaults differ from ours:
//!   temperature 1 when absent);
//! - `return_token_ids: true`, so that the caption is decoded from ids with the checkpoint's
//!   own tokenizer, exactly as on the local path.

use base64::Engine;
use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::model::torch_save::{save_tensor_to_vec, StorageType, TensorEntry};
use crate::model::GenerationParams;

/// How a caption is decoded by the server: the element's sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 means greedy (as the local sampler, anything below 1e-3 is sent as 0).
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops at these ids as well as at the served model's own EOS.
    pub stop_token_ids: Vec<u32>,
}

impl Sampling {
    pub fn from_params(params: &GenerationParams, eos: u32) -> Self {
        Self {
            max_tokens: params.max_new_tokens,
            temperature: if params.is_greedy() {
                0.0
            } else {
                params.temperature
            },
            top_p: params.top_p,
            seed: params.seed,
            stop_token_ids: vec![eos],
        }
    }
}

/// `base64(torch.save(embeddings))` for embeddings (n, H) or (1, n, H), in their own dtype
/// when it is f32, bf16 or f16 (f64 and others are sent as f32).
pub fn encode_prompt_embeds(embeddings: &Tensor) -> candle_core::Result<String> {
    let embeddings = match embeddings.rank() {
        2 => embeddings.clone(),
        3 if embeddings.dim(0)? == 1 => embeddings.squeeze(0)?,
        _ => candle_core::bail!(
            "prompt embeddings must be (tokens, hidden), got {:?}",
            embeddings.dims()
        ),
    };
    let embeddings = embeddings.to_device(&candle_core::Device::Cpu)?;
    let flat = embeddings.flatten_all()?;
    let (dtype, data): (StorageType, Vec<u8>) = match flat.dtype() {
        DType::BF16 => (
            StorageType::Bf16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            StorageType::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        _ => (
            StorageType::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    };
    let entry = TensorEntry {
        name: "prompt_embeds".into(),
        dtype,
        shape: embeddings.dims().to_vec(),
    };
    let bytes = save_tensor_to_vec(&entry, &data).map_err(candle_core::Error::wrap)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The JSON body of one completion request.
pub fn completion_body(model: &str, prompt_embeds: String, sampling: &Sampling) -> Value {
    json!({
        "model": model,
        "prompt_embeds": prompt_embeds,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        // The server takes a signed 64-bit seed.
        "seed": sampling.seed & (i64::MAX as u64),
        "stop_token_ids": sampling.stop_token_ids,
        "return_token_ids": true,
        "stream": false,
        "n": 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn decode(b64: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("valid base64")
    }

    /// The stored entries of a zip archive (all our writer produces), by name.
    fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a zip");
        (0..archive.len())
            .map(|i| {
                let mut file = archive.by_index(i).expect("entry");
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut data).expect("read");
                (file.name().expect("entry name").to_string(), data)
            })
            .collect()
    }

    #[test]
    fn embeddings_travel_as_a_torch_save_archive_of_their_raw_values() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let t = Tensor::from_vec(values.clone(), (1, 3, 4), &Device::Cpu).unwrap();
        let entries = zip_entries(&decode(&encode_prompt_embeds(&t).unwrap()));
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "archive/data.pkl",
                "archive/byteorder",
                "archive/data/0",
                "archive/version"
            ]
        );
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(entries[2].1, raw);
        assert_eq!(entries[1].1, b"little");
        let pickle = &entries[0].1;
        // A bare tensor (no OrderedDict state dict), FloatStorage, shape (3, 4) squeezed.
        assert!(pickle.starts_with(&[0x80, 2, b'c']));
        assert!(pickle.windows(12).any(|w| w == b"FloatStorage"));
        assert!(!pickle.windows(11).any(|w| w == b"OrderedDict\n)R("));
        assert!(pickle.windows(5).any(|w| w == [b'K', 3, b'K', 4, 0x86]));
    }

    #[test]
    fn bf16_embeddings_are_sent_as_bf16() {
        let t = Tensor::ones((2, 4), DType::BF16, &Device::Cpu).unwrap();
        let entries = zip_entries(&decode(&encode_prompt_embeds(&t).unwrap()));
        assert_eq!(entries[2].1.len(), 2 * 4 * 2);
        assert!(entries[0].1.windows(15).any(|w| w == b"BFloat16Storage"));
    }

    #[test]
    fn other_ranks_are_refused() {
        let t = Tensor::ones((2, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(encode_prompt_embeds(&t).is_err());
    }

    #[test]
    fn the_body_carries_every_sampling_setting() {
        let params = GenerationParams {
            max_new_tokens: 7,
            temperature: 0.0005,
            top_p: 0.9,
            seed: u64::MAX,
        };
        let body = completion_body("m", "QUJD".into(), &Sampling::from_params(&params, 2));
        assert_eq!(
            body,
            json!({"model": "m", "prompt_embeds": "QUJD", "max_tokens": 7, "temperature": 0.0,
                   "top_p": 0.9, "seed": i64::MAX, "stop_token_ids": [2],
                   "return_token_ids": true, "stream": false, "n": 1})
        );
    }
}
