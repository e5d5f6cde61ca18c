//! The one reader of `torch.save` archives in the project (`torch_save` is the writer and
//! documents the format): a weights-only unpickler, stricter than
//! `torch.load(weights_only=True)`.
//!
//! Nothing in a file can run code or make this process allocate what the file does not hold:
//! - the pickle runs on a small machine that knows the data opcodes and a fixed list of globals
//!   (the tensor rebuild functions and storage types `torch.save` writes). Any other global,
//!   and every opcode that would call or construct an object (INST, OBJ, NEWOBJ, NEWOBJ_EX,
//!   EXT1/2/4, REDUCE of anything but a rebuild function, BUILD of anything but a dict's
//!   attributes), refuses the file, naming what it asked for;
//! - values live in an arena and refer to each other by index: memo references cost nothing,
//!   cycles and deep nesting cannot blow the stack (no recursion anywhere), and the arena
//!   grows with the pickle's own bytes, which are capped at [`MAX_PICKLE_BYTES`];
//! - every tensor is checked against its storage (element count, strides, offset), and every
//!   storage against the archive entry holding it, before a byte is read: a tensor claiming
//!   2^40 bytes in a small file is refused at open time. Storage entries must be stored
//!   uncompressed, as `torch.save` writes them, so a read never exceeds the file's size;
//!   `data.pkl` may be compressed, and is read up to the cap (a zip bomb stops there);
//! - every entry name must lie inside the archive's one top-level folder (no `..`, no absolute
//!   paths), like torch's own reader expects. Nothing is ever extracted to disk.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

mod unpickle;

use self::unpickle::{RawTensor, Unpickler};
use super::{ModelError, Result};
use crate::sync::lock;

/// Largest `data.pkl` accepted (uncompressed). A state dict's pickle takes ~150 bytes per
/// tensor: this is room for ~100,000 tensors, and bounds the unpickler's memory (~16 bytes of
/// arena per pickle byte at worst).
pub const MAX_PICKLE_BYTES: u64 = 16 << 20;

/// One tensor of the archive: where its elements are, checked against the storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Strides and offset in elements of the storage.
    pub stride: Vec<usize>,
    pub offset: usize,
    /// Key of the storage (`data/<key>` in the archive).
    pub storage: String,
    storage_start: u64,
    storage_numel: usize,
}

impl StoredTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&dim, &stride) in self.shape.iter().zip(&self.stride).rev() {
            if dim != 1 && stride != expected {
                return false;
            }
            expected *= dim;
        }
        true
    }
}

/// A `torch.save` archive opened for reading: the tensors of its state dict, by name.
pub struct TorchArchive<R = File> {
    path: PathBuf,
    reader: Mutex<R>,
    tensors: BTreeMap<String, StoredTensor>,
}

impl TorchArchive<File> {
    /// Opens `path` and checks its whole structure (no tensor data is read yet).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_reader(path, file)
    }
}

/// An entry of the zip archive, as the tensor reads need it.
struct Entry {
    index: usize,
    size: u64,
    stored: bool,
    data_start: u64,
}

