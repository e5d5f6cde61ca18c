//! Ids back to text the way SentencePiece's `Decode` does it, which is what the reference's slow
//! `LlamaTokenizer.decode(..., skip_special_tokens=True)` calls.
//!
//! It differs from the `tokenizers` ByteFallback decoder on invalid UTF-8, which a sampled or
//! random-weight model does produce: SentencePiece keeps every valid character of a run of byte
//! pieces and turns each invalid byte into one U+FFFD, while ByteFallback turns the whole run into
//! U+FFFDs as soon as one byte is invalid.

/// What one id contributes to the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Surface {
    /// A vocabulary piece; "▁" reads as a space.
    Text(String),
    /// A `<0xAB>` byte-fallback piece.
    Byte(u8),
    /// BOS, EOS, UNK and other special tokens: skipped (`skip_special_tokens=True`).
    Special,
    /// An id the vocabulary does not define.
    Missing,
}

impl Surface {
    /// Classifies a piece string the way the `tokenizers` ByteFallback decoder does: exactly
    /// `<0x` + two hex digits + `>` is a byte.
    pub fn of_piece(piece: &str, special: bool) -> Surface {
        if special {
            return Surface::Special;
        }
        match byte_piece(piece) {
            Some(b) => Surface::Byte(b),
            None => Surface::Text(piece.to_owned()),
        }
    }
}

/// The byte of a `<0xAB>` piece.
pub fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Which leading "▁" of the decoded text is dropped (SentencePiece drops the dummy prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadingSpace {
    Keep,
    /// `add_dummy_prefix`: drop the "▁" that starts the first piece.
    StripFirst,
    /// `remove_extra_whitespaces`: drop the leading "▁" of pieces until text appears.
    StripAll,
}

#[derive(Debug, Clone)]
pub struct PieceDecoder {
    surfaces: Vec<Surface>,
    leading_space: LeadingSpace,
}

impl PieceDecoder {
    pub fn new(surfaces: Vec<Surface>, leading_space: LeadingSpace) -> Self {
        PieceDecoder {
            surfaces,
            leading_space,
        }
    }

    /// Decodes `ids`, skipping special tokens. Errors with the first id the vocabulary lacks.
    pub fn decode(&self, ids: &[u32]) -> Result<String, u32> {
        let mut text = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut expect_prefix = self.leading_space != LeadingSpace::Keep;
        let mut prefix_seen = false;
        for &id in ids {
            let surface = self.surfaces.get(id as usize).unwrap_or(&Surface::Missing);
            match surface {
                Surface::Missing => return Err(id),
                Surface::Special => {}
                Surface::Byte(b) => bytes.push(*b),
                Surface::Text(piece) => {
                    push_bytes(&mut text, &mut bytes);
                    if prefix_seen || !text.is_empty() {
                        expect_prefix = false;
                    }
                    let mut piece = piece.as_str();
                    prefix_seen = false;
                    if expect_prefix {
                        if let Some(rest) = piece.strip_prefix('\u{2581}') {
                            piece = rest;
                            prefix_seen = self.leading_space == LeadingSpace::StripFirst;
                        }
                    }
                    text.push_str(&piece.replace('\u{2581}', " "));
                }
            }
        }
        push_bytes(&mut text, &mut bytes);
        Ok(text)
    }
}

/// Appends a run of byte pieces: valid UTF-8 characters as they are, each invalid byte as one
/// U+FFFD (SentencePiece's rule).
fn push_bytes(text: &mut String, bytes: &mut Vec<u8>) {
    let mut rest: &[u8] = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                break;
            }
            Err(e) => {
                let (valid, invalid) = rest.split_at(e.valid_up_to());
                // `valid` is valid UTF-8 by construction; the fallback never triggers.
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                text.push('\u{FFFD}');
                rest = &invalid[1..];
            }
        }
    }
    bytes.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(leading: LeadingSpace) -> PieceDecoder {
        let mut surfaces = vec![Surface::Special, Surface::Text("\u{2581}a".into())];
        surfaces.extend((0..=255u8).map(Surface::Byte));
        PieceDecoder::new(surfaces, leading)
    }

    const BYTE0: u32 = 2;

    #[test]
    fn invalid_bytes_become_one_replacement_each() {
        let d = decoder(LeadingSpace::StripFirst);
        // 0xE2 0x82 is a truncated 3-byte character, then "A", then a valid "é".
        let ids = [
            BYTE0 + 0xE2,
            BYTE0 + 0x82,
            BYTE0 + 0x41,
            BYTE0 + 0xC3,
            BYTE0 + 0xA9,
        ];
        assert_eq!(d.decode(&ids).unwrap(), "\u{FFFD}\u{FFFD}Aé");
    }

    #[test]
    fn dummy_prefix_is_dropped_only_at_the_start() {
        let d = decoder(LeadingSpace::StripFirst);
        assert_eq!(d.decode(&[0, 1, 1]).unwrap(), "a a");
        assert_eq!(d.decode(&[BYTE0 + 0x41, 1]).unwrap(), "A a");
        assert_eq!(decoder(LeadingSpace::Keep).decode(&[1]).unwrap(), " a");
    }

    #[test]
    fn unknown_id_is_reported() {
        assert_eq!(decoder(LeadingSpace::Keep).decode(&[1, 9999]), Err(9999));
    }

    #[test]
    fn byte_piece_names() {
        assert_eq!(byte_piece("<0x0A>"), Some(10));
        assert_eq!(byte_piece("<0xfF>"), Some(255));
        assert_eq!(byte_piece("<0x0A"), None);
        assert_eq!(byte_piece("<0x100>"), None);
    }
}
