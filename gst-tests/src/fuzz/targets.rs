//! The fuzz targets: one per reader of untrusted bytes (the model's files) and the frame
//! preprocessing. Each builds its seeds from the fixture or from this project's writers.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use gstllamavid::model::config::LlavaConfig;
use gstllamavid::model::preprocess::{ClipPreprocess, FrameView, PixelFormat};
use gstllamavid::model::tokenizer::LlamaTokenizer;
use gstllamavid::model::torch_load::TorchArchive;
use gstllamavid::model::{LlamaVid, LoadOptions, WeightFormat};

use super::{Outcome, Target};
use crate::hostile::{small_state_dict, torch_archive, Pickle};

fn outcome<T, E: std::fmt::Display>(result: Result<T, E>, ok: impl FnOnce(T) -> String) -> Outcome {
    match result {
        Ok(v) => Outcome::Accepted(ok(v)),
        Err(e) => Outcome::Refused(e.to_string()),
    }
}

fn model_file(name: &str) -> Vec<u8> {
    let path = crate::model_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every target, in the order the CI run takes them.
pub fn all() -> Vec<Box<dyn Target>> {
    vec![
        Box::new(FrameTarget),
        Box::new(PickleTarget::new()),
        Box::new(TorchZipTarget),
        Box::new(SafetensorsTarget),
        Box::new(GgufTarget),
        Box::new(SentencePieceTarget::new()),
        Box::new(TokenizerJsonTarget::new()),
        Box::new(ConfigJsonTarget),
        Box::new(ConfigLoadTarget::new()),
    ]
}

// ----- frames ---------------------------------------------------------------------------------

/// Frame preprocessing, format x size x stride x plane length x processor settings:
/// `[format, width(2), height(2), stride pad, plane cut, processor, edge, crop h, crop w, data...]`.
pub struct FrameTarget;

const FORMATS: [PixelFormat; 7] = [
    PixelFormat::Rgb,
    PixelFormat::Rgbx,
    PixelFormat::Bgrx,
    PixelFormat::Rgba,
    PixelFormat::Bgra,
    PixelFormat::I420,
    PixelFormat::Nv12,
];

impl Target for FrameTarget {
    fn name(&self) -> &'static str {
        "frame"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        for (f, (w, h)) in [
            (0u8, (64u16, 48u16)),
            (5, (33, 17)),
            (6, (1, 1)),
            (3, (640, 2)),
        ] {
            let mut s = vec![f];
            s.extend(w.to_le_bytes());
            s.extend(h.to_le_bytes());
            s.extend([3, 0, f % 2, 224, 224, 224]);
            s.extend((0..200u8).map(|i| i.wrapping_mul(37)));
            seeds.push(s);
        }
        seeds
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        if input.len() < 12 {
            return Outcome::Refused("short".into());
        }
        let format = FORMATS[input[0] as usize % FORMATS.len()];
        let mut width = u16::from_le_bytes([input[1], input[2]]) as usize % 2049;
        let mut height = u16::from_le_bytes([input[3], input[4]]) as usize % 2049;
        // Keep each run fast: at most a megapixel (8K frames are a stream-fault case).
        while width * height > 1 << 20 {
            width /= 2;
            height /= 2;
        }
        let pad = input[5] as usize;
        let cut = input[6];
        let processor = if input[7].is_multiple_of(4) {
            ClipPreprocess::clip_224()
        } else {
            let json = serde_json::json!({
                "size": {"shortest_edge": input[8] as usize},
                "crop_size": {"height": input[9] as usize, "width": input[10] as usize},
                "do_center_crop": input[7] % 4 != 3,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
            });
            match ClipPreprocess::from_config_json(&json, Path::new("preprocessor_config.json")) {
                Ok(p) => p,
                Err(e) => return Outcome::Refused(e.to_string()),
            }
        };
        let data = &input[11..];
        let planes_n = match format {
            PixelFormat::I420 => 3,
            PixelFormat::Nv12 => 2,
            _ => 1,
        };
        let mut buffers = Vec::new();
        let mut strides = Vec::new();
        for plane in 0..planes_n {
            let (row, rows) = format.plane_extent(plane, width, height);
            let stride = row + pad;
            let mut needed = stride * rows.saturating_sub(1) + row;
            match cut % 4 {
                1 => needed = needed.saturating_sub(1),
                2 => needed /= 2,
                _ => {}
            }
            let bytes: Vec<u8> = data.iter().copied().cycle().take(needed).collect();
            buffers.push(bytes);
            strides.push(if cut % 8 == 7 {
                row.saturating_sub(1)
            } else {
                stride
            });
        }
        if cut % 16 == 15 {
            buffers.pop();
        }
        let frame = FrameView::new(
            format,
            width,
            height,
            buffers.iter().map(Vec::as_slice).collect(),
            strides,
        );
        let result = frame.validate().and_then(|()| {
            let _params = processor.kernel_params(&frame);
            processor.pixels(&frame)
        });
        outcome(result, |p| format!("{} values", p.len()))
    }

    fn allocation_budget(&self, _len: usize) -> usize {
        // A megapixel frame as RGB (3 MiB) and its planes; pixels are 224x224x3 f32 at most.
        32 << 20
    }

    fn max_len(&self) -> usize {
        4096
    }
}