impl<R: Read + Seek> TorchArchive<R> {
    /// Reads the archive in `reader`; `path` names it in errors.
    pub fn from_reader(path: &Path, mut reader: R) -> Result<Self> {
        let bad = |msg: String| ModelError::bad_file(path, msg);
        let file_len = reader
            .seek(SeekFrom::End(0))
            .and_then(|len| reader.seek(SeekFrom::Start(0)).map(|_| len))
            .map_err(|e| ModelError::io(path, e))?;
        let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
            bad(format!(
                "not a readable PyTorch checkpoint (zip archive), it may be truncated: {e}"
            ))
        })?;
        let (prefix, entries) = index_entries(&mut zip, file_len).map_err(bad)?;
        let entry = |name: &str| entries.get(&format!("{prefix}/{name}"));
        let Some(pickle_entry) = entry("data.pkl") else {
            return Err(bad(format!(
                "not a torch.save archive: no {prefix}/data.pkl (the pickle of the state dict)"
            )));
        };
        let pickle =
            read_entry(&mut zip, pickle_entry, MAX_PICKLE_BYTES, "data.pkl").map_err(bad)?;
        if let Some(order) = entry("byteorder") {
            let order = read_entry(&mut zip, order, 16, "byteorder").map_err(bad)?;
            if String::from_utf8_lossy(&order).trim() != "little" {
                return Err(bad(
                    "tensors are not stored little endian (the byteorder record); only little \
                     endian is supported"
                        .into(),
                ));
            }
        }
        let state_dict = Unpickler::run(&pickle).map_err(|e| bad(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, tensor) in state_dict {
            let storage = format!("{prefix}/data/{}", tensor.storage);
            let checked = match entries.get(&storage) {
                Some(entry) => check_tensor(tensor, entry),
                None => Err(format!("its storage {storage} is not in the archive")),
            };
            match checked {
                Ok(tensor) => tensors.insert(name, tensor),
                Err(msg) => return Err(bad(format!("tensor `{name}`: {msg}"))),
            };
        }
        if tensors.is_empty() {
            return Err(bad(
                "holds no tensors: it is not a PyTorch state dict (a dict of tensors)".into(),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            reader: Mutex::new(zip.into_inner()),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names with their layout, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, StoredTensor> {
        &self.tensors
    }

    /// Reads one tensor onto the CPU in its stored dtype (`None`: no such tensor).
    pub fn load(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let size = info.dtype.size_in_bytes();
        let bytes = if info.is_contiguous() {
            let start = info.storage_start + (info.offset * size) as u64;
            self.read_at(start, info.numel() * size)?
        } else {
            // A view of a larger storage (torch.save of a transposed tensor, say): gather.
            let span = extent(&info.shape, &info.stride, info.offset).unwrap_or(0);
            let all = self.read_at(info.storage_start, span * size)?;
            gather(&all, info, size)
        };
        Ok(Some(Tensor::from_raw_buffer(
            &bytes,
            info.dtype,
            &info.shape,
            &Device::Cpu,
        )?))
    }

    fn read_at(&self, start: u64, len: usize) -> Result<Vec<u8>> {
        let mut reader = lock(&self.reader);
        let mut bytes = vec![0u8; len];
        reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| reader.read_exact(&mut bytes))
            .map_err(|e| {
                ModelError::bad_file(
                    &self.path,
                    format!("tensor data unreadable (truncated or changed file?): {e}"),
                )
            })?;
        Ok(bytes)
    }
}

/// The archive's entries by name, after checking that every name lies inside one top-level
/// folder (the archive prefix, returned) and that every entry's data lies inside the file.
fn index_entries<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    file_len: u64,
) -> std::result::Result<(String, HashMap<String, Entry>), String> {
    let mut prefix: Option<String> = None;
    let mut entries = HashMap::with_capacity(zip.len());
    for index in 0..zip.len() {
        let file = zip
            .by_index_raw(index)
            .map_err(|e| format!("zip entry {index} unreadable (truncated file?): {e}"))?;
        let name = file
            .name()
            .map_err(|e| format!("zip entry {index} has an unreadable name: {e}"))?
            .into_owned();
        let top = match name.split_once('/') {
            Some((top, rest)) if !top.is_empty() && !rest.is_empty() => top,
            _ => return Err(format!("zip entry `{name}` is outside the archive folder")),
        };
        let traversal = name.starts_with('/')
            || name.contains('\\')
            || name.contains('\0')
            || name
                .split('/')
                .any(|part| part == ".." || part == "." || part.is_empty());
        if traversal {
            return Err(format!(
                "zip entry `{name}` is not a plain path inside the archive (path traversal?)"
            ));
        }
        match &prefix {
            None => prefix = Some(top.to_owned()),
            Some(p) if p == top => {}
            Some(p) => {
                return Err(format!(
                    "zip entries in two top-level folders (`{p}` and `{top}`): not one torch.save archive"
                ))
            }
        }
        if file.encrypted() {
            return Err(format!("zip entry `{name}` is encrypted"));
        }
        let data_start = file
            .data_start()
            .ok_or_else(|| format!("zip entry `{name}`: no data offset"))?;
        let stored = file.compression() == zip::CompressionMethod::Stored;
        let on_disk = if stored {
            file.size()
        } else {
            file.compressed_size()
        };
        if data_start
            .checked_add(on_disk)
            .is_none_or(|end| end > file_len)
        {
            return Err(format!(
                "zip entry `{name}` claims {on_disk} bytes past the end of the file (truncated?)"
            ));
        }
        let entry = Entry {
            index,
            size: file.size(),
            stored,
            data_start,
        };
        if entries.insert(name.clone(), entry).is_some() {
            return Err(format!("zip entry `{name}` appears twice"));
        }
    }
    let prefix = prefix.ok_or("empty zip archive")?;
    Ok((prefix, entries))
}

/// An entry's bytes, refusing more than `limit` (the entry's own declaration is not trusted:
/// a compressed entry is read until the limit and no further).
fn read_entry<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    entry: &Entry,
    limit: u64,
    what: &str,
) -> std::result::Result<Vec<u8>, String> {
    if entry.size > limit {
        return Err(format!(
            "{what} declares {} bytes, more than the {limit} accepted",
            entry.size
        ));
    }
    let file = zip
        .by_index(entry.index)
        .map_err(|e| format!("{what} unreadable: {e}"))?;
    let mut bytes = Vec::with_capacity(entry.size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what} unreadable (corrupt or truncated archive?): {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{what} inflates past {limit} bytes (a zip bomb?)"));
    }
    Ok(bytes)
}

