//! A minimal reader of the protobuf wire format, just enough for SentencePiece's `ModelProto`.
//!
//! Real LLaMA releases ship their tokenizer only as `tokenizer.model`, a serialized protobuf.
//! Pulling in a protobuf code generator for one small, stable schema is not worth it: the wire
//! format is four value kinds and a varint. Every read is bounds-checked, so a truncated or foreign
//! file gives a [`WireError`] with a byte offset, never a panic.

use std::fmt;

/// Why a buffer is not valid protobuf, and where (offset from the start of the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub offset: usize,
    pub what: String,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}: {}", self.offset, self.what)
    }
}

impl std::error::Error for WireError {}

/// One field value as it is on the wire; the schema decides what it means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WireValue<'a> {
    Varint(u64),
    Fixed64(u64),
    /// Length-delimited payload (string, bytes, embedded message, packed repeated field).
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl WireValue<'_> {
    fn kind(&self) -> &'static str {
        match self {
            WireValue::Varint(_) => "varint",
            WireValue::Fixed64(_) => "64-bit",
            WireValue::Bytes(_) => "length-delimited",
            WireValue::Fixed32(_) => "32-bit",
        }
    }
}

/// One decoded field: its number, value, and the absolute offset of the value (so errors in an
/// embedded message can point into the file rather than into the sub-slice).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field<'a> {
    pub number: u32,
    pub value: WireValue<'a>,
    pub offset: usize,
}

impl<'a> Field<'a> {
    fn wrong_type(&self, expected: &str) -> WireError {
        WireError {
            offset: self.offset,
            what: format!(
                "field {} is {}, expected {expected}",
                self.number,
                self.value.kind()
            ),
        }
    }

    /// `bool`, `int32`, `uint32`, `int64`, `uint64` and enums are varints.
    pub fn varint(&self) -> Result<u64, WireError> {
        match self.value {
            WireValue::Varint(v) => Ok(v),
            _ => Err(self.wrong_type("a varint")),
        }
    }

    pub fn bool(&self) -> Result<bool, WireError> {
        self.varint().map(|v| v != 0)
    }

    /// Protobuf `int32`: negative values are sign-extended to 64 bits on the wire, and a parser
    /// keeps the low 32 bits.
    pub fn int32(&self) -> Result<i32, WireError> {
        self.varint().map(|v| v as i32)
    }

    pub fn float(&self) -> Result<f32, WireError> {
        match self.value {
            WireValue::Fixed32(bits) => Ok(f32::from_bits(bits)),
            _ => Err(self.wrong_type("a 32-bit float")),
        }
    }

    pub fn bytes(&self) -> Result<&'a [u8], WireError> {
        match self.value {
            WireValue::Bytes(b) => Ok(b),
            _ => Err(self.wrong_type("length-delimited")),
        }
    }

    pub fn string(&self) -> Result<String, WireError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|e| WireError {
            offset: self.offset + e.utf8_error().valid_up_to(),
            what: format!("field {} is not valid UTF-8", self.number),
        })
    }

    /// The fields of an embedded message.
    pub fn message(&self) -> Result<Fields<'a>, WireError> {
        Ok(Fields::new(self.bytes()?, self.offset))
    }
}

/// Iterator over the fields of one message. After the first error it yields nothing more.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    /// `base` is the absolute offset of `buf[0]`, used only in error messages.
    pub fn new(buf: &'a [u8], base: usize) -> Self {
        Fields {
            buf,
            pos: 0,
            base,
            failed: false,
        }
    }

    fn error(&self, at: usize, what: impl Into<String>) -> WireError {
        WireError {
            offset: self.base + at,
            what: what.into(),
        }
    }

    fn read_varint(&mut self) -> Result<u64, WireError> {
        let start = self.pos;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(self.error(start, "truncated varint"));
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error(start, "varint longer than 10 bytes"))
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], WireError> {
        let start = self.pos;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                self.error(
                    start,
                    format!(
                        "truncated {what}: needs {len} bytes, {} left",
                        self.buf.len() - start
                    ),
                )
            })?;
        self.pos = end;
        Ok(&self.buf[start..end])
    }

    fn read_field(&mut self) -> Result<Field<'a>, WireError> {
        let key_at = self.pos;
        let key = self.read_varint()?;
        let number = u32::try_from(key >> 3)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| self.error(key_at, format!("invalid field number {}", key >> 3)))?;
        let offset = self.base + self.pos;
        let value = match key & 7 {
            0 => WireValue::Varint(self.read_varint()?),
            1 => {
                let b = self.take(8, "64-bit value")?;
                WireValue::Fixed64(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            }
            2 => {
                let len_at = self.pos;
                let len = self.read_varint()?;
                let len = usize::try_from(len).map_err(|_| {
                    self.error(len_at, format!("length {len} does not fit in memory"))
                })?;
                let payload_at = self.base + self.pos;
                let bytes = self.take(len, "length-delimited field")?;
                return Ok(Field {
                    number,
                    value: WireValue::Bytes(bytes),
                    offset: payload_at,
                });
            }
            5 => {
                let b = self.take(4, "32-bit value")?;
                WireValue::Fixed32(u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
            }
            other => {
                return Err(self.error(
                    key_at,
                    format!("field {number} has unsupported wire type {other}"),
                ))
            }
        };
        Ok(Field {
            number,
            value,
            offset,
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let field = self.read_field();
        self.failed = field.is_err();
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(buf: &[u8]) -> Result<Vec<Field<'_>>, WireError> {
        Fields::new(buf, 0).collect()
    }

    #[test]
    fn reads_each_wire_type() {
        // field 1 varint 300, field 2 bytes "hi", field 3 fixed32 1.5f, field 4 fixed64 7
        let mut buf = vec![0x08, 0xac, 0x02, 0x12, 0x02, b'h', b'i', 0x1d];
        buf.extend_from_slice(&1.5f32.to_le_bytes());
        buf.push(0x21);
        buf.extend_from_slice(&7u64.to_le_bytes());
        let fields = collect(&buf).unwrap();
        assert_eq!(fields.len(), 4);
        assert_eq!(fields[0].varint().unwrap(), 300);
        assert_eq!(fields[1].string().unwrap(), "hi");
        assert_eq!(fields[1].offset, 5);
        assert_eq!(fields[2].float().unwrap(), 1.5);
        assert_eq!(fields[3].value, WireValue::Fixed64(7));
    }

    #[test]
    fn negative_int32_is_ten_byte_varint() {
        let buf = [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert_eq!(collect(&buf).unwrap()[0].int32().unwrap(), -1);
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let full = [0x12, 0x05, b'h', b'e', b'l', b'l', b'o'];
        for cut in 1..full.len() {
            let err = collect(&full[..cut]).unwrap_err();
            assert!(err.what.contains("truncated"), "{cut}: {err}");
        }
        assert!(collect(&[0x08, 0x80]).unwrap_err().what.contains("varint"));
        assert!(collect(&[0x0d, 0x00]).unwrap_err().what.contains("32-bit"));
    }

    #[test]
    fn rejects_bad_keys_and_overlong_varints() {
        assert!(collect(&[0x00, 0x01])
            .unwrap_err()
            .what
            .contains("field number"));
        assert!(collect(&[0x0b]).unwrap_err().what.contains("wire type 3"));
        let overlong = [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert!(collect(&overlong).unwrap_err().what.contains("10 bytes"));
    }

    #[test]
    fn wrong_type_for_schema_is_reported() {
        let fields = collect(&[0x08, 0x01]).unwrap();
        let err = fields[0].string().unwrap_err();
        assert!(err.what.contains("expected length-delimited"), "{err}");
    }
}