// ----- torch.save archives --------------------------------------------------------------------

/// The unpickler: `data.pkl` bytes inside an archive holding the fixture shard's storages.
pub struct PickleTarget {
    storages: Vec<(String, Vec<u8>)>,
    seed: Vec<u8>,
}

impl PickleTarget {
    pub fn new() -> Self {
        let shard = model_file("pytorch_model-00001-of-00002.bin");
        let mut zip = zip::ZipArchive::new(Cursor::new(shard)).expect("fixture shard is a zip");
        let mut storages = Vec::new();
        let mut seed = Vec::new();
        for i in 0..zip.len() {
            let mut file = zip.by_index(i).expect("entry");
            let name = file.name().expect("entry name").into_owned();
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).expect("entry bytes");
            if name.ends_with("/data.pkl") {
                seed = bytes;
            } else if let Some((_, key)) = name.split_once("/data/") {
                storages.push((key.to_owned(), bytes));
            }
        }
        PickleTarget { storages, seed }
    }
}

impl Default for PickleTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for PickleTarget {
    fn name(&self) -> &'static str {
        "pickle"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let tensor = Pickle::state_dict_of(
            |p| p.tensor("FloatStorage", "0", 4, 0, &[2, 2], &[2, 1]),
            "w",
        );
        vec![self.seed.clone(), tensor.0, Pickle::system("true").0]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        let storages: Vec<(&str, Vec<u8>)> = self
            .storages
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let bytes = torch_archive(&Pickle(input.to_vec()), &storages);
        read_archive(bytes)
    }

    fn allocation_budget(&self, len: usize) -> usize {
        // The archive around the pickle (~300 KiB of storages), the arena (<= 64 MiB).
        (64 << 20) + 16 * len
    }

    fn max_len(&self) -> usize {
        64 << 10
    }
}

fn read_archive(bytes: Vec<u8>) -> Outcome {
    let archive = match TorchArchive::from_reader(Path::new("fuzz.bin"), Cursor::new(bytes)) {
        Ok(a) => a,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let names: Vec<String> = archive.tensors().keys().cloned().collect();
    for name in &names {
        if let Err(e) = archive.load(name) {
            return Outcome::Refused(e.to_string());
        }
    }
    Outcome::Accepted(format!("{} tensors", names.len()))
}

/// Whole `torch.save` zip archives (central directory, local headers, entry names, sizes).
pub struct TorchZipTarget;

impl Target for TorchZipTarget {
    fn name(&self) -> &'static str {
        "torch-zip"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![
            small_state_dict(),
            model_file("pytorch_model-00001-of-00002.bin"),
        ]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        read_archive(input.to_vec())
    }

    fn max_len(&self) -> usize {
        1 << 20
    }
}

// ----- safetensors and GGUF -------------------------------------------------------------------

/// Safetensors headers and data, through candle's reader (what `Checkpoint` maps).
pub struct SafetensorsTarget;

fn small_safetensors() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("seed.safetensors");
    let a = Tensor::arange(0f32, 6., &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let b = Tensor::arange(0i64, 4, &Device::Cpu).unwrap();
    let c = a.to_dtype(candle_core::DType::BF16).unwrap();
    candle_core::safetensors::save(
        &[
            ("a".to_string(), a),
            ("b".to_string(), b),
            ("c".to_string(), c),
        ]
        .into_iter()
        .collect(),
        &path,
    )
    .expect("save");
    std::fs::read(&path).expect("read back")
}

impl Target for SafetensorsTarget {
    fn name(&self) -> &'static str {
        "safetensors"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![small_safetensors()]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        outcome(
            candle_core::safetensors::load_buffer(input, &Device::Cpu),
            |t| format!("{} tensors", t.len()),
        )
    }

    fn max_len(&self) -> usize {
        64 << 10
    }
}

/// GGUF headers (metadata, tensor infos) and tensor data, through candle's reader.
pub struct GgufTarget;

fn small_gguf() -> Vec<u8> {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let device = Device::Cpu;
    let a = Tensor::arange(0f32, 64., &device)
        .unwrap()
        .reshape((2, 32))
        .unwrap();
    let q = QTensor::quantize(&a, GgmlDType::Q8_0).unwrap();
    let f = QTensor::quantize(&a, GgmlDType::F32).unwrap();
    let meta = [
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.block_count", gguf_file::Value::U32(1)),
        (
            "tokenizer.ggml.tokens",
            gguf_file::Value::Array(vec![gguf_file::Value::String("a".into()); 3]),
        ),
    ];
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &[("q", &q), ("f", &f)]).expect("write gguf");
    out.into_inner()
}