/// The last element index a view reaches, plus one (`None` on overflow).
fn extent(shape: &[usize], stride: &[usize], offset: usize) -> Option<usize> {
    if shape.contains(&0) {
        return Some(offset);
    }
    shape
        .iter()
        .zip(stride)
        .try_fold(offset, |end, (&dim, &stride)| {
            end.checked_add((dim - 1).checked_mul(stride)?)
        })?
        .checked_add(1)
}

/// The tensor's layout checked against the archive entry of its storage.
fn check_tensor(raw: RawTensor, entry: &Entry) -> std::result::Result<StoredTensor, String> {
    let size = raw.dtype.size_in_bytes();
    if raw.shape.len() != raw.stride.len() {
        return Err(format!(
            "size {:?} and stride {:?} differ in rank",
            raw.shape, raw.stride
        ));
    }
    let numel = raw
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("size {:?} overflows", raw.shape))?;
    let storage_bytes = raw
        .storage_numel
        .checked_mul(size)
        .ok_or_else(|| format!("storage of {} elements overflows", raw.storage_numel))?;
    if !entry.stored {
        return Err("its storage is compressed; torch.save stores tensor data uncompressed".into());
    }
    if (storage_bytes as u64) > entry.size {
        return Err(format!(
            "its storage claims {storage_bytes} bytes, the archive holds {}",
            entry.size
        ));
    }
    let end = extent(&raw.shape, &raw.stride, raw.offset).ok_or_else(|| {
        format!(
            "size {:?} with stride {:?} overflows",
            raw.shape, raw.stride
        )
    })?;
    if numel > 0 && end > raw.storage_numel {
        return Err(format!(
            "size {:?}, stride {:?} and offset {} reach element {end}, past its storage of {}",
            raw.shape, raw.stride, raw.offset, raw.storage_numel
        ));
    }
    Ok(StoredTensor {
        dtype: raw.dtype,
        shape: raw.shape,
        stride: raw.stride,
        offset: raw.offset,
        storage: raw.storage,
        storage_start: entry.data_start,
        storage_numel: raw.storage_numel,
    })
}

/// The elements of a strided view, in row-major order (`all` holds the storage from 0).
fn gather(all: &[u8], info: &StoredTensor, size: usize) -> Vec<u8> {
    let numel = info.numel();
    let mut out = Vec::with_capacity(numel * size);
    let mut index = vec![0usize; info.shape.len()];
    for _ in 0..numel {
        let at = info.offset
            + index
                .iter()
                .zip(&info.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&all[at * size..(at + 1) * size]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < info.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}
