//! The parts of SentencePiece's `ModelProto` (`sentencepiece_model.proto`) that encoding and
//! decoding depend on, read from a `tokenizer.model` file.
//!
//! Field numbers and defaults follow the `.proto` file. Defaults matter: a field equal to its
//! default is not written, so `model_type` absent means UNIGRAM and `add_dummy_prefix` absent means
//! true. A message field that occurs twice is merged, as protobuf parsers do (later values win).

use std::path::Path;

use super::protobuf::{Field, Fields, WireError};
use crate::model::error::{ModelError, Result};

/// `SentencePiece.Type`: how the encoder and decoder treat a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    /// `<s>`, `</s>`: never produced from text, invisible when decoded.
    Control,
    UserDefined,
    Unused,
    /// `<0xAB>`: one raw byte, used for characters outside the vocabulary (byte fallback).
    Byte,
}

impl PieceType {
    fn from_wire(value: u64) -> Option<Self> {
        Some(match value {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }

    /// Whether BPE may produce this piece by merging two adjacent symbols (SentencePiece keeps
    /// these in its mergeable piece table; control, unknown and byte pieces are reserved ids).
    pub fn is_mergeable(self) -> bool {
        matches!(
            self,
            PieceType::Normal | PieceType::UserDefined | PieceType::Unused
        )
    }
}

/// One vocabulary entry; its id is its index in [`SentencePieceModel::pieces`].
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

impl ModelType {
    fn from_wire(value: u64) -> Option<Self> {
        Some(match value {
            1 => ModelType::Unigram,
            2 => ModelType::Bpe,
            3 => ModelType::Word,
            4 => ModelType::Char,
            _ => return None,
        })
    }
}

/// Training options that also shape encoding (`TrainerSpec`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    pub model_type: ModelType,
    /// Characters outside the vocabulary become `<0xAB>` byte pieces instead of `<unk>`.
    pub byte_fallback: bool,
    /// Training kept every digit a piece of its own. Encoding needs nothing for it: no piece
    /// containing a digit and anything else exists, so no merge can join digits.
    pub split_digits: bool,
    pub treat_whitespace_as_suffix: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    /// What the decoder prints for `<unk>` (default " ⁇ ").
    pub unk_surface: String,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            model_type: ModelType::Unigram,
            byte_fallback: false,
            split_digits: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_surface: " \u{2047} ".to_owned(),
        }
    }
}

/// Text normalization applied before encoding (`NormalizerSpec`).
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    pub name: String,
    /// Compiled Unicode normalization rules; empty for LLaMA's "identity" normalizer.
    pub precompiled_charsmap: Vec<u8>,
    /// Prepend "▁" to the text, so the first word looks like every other word.
    pub add_dummy_prefix: bool,
    /// Strip leading/trailing spaces and collapse runs of spaces (false for LLaMA).
    pub remove_extra_whitespaces: bool,
    /// Replace " " by "▁" (U+2581).
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A parsed `tokenizer.model`.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
}

impl SentencePieceModel {
    /// Reads and parses `path`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::parse(&bytes).map_err(|msg| ModelError::Tokenizer {
            path: path.to_owned(),
            msg,
        })
    }

    /// Parses a serialized `ModelProto`. The message says what is wrong, for the user who picked
    /// the file.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let not_sp = |e: WireError| format!("not a SentencePiece model file ({e})");
        let mut model = SentencePieceModel {
            pieces: Vec::new(),
            trainer: TrainerSpec::default(),
            normalizer: NormalizerSpec::default(),
        };
        for field in Fields::new(bytes, 0) {
            let field = field.map_err(not_sp)?;
            match field.number {
                1 => model.pieces.push(parse_piece(&field).map_err(not_sp)?),
                2 => merge_trainer_spec(&mut model.trainer, &field).map_err(not_sp)?,
                3 => merge_normalizer_spec(&mut model.normalizer, &field).map_err(not_sp)?,
                _ => {} // self_test_data, denormalizer_spec, extensions: not needed
            }
        }
        model.validate()?;
        Ok(model)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.pieces.is_empty() {
            return Err("not a SentencePiece model file (no vocabulary pieces)".to_owned());
        }
        let n = self.pieces.len();
        let unk = self.trainer.unk_id;
        match usize::try_from(unk).ok().and_then(|i| self.pieces.get(i)) {
            Some(p) if p.kind == PieceType::Unknown => {}
            _ => {
                return Err(format!(
                    "unk_id {unk} is not an UNKNOWN piece of the {n}-piece vocabulary"
                ))
            }
        }
        Ok(())
    }

    /// The id of a special piece named by the trainer spec, if enabled (-1 disables) and in range.
    pub fn special_id(&self, id: i32) -> Option<u32> {
        u32::try_from(id)
            .ok()
            .filter(|&i| (i as usize) < self.pieces.len())
    }
}

fn parse_piece(field: &Field<'_>) -> std::result::Result<Piece, WireError> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    for f in field.message()? {
        let f = f?;
        match f.number {
            1 => piece.piece = f.string()?,
            2 => piece.score = f.float()?,
            3 => {
                let v = f.varint()?;
                piece.kind = PieceType::from_wire(v).ok_or_else(|| WireError {
                    offset: f.offset,
                    what: format!("unknown piece type {v}"),
                })?;
            }
            _ => {}
        }
    }
    Ok(piece)
}

fn merge_trainer_spec(
    spec: &mut TrainerSpec,
    field: &Field<'_>,
) -> std::result::Result<(), WireError> {
    for f in field.message()? {
        let f = f?;
        match f.number {
            3 => {
                let v = f.varint()?;
                spec.model_type = ModelType::from_wire(v).ok_or_else(|| WireError {
                    offset: f.offset,
                    what: format!("unknown model type {v}"),
                })?;
            }
            24 => spec.treat_whitespace_as_suffix = f.bool()?,
            25 => spec.split_digits = f.bool()?,
            35 => spec.byte_fallback = f.bool()?,
            40 => spec.unk_id = f.int32()?,
            41 => spec.bos_id = f.int32()?,
            42 => spec.eos_id = f.int32()?,
            43 => spec.pad_id = f.int32()?,
            44 => spec.unk_surface = f.string()?,
            _ => {}
        }
    }
    Ok(())
}

fn merge_normalizer_spec(
    spec: &mut NormalizerSpec,
    field: &Field<'_>,
) -> std::result::Result<(), WireError> {
    for f in field.message()? {
        let f = f?;
        match f.number {
            1 => spec.name = f.string()?,
            2 => spec.precompiled_charsmap = f.bytes()?.to_vec(),
            3 => spec.add_dummy_prefix = f.bool()?,
            4 => spec.remove_extra_whitespaces = f.bool()?,
            5 => spec.escape_whitespaces = f.bool()?,
            _ => {}
        }
    }
    Ok(())
}
