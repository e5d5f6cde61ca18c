//! Hostile model files for the reliability suite: a pickle assembler that writes any opcode
//! sequence, `torch.save`-shaped zip archives around it (stored or deflated entries, any
//! names), and the bytes of a well-formed state dict to mutate.
//!
//! These are test doubles of attackers' files: nothing here is used by the plugin.

use std::io::{Cursor, Write};

use gstllamavid::model::torch_save::{state_dict_pickle, StorageType, TensorEntry};

/// A pickle written opcode by opcode (protocol 2, like `torch.save`).
#[derive(Default, Clone)]
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn new() -> Self {
        Pickle(vec![0x80, 2])
    }

    pub fn op(mut self, op: u8) -> Self {
        self.0.push(op);
        self
    }

    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn global(self, module: &str, name: &str) -> Self {
        self.op(b'c')
            .bytes(module.as_bytes())
            .op(b'\n')
            .bytes(name.as_bytes())
            .op(b'\n')
    }

    pub fn unicode(self, s: &str) -> Self {
        self.op(b'X')
            .bytes(&(s.len() as u32).to_le_bytes())
            .bytes(s.as_bytes())
    }

    pub fn int(self, v: i32) -> Self {
        self.op(b'J').bytes(&v.to_le_bytes())
    }

    /// LONG1 of a 64-bit value (two's complement, 8 bytes).
    pub fn long(self, v: i64) -> Self {
        self.op(0x8a).op(8).bytes(&v.to_le_bytes())
    }

    pub fn mark(self) -> Self {
        self.op(b'(')
    }

    pub fn tuple(self) -> Self {
        self.op(b't')
    }

    pub fn ints(self, values: &[i64]) -> Self {
        let mut p = self.mark();
        for &v in values {
            p = p.long(v);
        }
        p.tuple()
    }

    /// `persistent_load(('storage', torch.<class>, key, 'cpu', numel))`.
    pub fn storage(self, class: &str, key: &str, numel: i64) -> Self {
        self.mark()
            .unicode("storage")
            .global("torch", class)
            .unicode(key)
            .unicode("cpu")
            .long(numel)
            .tuple()
            .op(b'Q')
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    pub fn tensor(
        self,
        class: &str,
        key: &str,
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .storage(class, key, numel)
            .long(offset)
            .ints(size)
            .ints(stride)
            .op(0x89)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .tuple()
            .op(b'R')
    }

    /// `{name: tensor}` around the tensor pushed by `value`, then STOP.
    pub fn state_dict_of(value: impl FnOnce(Pickle) -> Pickle, name: &str) -> Pickle {
        value(Pickle::new().op(b'}').mark().unicode(name))
            .op(b'u')
            .op(b'.')
    }

    /// The pickle that calls `posix.system(command)` when Python unpickles it.
    pub fn system(command: &str) -> Pickle {
        Pickle::new()
            .global("posix", "system")
            .unicode(command)
            .op(0x85)
            .op(b'R')
            .op(b'.')
    }

    pub fn stop(self) -> Self {
        self.op(b'.')
    }
}

/// One zip entry of a hand-made archive.
pub struct ZipEntry {
    pub name: String,
    pub data: Vec<u8>,
    pub deflate: bool,
}

impl ZipEntry {
    pub fn stored(name: &str, data: impl Into<Vec<u8>>) -> Self {
        ZipEntry {
            name: name.into(),
            data: data.into(),
            deflate: false,
        }
    }

    pub fn deflated(name: &str, data: impl Into<Vec<u8>>) -> Self {
        ZipEntry {
            name: name.into(),
            data: data.into(),
            deflate: true,
        }
    }
}

/// A zip archive of `entries`, in order, with any names.
pub fn zip_of(entries: &[ZipEntry]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for entry in entries {
        let method = if entry.deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .large_file(entry.data.len() as u64 >= u32::MAX as u64);
        zip.start_file(entry.name.as_str(), options)
            .expect("zip entry");
        zip.write_all(&entry.data).expect("zip data");
    }
    zip.finish().expect("zip").into_inner()
}

/// A `torch.save` archive (folder `archive`) of `pickle` and storages `data/<key>`.
pub fn torch_archive(pickle: &Pickle, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = vec![
        ZipEntry::stored("archive/data.pkl", pickle.0.clone()),
        ZipEntry::stored("archive/byteorder", "little"),
    ];
    for (key, data) in storages {
        entries.push(ZipEntry::stored(
            &format!("archive/data/{key}"),
            data.clone(),
        ));
    }
    entries.push(ZipEntry::stored("archive/version", "3\n"));
    zip_of(&entries)
}

/// A well-formed archive of two small f32 tensors, as `torch.save` writes it.
pub fn small_state_dict() -> Vec<u8> {
    let entries = vec![
        TensorEntry {
            name: "a.weight".into(),
            dtype: StorageType::F32,
            shape: vec![2, 3],
        },
        TensorEntry {
            name: "b.bias".into(),
            dtype: StorageType::F32,
            shape: vec![4],
        },
    ];
    let data: Vec<Vec<u8>> = entries
        .iter()
        .enumerate()
        .map(|(t, e)| {
            (0..e.numel())
                .flat_map(|i| ((t * 100 + i) as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let pickle = Pickle(state_dict_pickle(&entries));
    torch_archive(&pickle, &[("0", data[0].clone()), ("1", data[1].clone())])
}
