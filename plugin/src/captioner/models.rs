//! Which model an element asks for, and the loaded models the elements of a process share: one
//! copy per (files, device, arithmetic), on one candle device per CUDA ordinal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use candle_core::{DType, Device};

use super::registry::Registry;
use super::scheduler::{BatchLimits, Scheduler};
use crate::model::{IsaLimit, LanguageModelWeights, LlamaVid, LoadOptions, ModelError, Precision};
use crate::sync::lock;

/// Where the `device` property asks the model to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA device 0 when this build has CUDA and the device works, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(format!(
                    "unknown device `{other}`: use auto, cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

/// Where a model runs once `auto` is decided. This, never a device object, is what the model
/// key holds: the `Debug` text of a candle CUDA device carries a per-object id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceId {
    Cpu,
    Cuda(usize),
}

impl DeviceRequest {
    /// The device this request names; `auto` asks `cuda_works(0)`.
    pub fn resolve(self, cuda_works: impl FnOnce(usize) -> bool) -> DeviceId {
        match self {
            Self::Cpu => DeviceId::Cpu,
            Self::Cuda(ordinal) => DeviceId::Cuda(ordinal),
            Self::Auto if cuda_works(0) => DeviceId::Cuda(0),
            Self::Auto => DeviceId::Cpu,
        }
    }
}

/// What the `dtype` property asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Arithmetic {
    /// bf16 on CPUs with AMX (when built with `mkl`), f16 on CUDA, else f32.
    #[default]
    Auto,
    F32,
    Bf16,
    /// int8 weights and activations (a CPU mode; f16 on CUDA).
    Int8,
}

impl Arithmetic {
    /// The compute dtype and the precision of the CPU's linear layers on `device`.
    fn on(self, device: DeviceId) -> (DType, Precision) {
        match device {
            DeviceId::Cpu => {
                let precision = match self {
                    Self::Auto => Precision::Auto,
                    Self::F32 => Precision::F32,
                    Self::Bf16 => Precision::Bf16,
                    Self::Int8 => Precision::Int8,
                };
                (DType::F32, precision)
            }
            DeviceId::Cuda(_) => {
                let dtype = match self {
                    Self::F32 => DType::F32,
                    Self::Bf16 => DType::BF16,
                    Self::Auto | Self::Int8 => DType::F16,
                };
                (dtype, Precision::F32)
            }
        }
    }
}

/// What an element asks to load.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub model_dir: PathBuf,
    pub vision_tower: Option<PathBuf>,
    /// bert-base-uncased's folder (`config.json`, `vocab.txt`); `None`: beside the model.
    pub bert_dir: Option<PathBuf>,
    /// A GGUF file to take the language model from (`LoadOptions::llm_gguf`).
    pub llm_gguf: Option<PathBuf>,
    pub device: DeviceRequest,
    pub arithmetic: Arithmetic,
    /// Size of the model's own thread pool (`None`: the default). Not part of the key: a
    /// shared model has one pool, sized by the element that loaded it.
    pub threads: Option<usize>,
    /// Most frames encoded and captions decoded together by the model's scheduler (`None`:
    /// [`BatchLimits::default_for`] the device). Not part of the key either: one scheduler.
    pub encode_batch: Option<usize>,
    pub caption_batch: Option<usize>,
    /// Which language-model weights to load (only the token embeddings when a server runs it).
    pub language_model: LanguageModelWeights,
    /// Effects on the host process (the README's list): the pool's threads at a lower priority,
    /// glibc's allocator tuned. Not part of the key: a shared model has one pool, and the
    /// allocator is the process's; the loader's values hold.
    pub lower_thread_priority: bool,
    pub tune_allocator: bool,
    /// The most the CPU kernels may use. Part of the key: it chooses the kernels (and the
    /// layout of packed weights) of the copy.
    pub cpu_isa: IsaLimit,
}

/// What makes two loaded models the same one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelKey {
    pub model_dir: PathBuf,
    pub vision_tower: Option<PathBuf>,
    pub bert_dir: Option<PathBuf>,
    pub llm_gguf: Option<PathBuf>,
    pub device: DeviceId,
    pub dtype: DType,
    /// As requested (`Auto` stays `Auto`: it resolves the same way for every element).
    pub precision: Precision,
    pub language_model: LanguageModelWeights,
    pub cpu_isa: IsaLimit,
}

