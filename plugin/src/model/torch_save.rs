//! The one writer of the `torch.save` format (the zip serialization of torch >= 1.6) in the
//! project: random checkpoints for tests and benchmarks are written with it, and so are the
//! `prompt_embeds` a vLLM server decodes with `torch.load(weights_only=True)`.
//!
//! A `torch.save` file is a stored (uncompressed) zip archive holding
//!
//! ```text
//! <archive>/data.pkl     protocol-2 pickle: one tensor, or an OrderedDict name -> tensor
//! <archive>/byteorder    "little"
//! <archive>/data/<key>   raw little-endian storage of each tensor, 64-byte aligned
//! <archive>/version      "3"
//! ```
//!
//! Each tensor is rebuilt by `torch._utils._rebuild_tensor_v2(persistent_load(('storage',
//! torch.<Dtype>Storage, key, 'cpu', numel)), 0, size, stride, False, OrderedDict())`, exactly
//! what `torch.save` writes; the weights-only unpickler accepts every global used. Tensor data
//! is streamed chunk by chunk, so a file far larger than memory can be written; ZIP64 records
//! are added when offsets pass 4 GiB.

use std::fs::File;
use std::io::{BufWriter, Cursor, Seek, SeekFrom, Write};
use std::path::Path;

type Result<T> = std::io::Result<T>;

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

macro_rules! bail {
    ($($arg:tt)*) => { return Err(invalid(format!($($arg)*))) };
}

/// Storage types this writer knows (the ones release checkpoints use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    F32,
    Bf16,
    F16,
    I64,
}

impl StorageType {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
            Self::I64 => 8,
        }
    }

    fn class(self) -> &'static str {
        match self {
            Self::F32 => "FloatStorage",
            Self::Bf16 => "BFloat16Storage",
            Self::F16 => "HalfStorage",
            Self::I64 => "LongStorage",
        }
    }
}

/// One tensor of the state dict, declared before any data is written (the pickle goes first).
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: StorageType,
    pub shape: Vec<usize>,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }
}

/// The pickle `torch.save` writes for a state dict (protocol 2, like torch's default).
pub fn state_dict_pickle(entries: &[TensorEntry]) -> Vec<u8> {
    let mut p = Pickler::default();
    p.out.extend_from_slice(&[0x80, 2]); // PROTO 2
    p.global("collections", "OrderedDict");
    p.out.push(b')'); // EMPTY_TUPLE
    p.out.push(b'R'); // REDUCE -> OrderedDict()
    for (b, batch) in entries.chunks(1000).enumerate() {
        p.out.push(b'('); // MARK
        for (i, entry) in batch.iter().enumerate() {
            p.unicode(&entry.name);
            p.tensor(entry, &(b * 1000 + i).to_string());
        }
        p.out.push(b'u'); // SETITEMS
    }
    p.out.push(b'.'); // STOP
    p.out
}

/// The pickle `torch.save(tensor)` writes for a single tensor (its storage key is "0").
pub fn tensor_pickle(entry: &TensorEntry) -> Vec<u8> {
    let mut p = Pickler::default();
    p.out.extend_from_slice(&[0x80, 2]); // PROTO 2
    p.tensor(entry, "0");
    p.out.push(b'.'); // STOP
    p.out
}

