//! Weight files as released: sharded PyTorch pickles with their index, safetensors, and the flat
//! EVA state dict. Pickles are parsed by our weights-only reader (`torch_load`), never executed.
//!
//! Every tensor is read on demand through a `VarBuilder` backend that names the file and the
//! tensor in its errors, so a truncated shard or a renamed key is reported as such.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::config::read_json;
use super::error::candle_summary;
use super::torch_load::TorchArchive;
use super::{ModelError, Result};

/// Which on-disk copy of the HF weights to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Safetensors when the directory has them (memory-mapped), else the PyTorch shards.
    #[default]
    Auto,
    /// `pytorch_model*.bin` (the release format).
    Pickle,
    /// `model*.safetensors`.
    Safetensors,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    /// The spellings the command-line tools take: `auto`, `bin`, `safetensors`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "bin" => Ok(Self::Pickle),
            "safetensors" => Ok(Self::Safetensors),
            other => Err(format!(
                "unknown weight format {other:?} (auto, bin or safetensors)"
            )),
        }
    }
}

enum TensorFile {
    Pickle(TorchArchive),
    Safetensors(MmapedSafetensors),
}

struct OpenFile {
    path: PathBuf,
    tensors: TensorFile,
}

impl OpenFile {
    fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                what: "weight file",
                path: path.to_owned(),
                hint: "the checkpoint is incomplete; download every shard listed in the index"
                    .into(),
            });
        }
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let tensors = if is_safetensors {
            // SAFETY: the file is mapped read-only and the mapping lives as long as the
            // checkpoint; like every mmap user we rely on nobody truncating the file meanwhile.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                ModelError::bad_file(
                    path,
                    format!(
                        "not a valid safetensors file (truncated?): {}",
                        candle_summary(&e)
                    ),
                )
            })?;
            TensorFile::Safetensors(st)
        } else {
            let pth = TorchArchive::open(path)?;
            TensorFile::Pickle(pth)
        };
        Ok(Self {
            path: path.to_owned(),
            tensors,
        })
    }

    fn names(&self) -> Vec<String> {
        match &self.tensors {
            TensorFile::Pickle(p) => p.tensors().keys().cloned().collect(),
            TensorFile::Safetensors(s) => s.tensors().into_iter().map(|(name, _)| name).collect(),
        }
    }

    fn read(&self, name: &str) -> std::result::Result<Tensor, String> {
        match &self.tensors {
            TensorFile::Pickle(p) => match p.load(name) {
                Ok(Some(t)) => Ok(t),
                Ok(None) => Err("not found in this file".into()),
                Err(e) => Err(format!("unreadable: {}", e.summary())),
            },
            TensorFile::Safetensors(s) => s
                .load(name, &Device::Cpu)
                .map_err(|e| format!("unreadable: {}", candle_summary(&e))),
        }
    }
}

/// The tensors of one logical checkpoint, possibly spread over several files.
pub struct Checkpoint {
    files: Vec<OpenFile>,
    /// Tensor name to the index of the file holding it.
    location: HashMap<String, usize>,
    /// Where the tensors came from, for messages.
    origin: PathBuf,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens the HF side of a model directory: `pytorch_model.bin.index.json` and its shards, a
    /// single `pytorch_model.bin`, or `model.safetensors` (optionally sharded with its index).
    pub fn open_model_dir(dir: &Path, format: WeightFormat) -> Result<Self> {
        let has = |name: &str| dir.join(name).is_file();
        let safetensors = if has("model.safetensors.index.json") {
            Some(dir.join("model.safetensors.index.json"))
        } else if has("model.safetensors") {
            Some(dir.join("model.safetensors"))
        } else {
            None
        };
        let pickle = if has("pytorch_model.bin.index.json") {
            Some(dir.join("pytorch_model.bin.index.json"))
        } else if has("pytorch_model.bin") {
            Some(dir.join("pytorch_model.bin"))
        } else {
            None
        };
        let chosen = match format {
            WeightFormat::Auto => safetensors.or(pickle),
            WeightFormat::Pickle => pickle,
            WeightFormat::Safetensors => safetensors,
        };
        let Some(entry) = chosen else {
            let wanted = match format {
                WeightFormat::Safetensors => "model.safetensors",
                _ => "pytorch_model.bin.index.json with its shards, or model.safetensors",
            };
            return Err(ModelError::MissingFile {
                what: "model weights",
                path: dir.to_owned(),
                hint: format!("expected {wanted} in the model directory"),
            });
        };
        if entry.extension().is_some_and(|e| e == "json") {
            Self::open_index(&entry)
        } else {
            Self::open_files(&[entry])
        }
    }