impl ModelRequest {
    /// The key of this request on `device`: paths made canonical, so that two spellings of the
    /// same directory share one copy.
    pub fn key(&self, device: DeviceId) -> ModelKey {
        let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
        let (dtype, precision) = self.arithmetic.on(device);
        ModelKey {
            model_dir: canonical(&self.model_dir),
            vision_tower: self.vision_tower.as_deref().map(canonical),
            bert_dir: self.bert_dir.as_deref().map(canonical),
            llm_gguf: self.llm_gguf.as_deref().map(canonical),
            device,
            dtype,
            precision,
            language_model: self.language_model,
            cpu_isa: self.cpu_isa,
        }
    }

    fn load_options(&self, key: &ModelKey, device: Device) -> LoadOptions {
        let mut options = LoadOptions::new(&self.model_dir);
        options.vision_tower = self.vision_tower.clone();
        options.bert_dir = self.bert_dir.clone();
        options.llm_gguf = self.llm_gguf.clone();
        options.device = device;
        options.dtype = key.dtype;
        options.precision = key.precision;
        options.threads = self.threads;
        options.language_model = key.language_model;
        options.lower_thread_priority = self.lower_thread_priority;
        options.tune_allocator = self.tune_allocator;
        options.cpu_isa = key.cpu_isa;
        options
    }
}

/// One value per CUDA ordinal, made on first use and reused: candle's CUDA device is a context
/// with its streams, and tensors of two device objects cannot be mixed.
pub struct DeviceTable<D> {
    devices: Mutex<HashMap<usize, D>>,
}

impl<D> Default for DeviceTable<D> {
    fn default() -> Self {
        Self {
            devices: Mutex::new(HashMap::new()),
        }
    }
}

impl<D: Clone> DeviceTable<D> {
    /// The device of `ordinal`, made by `create` unless made before (a failure is not kept:
    /// the next call tries again).
    pub fn get_or_create(
        &self,
        ordinal: usize,
        create: impl FnOnce(usize) -> Result<D, String>,
    ) -> Result<D, String> {
        let mut devices = lock(&self.devices);
        if let Some(device) = devices.get(&ordinal) {
            return Ok(device.clone());
        }
        let device = create(ordinal)?;
        devices.insert(ordinal, device.clone());
        Ok(device)
    }
}