/// The bytes of `torch.save(tensor)` for one tensor of `dtype` and `shape` whose raw
/// little-endian, row-major storage is `data` (the name of `entry` is not used).
pub fn save_tensor_to_vec(entry: &TensorEntry, data: &[u8]) -> Result<Vec<u8>> {
    if data.len() as u64 != entry.bytes() {
        bail!(
            "tensor of shape {:?} needs {} bytes of data, got {}",
            entry.shape,
            entry.bytes(),
            data.len()
        );
    }
    // torch names the folder after the file; for a buffer it uses "archive".
    let archive = "archive";
    let mut zip = ZipStoreWriter::new(Cursor::new(Vec::with_capacity(data.len() + 1024)));
    zip.add_entry(&format!("{archive}/data.pkl"), &tensor_pickle(entry))?;
    zip.add_entry(&format!("{archive}/byteorder"), b"little")?;
    zip.add_entry(&format!("{archive}/data/0"), data)?;
    zip.add_entry(&format!("{archive}/version"), b"3\n")?;
    Ok(zip.finish()?.into_inner())
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    /// `_rebuild_tensor_v2(persistent_load(('storage', torch.<Dtype>Storage, key, 'cpu',
    /// numel)), 0, size, stride, False, OrderedDict())`, leaving the tensor on the stack.
    fn tensor(&mut self, entry: &TensorEntry, key: &str) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'('); // MARK (args of _rebuild_tensor_v2)
        self.out.push(b'('); // MARK (persistent id tuple)
        self.unicode("storage");
        self.global("torch", entry.dtype.class());
        self.unicode(key);
        self.unicode("cpu");
        self.int(entry.numel() as i64);
        self.out.push(b't'); // TUPLE
        self.out.push(b'Q'); // BINPERSID
        self.int(0); // storage offset
        self.tuple_of_ints(&entry.shape);
        self.tuple_of_ints(&contiguous_strides(&entry.shape));
        self.out.push(0x89); // NEWFALSE (requires_grad)
        self.global("collections", "OrderedDict");
        self.out.push(b')');
        self.out.push(b'R'); // backward_hooks = OrderedDict()
        self.out.push(b't'); // TUPLE
        self.out.push(b'R'); // REDUCE
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn unicode(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.push(b'K');
            self.out.push(v as u8);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1 with 8 little-endian bytes.
            self.out.push(0x8a);
            self.out.push(8);
            self.out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn tuple_of_ints(&mut self, values: &[usize]) {
        match values.len() {
            0 => self.out.push(b')'),
            1..=3 => {
                for &v in values {
                    self.int(v as i64);
                }
                self.out.push([0x85, 0x86, 0x87][values.len() - 1]);
            }
            _ => {
                self.out.push(b'(');
                for &v in values {
                    self.int(v as i64);
                }
                self.out.push(b't');
            }
        }
    }
}

struct CentralEntry {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

/// A zip archive of stored entries, written front to back with one seek back per entry to
/// fill in its CRC.
pub struct ZipStoreWriter<W: Write + Seek = BufWriter<File>> {
    file: W,
    pos: u64,
    entries: Vec<CentralEntry>,
    /// The entry being written: its header position, expected size, bytes so far, CRC state.
    open: Option<(u64, u64, u64, crc32fast::Hasher)>,
}

const ALIGN: u64 = 64;
const LOCAL_HEADER: u64 = 30;

impl ZipStoreWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("creating {}: {e}", path.display()))
        })?;
        Ok(Self::new(BufWriter::with_capacity(8 << 20, file)))
    }
}

impl<W: Write + Seek> ZipStoreWriter<W> {
    /// An archive written to `file` from its current position 0.
    pub fn new(file: W) -> Self {
        Self {
            file,
            pos: 0,
            entries: Vec::new(),
            open: None,
        }
    }