    /// Opens the shards named by an HF index file (`*.index.json`).
    fn open_index(index_path: &Path) -> Result<Self> {
        let index: ShardIndex = read_json(index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut files = Vec::with_capacity(shard_names.len());
        let mut file_of_shard = HashMap::new();
        for name in shard_names {
            // The index names files beside it, nothing else: no folders, no `..`, no
            // absolute paths (an index could otherwise point the loader anywhere).
            let plain = Path::new(name)
                .file_name()
                .is_some_and(|f| f == name.as_str())
                && name != ".."
                && !name.contains('\\');
            if !plain {
                return Err(ModelError::bad_file(
                    index_path,
                    format!(
                        "weight_map names the shard `{name}`, which is not a file beside the \
                         index; refused"
                    ),
                ));
            }
            file_of_shard.insert(name.clone(), files.len());
            files.push(OpenFile::open(&dir.join(name))?);
        }
        let mut location = HashMap::new();
        for (tensor, shard) in &index.weight_map {
            location.insert(tensor.clone(), file_of_shard[shard]);
        }
        // Tensors present in a shard but absent from the index are still usable.
        for (i, file) in files.iter().enumerate() {
            for name in file.names() {
                location.entry(name).or_insert(i);
            }
        }
        Ok(Self {
            files,
            location,
            origin: index_path.to_owned(),
        })
    }

    /// Opens standalone weight files (a flat state dict such as `eva_vit_g.pth`).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for path in paths {
            let file = OpenFile::open(path)?;
            for name in file.names() {
                location.entry(name).or_insert(files.len());
            }
            files.push(file);
        }
        Ok(Self {
            files,
            location,
            origin: paths.first().cloned().unwrap_or_default(),
        })
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The shape of a tensor, read without loading it.
    pub fn shape(&self, name: &str) -> Result<Shape> {
        let file = self.file_of(name)?;
        let shape = match &file.tensors {
            TensorFile::Pickle(p) => p.tensors().get(name).map(|t| Shape::from(t.shape.clone())),
            TensorFile::Safetensors(s) => s.get(name).ok().map(|v| Shape::from(v.shape().to_vec())),
        };
        shape.ok_or_else(|| self.missing(name, file))
    }

    fn file_of(&self, name: &str) -> Result<&OpenFile> {
        match self.location.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(ModelError::BadTensor {
                path: self.origin.clone(),
                tensor: name.into(),
                msg: "missing from the checkpoint; the file is incomplete or not a LLaMA-VID model"
                    .into(),
            }),
        }
    }

    fn missing(&self, name: &str, file: &OpenFile) -> ModelError {
        ModelError::BadTensor {
            path: file.path.clone(),
            tensor: name.into(),
            msg: "missing (the index maps it to this file)".into(),
        }
    }

    /// Reads one tensor as stored (dtype and device unchanged).
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let file = self.file_of(name)?;
        file.read(name).map_err(|msg| ModelError::BadTensor {
            path: file.path.clone(),
            tensor: name.into(),
            msg,
        })
    }

    /// A `VarBuilder` over this checkpoint converting to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

fn as_candle(e: ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.summary())
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name).map_err(as_candle)?;
        if tensor.shape() != &shape {
            let path = &self.file_of(name).map_err(as_candle)?.path;
            return Err(as_candle(ModelError::BadTensor {
                path: path.clone(),
                tensor: name.into(),
                msg: format!(
                    "has shape {:?}, the configuration implies {:?}",
                    tensor.dims(),
                    shape.dims()
                ),
            }));
        }
        tensor.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name)
            .map_err(as_candle)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
