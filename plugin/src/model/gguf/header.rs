//! Why candle refused a GGUF header, in words that name the file and, where one is to blame,
//! the tensor. candle's reader stops at the first tensor of a type it does not know (the IQ
//! types, ternary or MXFP4 weights, ...) with only the numeric type; this walk over the header
//! finds that tensor's name. It is used only to explain a refusal: loading goes through candle.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::SUPPORTED_TYPES;
use crate::model::ModelError;

/// The ggml type ids candle reads.
fn known_type(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// ggml's name of a type id, for the message.
fn type_name(id: u32) -> String {
    let name = match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31..=33 => "Q4_0_4_4/Q4_0_4_8/Q4_0_8_8 (removed from ggml)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    };
    format!("{name} (ggml type {id})")
}

struct Walker<R> {
    r: R,
    wide: bool,
}

impl<R: Read + Seek> Walker<R> {
    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn len(&mut self) -> std::io::Result<u64> {
        if self.wide {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        self.r.seek(SeekFrom::Current(n as i64)).map(|_| ())
    }

    fn string(&mut self) -> std::io::Result<String> {
        let n = self.len()?;
        if n > 1 << 20 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut b = vec![0; n as usize];
        self.r.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn skip_value(&mut self, kind: u32, depth: usize) -> std::io::Result<()> {
        match kind {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let n = self.len()?;
                self.skip(n)
            }
            9 if depth < 8 => {
                let inner = self.u32()?;
                let n = self.len()?;
                for _ in 0..n {
                    self.skip_value(inner, depth + 1)?;
                }
                Ok(())
            }
            _ => Err(std::io::ErrorKind::InvalidData.into()),
        }
    }

    /// The first tensor whose type candle does not read: (name, type id).
    fn unknown_tensor(&mut self) -> std::io::Result<Option<(String, u32)>> {
        let _magic = self.u32()?;
        self.wide = self.u32()? >= 2;
        let tensors = self.len()?;
        let kvs = self.len()?;
        for _ in 0..kvs {
            self.string()?;
            let kind = self.u32()?;
            self.skip_value(kind, 0)?;
        }
        for _ in 0..tensors {
            let name = self.string()?;
            let dims = self.u32()?;
            self.skip(dims as u64 * if self.wide { 8 } else { 4 })?;
            let kind = self.u32()?;
            self.u64()?;
            if !known_type(kind) {
                return Ok(Some((name, kind)));
            }
        }
        Ok(None)
    }
}

/// The error for a header candle could not read.
pub(super) fn explain(path: &Path, error: candle_core::Error) -> ModelError {
    let text = error.to_string();
    if text.contains("unknown dtype") {
        let found = std::fs::File::open(path).ok().and_then(|f| {
            Walker {
                r: std::io::BufReader::new(f),
                wide: true,
            }
            .unknown_tensor()
            .ok()
            .flatten()
        });
        if let Some((tensor, id)) = found {
            return ModelError::BadTensor {
                path: path.to_owned(),
                tensor,
                msg: format!(
                    "quantization type {} is not supported (supported: {SUPPORTED_TYPES}); \
                     re-quantize the model, e.g. with llama.cpp's llama-quantize to Q4_K_M",
                    type_name(id)
                ),
            };
        }
    }
    let hint = if text.contains("magic") {
        "not a GGUF file"
    } else if text.contains("remaining") || text.contains("failed to fill whole buffer") {
        "the header is truncated or corrupt"
    } else {
        "unreadable GGUF header"
    };
    ModelError::bad_file(path, format!("{hint}: {text}"))
}