/// The candle device for `id`, one per CUDA ordinal per process.
pub fn device(id: DeviceId) -> Result<Device, String> {
    match id {
        DeviceId::Cpu => Ok(Device::Cpu),
        DeviceId::Cuda(ordinal) => cuda_device(ordinal),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, String> {
    static CUDA: LazyLock<DeviceTable<Device>> = LazyLock::new(DeviceTable::default);
    CUDA.get_or_create(ordinal, |n| {
        Device::new_cuda(n).map_err(|e| {
            format!(
                "CUDA device {n} is not available (no NVIDIA GPU or driver?): {}",
                ModelError::from(e).summary()
            )
        })
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device, String> {
    Err(format!(
        "device cuda:{ordinal} was asked for, but this build of gst-llamavid has no CUDA \
         support: rebuild with `--features cuda` or set device=cpu"
    ))
}

/// A loaded model, as the elements naming it share it: the weights and the one scheduler
/// that runs them for every stream.
pub struct SharedModel {
    pub model: Arc<LlamaVid>,
    pub scheduler: Scheduler<LlamaVid>,
    pub key: ModelKey,
    /// The pool size it was loaded with.
    pub threads: Option<usize>,
    /// The host effects it was loaded with.
    pub lower_thread_priority: bool,
    pub tune_allocator: bool,
}

impl SharedModel {
    /// Sentences for an element whose request differs from what the shared model was made
    /// with by the element that loaded it (the first loader's values win): pool size, batch
    /// limits and host effects.
    pub fn sharing_notes(&self, request: &ModelRequest) -> Vec<String> {
        let limits = self.scheduler.limits();
        let sizes = [
            differs(
                "threads",
                self.threads,
                request.threads,
                "its thread pool has",
            ),
            differs(
                "encode-batch",
                Some(limits.encode),
                request.encode_batch,
                "its scheduler encodes frames in batches of up to",
            ),
            differs(
                "caption-batch",
                Some(limits.caption),
                request.caption_batch,
                "its scheduler decodes captions in batches of up to",
            ),
        ];
        let effects = [
            differs(
                "lower-thread-priority",
                Some(self.lower_thread_priority),
                Some(request.lower_thread_priority),
                "it was loaded with the value",
            ),
            differs(
                "tune-allocator",
                Some(self.tune_allocator),
                Some(request.tune_allocator),
                "it was loaded with the value",
            ),
        ];
        sizes.into_iter().chain(effects).flatten().collect()
    }
}

/// A sentence when `asked` is set and differs from `loaded` (`None`: the default size).
fn differs<T: PartialEq + std::fmt::Display>(
    property: &str,
    loaded: Option<T>,
    asked: Option<T>,
    what: &str,
) -> Option<String> {
    let asked = asked?;
    (loaded.as_ref() != Some(&asked)).then(|| {
        let actual = loaded.map_or("the default size".to_owned(), |n| n.to_string());
        format!(
            "{property}={asked} not applied: the model is shared with an element that loaded it \
             first, and {what} {actual} (set the same `{property}` on every element sharing a \
             model)"
        )
    })
}

/// Why a model could not be had.
#[derive(Debug)]
pub enum LoadError {
    /// A property names something that cannot be (an unknown or missing device).
    Device(String),
    Model(ModelError),
    /// The scheduler's thread could not start.
    Thread(std::io::Error),
}

static MODELS: LazyLock<Registry<ModelKey, SharedModel>> = LazyLock::new(Registry::default);

/// The model `request` names: the copy another element of the process holds, or a new one.
/// The flag says whether this call loaded it.
pub fn load_shared(request: &ModelRequest) -> Result<(Arc<SharedModel>, bool), LoadError> {
    let id = request
        .device
        .resolve(|ordinal| device(DeviceId::Cuda(ordinal)).is_ok());
    let device = device(id).map_err(LoadError::Device)?;
    let key = request.key(id);
    MODELS.get_or_load(&key, || {
        let gpu = !device.is_cpu();
        let options = request.load_options(&key, device);
        let model = Arc::new(LlamaVid::load(&options).map_err(LoadError::Model)?);
        let defaults = BatchLimits::default_for(gpu);
        let limits = BatchLimits {
            encode: request.encode_batch.unwrap_or(defaults.encode),
            caption: request.caption_batch.unwrap_or(defaults.caption),
        };
        let scheduler = Scheduler::spawn(model.clone(), limits).map_err(LoadError::Thread)?;
        Ok(SharedModel {
            model,
            scheduler,
            key: key.clone(),
            threads: request.threads,
            lower_thread_priority: request.lower_thread_priority,
            tune_allocator: request.tune_allocator,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn request(device: &str) -> ModelRequest {
        ModelRequest {
            model_dir: PathBuf::from("/models/llama-vid"),
            vision_tower: None,
            bert_dir: None,
            llm_gguf: None,
            device: device.parse().unwrap(),
            arithmetic: Arithmetic::Auto,
            threads: None,
            encode_batch: None,
            caption_batch: None,
            language_model: LanguageModelWeights::All,
            lower_thread_priority: true,
            tune_allocator: true,
            cpu_isa: IsaLimit::Best,
        }
    }

    #[test]
    fn device_strings_parse_to_ordinals() {
        let parse = |s: &str| s.parse::<DeviceRequest>();
        assert_eq!(parse("auto"), Ok(DeviceRequest::Auto));
        assert_eq!(parse(" CPU "), Ok(DeviceRequest::Cpu));
        assert_eq!(parse("cuda"), Ok(DeviceRequest::Cuda(0)));
        assert_eq!(parse("cuda:0"), Ok(DeviceRequest::Cuda(0)));
        assert_eq!(parse("cuda:3"), Ok(DeviceRequest::Cuda(3)));
        for bad in ["tpu", "cuda:x", "cuda:", "gpu0", ""] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("unknown device"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_key_names_the_ordinal_not_a_device_object() {
        let with_gpu = |_| true;
        let without_gpu = |_| false;
        let key = |device: &str, gpu: &dyn Fn(usize) -> bool| {
            let r = request(device);
            r.key(r.device.resolve(gpu))
        };
        // Every spelling of GPU 0 is one key, on every call (each element asks anew).
        let gpu0 = key("cuda", &with_gpu);
        assert_eq!(gpu0.device, DeviceId::Cuda(0));
        assert_eq!(key("cuda:0", &with_gpu), gpu0);
        assert_eq!(key("auto", &with_gpu), gpu0);
        assert_ne!(key("cuda:1", &with_gpu), gpu0);
        // Without a GPU, auto is the CPU, in f32 products of the requested precision.
        let cpu = key("auto", &without_gpu);
        assert_eq!(cpu, key("cpu", &with_gpu));
        assert_eq!((cpu.device, cpu.dtype), (DeviceId::Cpu, DType::F32));
        assert_eq!(gpu0.dtype, DType::F16, "auto is f16 on CUDA");
    }

    #[test]
    fn threads_host_effects_and_path_spellings_are_not_part_of_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = request("cpu");
        a.model_dir = dir.path().to_owned();
        let mut b = a.clone();
        b.model_dir = dir.path().join(".");
        b.threads = Some(3);
        b.lower_thread_priority = false;
        b.tune_allocator = false;
        assert_eq!(a.key(DeviceId::Cpu), b.key(DeviceId::Cpu));
        let mut c = a.clone();
        c.arithmetic = Arithmetic::Int8;
        assert_ne!(a.key(DeviceId::Cpu), c.key(DeviceId::Cpu));
        // The instruction-set limit chooses other kernels: another copy.
        for isa in [IsaLimit::Avx512, IsaLimit::Avx2, IsaLimit::Portable] {
            let mut d = a.clone();
            d.cpu_isa = isa;
            assert_ne!(a.key(DeviceId::Cpu), d.key(DeviceId::Cpu), "{isa}");
        }
    }

    #[test]
    fn the_load_options_carry_the_host_effects_and_the_isa() {
        let mut r = request("cpu");
        r.lower_thread_priority = false;
        r.tune_allocator = false;
        r.cpu_isa = IsaLimit::Avx2;
        let options = r.load_options(&r.key(DeviceId::Cpu), Device::Cpu);
        assert!(!options.lower_thread_priority && !options.tune_allocator);
        assert_eq!(options.cpu_isa, IsaLimit::Avx2);
        let defaults = request("cpu");
        let options = defaults.load_options(&defaults.key(DeviceId::Cpu), Device::Cpu);
        assert!(options.lower_thread_priority && options.tune_allocator);
        assert_eq!(options.cpu_isa, IsaLimit::Best);
    }

    #[test]
    fn one_device_per_ordinal_is_made_and_reused() {
        let table: DeviceTable<(usize, usize)> = DeviceTable::default();
        let made = AtomicUsize::new(0);
        let create = |ordinal| Ok((ordinal, made.fetch_add(1, Ordering::SeqCst)));
        let first = table.get_or_create(0, create).unwrap();
        assert_eq!(table.get_or_create(0, create).unwrap(), first);
        assert_eq!(table.get_or_create(1, create).unwrap().0, 1);
        assert_eq!(made.load(Ordering::SeqCst), 2, "one per ordinal");
        // A failure is not remembered.
        assert!(table.get_or_create(2, |_| Err("no".into())).is_err());
        assert_eq!(table.get_or_create(2, create).unwrap().0, 2);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_cuda_support_says_so() {
        let err = device(DeviceId::Cuda(1)).unwrap_err();
        assert!(
            err.contains("no CUDA support") && err.contains("cuda:1"),
            "{err}"
        );
        assert_eq!(
            DeviceRequest::Auto.resolve(|n| device(DeviceId::Cuda(n)).is_ok()),
            DeviceId::Cpu
        );
    }

    #[test]
    fn a_differing_request_on_a_shared_model_is_reported() {
        // The rule of `SharedModel::sharing_notes`, without loading a model.
        let note = |loaded, asked| differs("threads", loaded, asked, "its thread pool has");
        assert!(note(Some(2), Some(2)).is_none());
        assert!(note(Some(2), None).is_none(), "no request, no complaint");
        let text = note(None, Some(4)).unwrap();
        assert!(
            text.contains("threads=4") && text.contains("default size"),
            "{text}"
        );
        assert!(note(Some(2), Some(3)).unwrap().contains("has 2"));
        let effect = |loaded, asked| differs("tune-allocator", Some(loaded), Some(asked), "x");
        assert!(effect(true, true).is_none());
        assert!(effect(true, false)
            .unwrap()
            .contains("tune-allocator=false"));
    }
}