impl Target for GgufTarget {
    fn name(&self) -> &'static str {
        "gguf"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![small_gguf()]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        use candle_core::quantized::gguf_file::Content;
        let mut reader = Cursor::new(input);
        let content = match Content::read(&mut reader) {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            if let Err(e) = content.tensor(&mut reader, name, &Device::Cpu) {
                return Outcome::Refused(e.to_string());
            }
        }
        Outcome::Accepted(format!("{} tensors", content.tensor_infos.len()))
    }

    fn max_len(&self) -> usize {
        64 << 10
    }
}

// ----- tokenizers -----------------------------------------------------------------------------

/// Builds a tokenizer from a file written into a folder of its own, then encodes a prompt and
/// decodes ids (in range and out of it) with it.
fn exercise_tokenizer(result: gstllamavid::model::Result<LlamaTokenizer>) -> Outcome {
    let tokenizer = match result {
        Ok(t) => t,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let ids = match tokenizer.encode("A chat. USER: <image>\nDescribe what happens. ASSISTANT:") {
        Ok(ids) => ids,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let n = tokenizer.vocab_size() as u32;
    let _ = tokenizer.decode(&ids);
    let _ = tokenizer.decode(&[0, n.saturating_sub(1), n, u32::MAX]);
    Outcome::Accepted(format!("{} ids", ids.len()))
}

pub struct SentencePieceTarget {
    dir: tempfile::TempDir,
}

impl SentencePieceTarget {
    pub fn new() -> Self {
        SentencePieceTarget {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Default for SentencePieceTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for SentencePieceTarget {
    fn name(&self) -> &'static str {
        "tokenizer-model"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![model_file("tokenizer.model")]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        let path = self.dir.path().join("tokenizer.model");
        std::fs::write(&path, input).expect("write");
        exercise_tokenizer(LlamaTokenizer::from_sentencepiece_file(&path))
    }

    fn max_len(&self) -> usize {
        32 << 10
    }
}

pub struct TokenizerJsonTarget {
    dir: tempfile::TempDir,
}

impl TokenizerJsonTarget {
    pub fn new() -> Self {
        TokenizerJsonTarget {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Default for TokenizerJsonTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for TokenizerJsonTarget {
    fn name(&self) -> &'static str {
        "tokenizer-json"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![model_file("tokenizer.json")]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        let path = self.dir.path().join("tokenizer.json");
        std::fs::write(&path, input).expect("write");
        exercise_tokenizer(LlamaTokenizer::from_tokenizer_json(&path))
    }

    fn max_len(&self) -> usize {
        64 << 10
    }
}

// ----- configuration files --------------------------------------------------------------------

/// `config.json` (parse and validate) and `preprocessor_config.json` (parse, then one frame
/// through the processor it describes).
pub struct ConfigJsonTarget;

impl Target for ConfigJsonTarget {
    fn name(&self) -> &'static str {
        "config-json"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let processor = std::fs::read_dir(crate::fixture_dir().join("llamavid/processor"))
            .expect("processor folder")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("preprocessor_config.json"))
            .find(|p| p.is_file())
            .expect("a preprocessor_config.json");
        vec![
            model_file("config.json"),
            std::fs::read(processor).expect("read"),
        ]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        let path = Path::new("config.json");
        if let Ok(config) = serde_json::from_slice::<LlavaConfig>(input) {
            return outcome(config.validate(path), |()| "config".into());
        }
        let json: serde_json::Value = match serde_json::from_slice(input) {
            Ok(v) => v,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let processor = match ClipPreprocess::from_config_json(&json, path) {
            Ok(p) => p,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let pixels = vec![128u8; 32 * 24 * 3];
        outcome(
            processor.pixels(&FrameView::packed_rgb(32, 24, &pixels)),
            |p| format!("{} values", p.len()),
        )
    }

    fn allocation_budget(&self, _len: usize) -> usize {
        32 << 20
    }

    fn max_len(&self) -> usize {
        8 << 10
    }
}

/// The whole model load with a mutated `config.json`: every size the configuration claims is
/// checked against the weights before anything is built from it.
pub struct ConfigLoadTarget {
    _tmp: tempfile::TempDir,
    model: PathBuf,
}

impl ConfigLoadTarget {
    pub fn new() -> Self {
        let (tmp, model) = crate::copy_fixture();
        // Pickles are the release format (and the slower reader); the copy reads them.
        let _ = std::fs::remove_file(model.join("model.safetensors"));
        ConfigLoadTarget { _tmp: tmp, model }
    }
}

impl Default for ConfigLoadTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for ConfigLoadTarget {
    fn name(&self) -> &'static str {
        "config-load"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![model_file("config.json")]
    }

    fn run(&mut self, input: &[u8]) -> Outcome {
        std::fs::write(self.model.join("config.json"), input).expect("write config");
        let mut options = LoadOptions::new(&self.model);
        options.weight_format = WeightFormat::Pickle;
        outcome(LlamaVid::load(&options), |_| "loaded".into())
    }

    fn allocation_budget(&self, _len: usize) -> usize {
        // The fixture's largest tensor is ~0.5 MiB; generous room for the model's own tables.
        64 << 20
    }

    fn max_len(&self) -> usize {
        8 << 10
    }
}