    /// Starts an entry of exactly `size` bytes whose data begins 64-byte aligned (as torch
    /// writes them, so that readers may map the storages).
    pub fn start_entry(&mut self, name: &str, size: u64) -> Result<()> {
        if self.open.is_some() {
            bail!("zip entry {name} started before the previous one was finished");
        }
        if size >= u32::MAX as u64 {
            bail!("zip entry {name} is {size} bytes; entries must stay below 4 GiB");
        }
        let header_at = self.pos;
        let unpadded = header_at + LOCAL_HEADER + name.len() as u64 + 4;
        let pad = (ALIGN - unpadded % ALIGN) % ALIGN;
        let extra_len = 4 + pad;
        let mut h = Vec::with_capacity(64 + name.len());
        h.extend_from_slice(&0x04034b50u32.to_le_bytes());
        h.extend_from_slice(&20u16.to_le_bytes()); // version needed
        h.extend_from_slice(&0u16.to_le_bytes()); // flags
        h.extend_from_slice(&0u16.to_le_bytes()); // method: stored
        h.extend_from_slice(&0u16.to_le_bytes()); // time
        h.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        h.extend_from_slice(&0u32.to_le_bytes()); // crc (patched)
        h.extend_from_slice(&(size as u32).to_le_bytes());
        h.extend_from_slice(&(size as u32).to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&(extra_len as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        // Padding extra field, id "FB" like torch's.
        h.extend_from_slice(&0x4246u16.to_le_bytes());
        h.extend_from_slice(&(pad as u16).to_le_bytes());
        h.resize(h.len() + pad as usize, b'Z');
        self.file.write_all(&h)?;
        self.pos += h.len() as u64;
        debug_assert_eq!(self.pos % ALIGN, 0);
        self.entries.push(CentralEntry {
            name: name.to_owned(),
            crc: 0,
            size,
            offset: header_at,
        });
        self.open = Some((header_at, size, 0, crc32fast::Hasher::new()));
        Ok(())
    }

    pub fn write_data(&mut self, data: &[u8]) -> Result<()> {
        let Some((_, size, written, hasher)) = self.open.as_mut() else {
            bail!("zip data written outside an entry");
        };
        *written += data.len() as u64;
        if *written > *size {
            bail!("zip entry longer than declared ({written} > {size})");
        }
        hasher.update(data);
        self.file.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    pub fn finish_entry(&mut self) -> Result<()> {
        let Some((header_at, size, written, hasher)) = self.open.take() else {
            bail!("no zip entry to finish");
        };
        if written != size {
            bail!("zip entry shorter than declared ({written} < {size})");
        }
        let crc = hasher.finalize();
        self.entries.last_mut().expect("open entry").crc = crc;
        self.file.seek(SeekFrom::Start(header_at + 14))?;
        self.file.write_all(&crc.to_le_bytes())?;
        self.file.seek(SeekFrom::Start(self.pos))?;
        Ok(())
    }

    pub fn add_entry(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.start_entry(name, data.len() as u64)?;
        self.write_data(data)?;
        self.finish_entry()
    }

    /// Writes the central directory (with ZIP64 records when needed), flushes, and returns
    /// the sink.
    pub fn finish(mut self) -> Result<W> {
        if self.open.is_some() {
            bail!("zip finished with an entry still open");
        }
        let cd_start = self.pos;
        let mut cd = Vec::new();
        for e in &self.entries {
            let big = e.offset >= u32::MAX as u64;
            let extra: Vec<u8> = if big {
                let mut x = Vec::new();
                x.extend_from_slice(&1u16.to_le_bytes());
                x.extend_from_slice(&8u16.to_le_bytes());
                x.extend_from_slice(&e.offset.to_le_bytes());
                x
            } else {
                Vec::new()
            };
            cd.extend_from_slice(&0x02014b50u32.to_le_bytes());
            cd.extend_from_slice(&(if big { 45u16 } else { 20u16 }).to_le_bytes()); // made by
            cd.extend_from_slice(&(if big { 45u16 } else { 20u16 }).to_le_bytes()); // needed
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0x21u16.to_le_bytes());
            cd.extend_from_slice(&e.crc.to_le_bytes());
            cd.extend_from_slice(&(e.size as u32).to_le_bytes());
            cd.extend_from_slice(&(e.size as u32).to_le_bytes());
            cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes()); // comment
            cd.extend_from_slice(&0u16.to_le_bytes()); // disk
            cd.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            cd.extend_from_slice(&0u32.to_le_bytes()); // external attributes
            let offset = if big { u32::MAX } else { e.offset as u32 };
            cd.extend_from_slice(&offset.to_le_bytes());
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        self.file.write_all(&cd)?;
        let cd_size = cd.len() as u64;
        let count = self.entries.len() as u64;
        let eocd64_at = cd_start + cd_size;
        let zip64 = cd_start >= u32::MAX as u64 || count >= 0xFFFF;
        let mut tail = Vec::new();
        if zip64 {
            tail.extend_from_slice(&0x06064b50u32.to_le_bytes());
            tail.extend_from_slice(&44u64.to_le_bytes());
            tail.extend_from_slice(&45u16.to_le_bytes());
            tail.extend_from_slice(&45u16.to_le_bytes());
            tail.extend_from_slice(&0u32.to_le_bytes());
            tail.extend_from_slice(&0u32.to_le_bytes());
            tail.extend_from_slice(&count.to_le_bytes());
            tail.extend_from_slice(&count.to_le_bytes());
            tail.extend_from_slice(&cd_size.to_le_bytes());
            tail.extend_from_slice(&cd_start.to_le_bytes());
            tail.extend_from_slice(&0x07064b50u32.to_le_bytes());
            tail.extend_from_slice(&0u32.to_le_bytes());
            tail.extend_from_slice(&eocd64_at.to_le_bytes());
            tail.extend_from_slice(&1u32.to_le_bytes());
        }
        tail.extend_from_slice(&0x06054b50u32.to_le_bytes());
        tail.extend_from_slice(&0u16.to_le_bytes());
        tail.extend_from_slice(&0u16.to_le_bytes());
        let short_count = if zip64 { 0xFFFF } else { count as u16 };
        tail.extend_from_slice(&short_count.to_le_bytes());
        tail.extend_from_slice(&short_count.to_le_bytes());
        tail.extend_from_slice(&(cd_size as u32).to_le_bytes());
        let short_start = if zip64 { u32::MAX } else { cd_start as u32 };
        tail.extend_from_slice(&short_start.to_le_bytes());
        tail.extend_from_slice(&0u16.to_le_bytes());
        self.file.write_all(&tail)?;
        self.file.flush()?;
        Ok(self.file)
    }
}

/// Writes one `torch.save` file of `entries`; `fill(i, buf)` must produce the raw bytes of
/// entry `i` by appending to `buf` in as many calls to `sink` as it likes.
pub struct TorchFileWriter {
    zip: ZipStoreWriter,
    archive: String,
    entries: Vec<TensorEntry>,
    next: usize,
}

impl TorchFileWriter {
    /// `archive` is the folder name inside the zip (torch uses the file's stem).
    pub fn create(path: &Path, entries: Vec<TensorEntry>) -> Result<Self> {
        let archive = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("archive")
            .to_owned();
        let mut zip = ZipStoreWriter::create(path)?;
        zip.add_entry(&format!("{archive}/data.pkl"), &state_dict_pickle(&entries))?;
        zip.add_entry(&format!("{archive}/byteorder"), b"little")?;
        Ok(Self {
            zip,
            archive,
            entries,
            next: 0,
        })
    }

    /// The next tensor to write, if any.
    pub fn next_entry(&self) -> Option<&TensorEntry> {
        self.entries.get(self.next)
    }

    /// Streams the data of the next tensor: `produce` is called with a sink for its bytes.
    pub fn write_next<E: From<std::io::Error>>(
        &mut self,
        produce: impl FnOnce(
            &TensorEntry,
            &mut dyn FnMut(&[u8]) -> Result<()>,
        ) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let Some(entry) = self.entries.get(self.next).cloned() else {
            return Err(invalid("no tensor left to write".into()).into());
        };
        self.zip.start_entry(
            &format!("{}/data/{}", self.archive, self.next),
            entry.bytes(),
        )?;
        let zip = &mut self.zip;
        produce(&entry, &mut |bytes: &[u8]| zip.write_data(bytes))?;
        self.zip.finish_entry()?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if self.next != self.entries.len() {
            bail!("{} of {} tensors written", self.next, self.entries.len());
        }
        self.zip
            .add_entry(&format!("{}/version", self.archive), b"3\n")?;
        self.zip.finish().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_row_major() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[5]), vec![1]);
    }
}
