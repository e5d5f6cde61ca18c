//! The LLaMA (Vicuna) SentencePiece tokenizer, loaded from `tokenizer.json` or, as real releases
//! ship it, from `tokenizer.model` alone.
//!
//! Encoding never relies on a post-processor: BOS/EOS are added here, explicitly, so that the
//! per-chunk prompt tokenization (see [`crate::model::prompt`]) controls every special id.

use std::path::{Path, PathBuf};

use tokenizers::{
    NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    Tokenizer,
};

use super::hf_config::{NamedToken, SpecialTokenConfig};
use super::piece_decoder::{LeadingSpace, PieceDecoder, Surface};
use super::sentencepiece_model::{PieceType, SentencePieceModel};
use super::spm_to_bpe::{build_tokenizer, SPACE_MARK};
use crate::model::error::{panic_message, ModelError, Result};

/// BOS and EOS when no file names them (LLaMA's values).
const DEFAULT_BOS: u32 = 1;
const DEFAULT_EOS: u32 = 2;

#[derive(Debug, Clone)]
pub struct LlamaTokenizer {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token matching off, for user text.
    literal: Tokenizer,
    decoder: PieceDecoder,
    /// The file the vocabulary came from, for error messages.
    source: PathBuf,
    bos_id: u32,
    eos_id: u32,
    add_bos_token: bool,
    add_eos_token: bool,
}

impl LlamaTokenizer {
    /// The fast-tokenizer file transformers writes; preferred when present.
    pub const JSON_FILE: &'static str = "tokenizer.json";
    /// The SentencePiece model, the only tokenizer file real LLaMA-VID releases ship.
    pub const MODEL_FILE: &'static str = "tokenizer.model";

    /// Loads the tokenizer of an HF-style model directory: `tokenizer.json` if present, else
    /// `tokenizer.model`, plus `tokenizer_config.json` / `special_tokens_map.json` if present.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let json = dir.join(Self::JSON_FILE);
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let model = dir.join(Self::MODEL_FILE);
        if model.is_file() {
            return Self::from_sentencepiece_file(&model);
        }
        Err(ModelError::MissingFile {
            what: "LLaMA tokenizer",
            path: dir.to_owned(),
            hint: format!(
                "looked for {} and {} in this directory; copy the tokenizer files of the model \
                 release there",
                Self::JSON_FILE,
                Self::MODEL_FILE
            ),
        })
    }

    /// Loads a transformers `tokenizer.json`; special-token settings come from its directory.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        // The tokenizers crate panics on some malformed files (an `unwrap` in its decoder's
        // deserializer, found by the fuzz suite): a bad file must be an error, not a panic.
        let read = std::panic::catch_unwind(|| Tokenizer::from_file(path)).map_err(|payload| {
            ModelError::Tokenizer {
                path: path.to_owned(),
                msg: format!("unreadable tokenizer.json ({})", panic_message(&*payload)),
            }
        })?;
        let mut tokenizer = read.map_err(|e| tokenizer_error(path, e))?;
        // Only this type decides how ids are assembled.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| tokenizer_error(path, e))?;
        let surfaces = (0..tokenizer.get_vocab_size(true) as u32)
            .map(|id| match tokenizer.id_to_token(id) {
                Some(piece) => {
                    let special = tokenizer.get_added_vocabulary().is_special_token(&piece);
                    Surface::of_piece(&piece, special)
                }
                None => Surface::Missing,
            })
            .collect();
        let leading = if adds_dummy_prefix(&tokenizer).map_err(|e| tokenizer_error(path, e))? {
            LeadingSpace::StripFirst
        } else {
            LeadingSpace::Keep
        };
        Self::assemble(tokenizer, PieceDecoder::new(surfaces, leading), path, None)
    }

    /// Builds the tokenizer from a SentencePiece `tokenizer.model` (BPE only, as LLaMA's is).
    pub fn from_sentencepiece_file(path: &Path) -> Result<Self> {
        let model = SentencePieceModel::from_file(path)?;
        let tokenizer = build_tokenizer(&model).map_err(|msg| ModelError::Tokenizer {
            path: path.to_owned(),
            msg,
        })?;
        let surfaces = model
            .pieces
            .iter()
            .map(|p| match p.kind {
                PieceType::Control | PieceType::Unknown => Surface::Special,
                PieceType::Byte => match super::piece_decoder::byte_piece(&p.piece) {
                    Some(b) => Surface::Byte(b),
                    None => Surface::Text(p.piece.clone()),
                },
                _ => Surface::Text(p.piece.clone()),
            })
            .collect();
        let spec = &model.normalizer;
        let leading = if spec.remove_extra_whitespaces {
            LeadingSpace::StripAll
        } else if spec.add_dummy_prefix {
            LeadingSpace::StripFirst
        } else {
            LeadingSpace::Keep
        };
        Self::assemble(
            tokenizer,
            PieceDecoder::new(surfaces, leading),
            path,
            Some(&model),
        )
    }

    fn assemble(
        tokenizer: Tokenizer,
        decoder: PieceDecoder,
        source: &Path,
        model: Option<&SentencePieceModel>,
    ) -> Result<Self> {
        let dir = source.parent().unwrap_or(Path::new("."));
        let config = SpecialTokenConfig::read(dir)?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let resolve = |named: &Option<NamedToken>, from_model: Option<i32>, default: u32| {
            if let Some(named) = named {
                return tokenizer.token_to_id(&named.content).ok_or_else(|| {
                    ModelError::Tokenizer {
                        path: named.file.clone(),
                        msg: format!(
                            "special token {:?} is not in the vocabulary of {}",
                            named.content,
                            source.display()
                        ),
                    }
                });
            }
            let id = model
                .zip(from_model)
                .and_then(|(m, id)| m.special_id(id))
                .unwrap_or(default);
            if (id as usize) < vocab_size {
                Ok(id)
            } else {
                Err(ModelError::Tokenizer {
                    path: source.to_owned(),
                    msg: format!("special token id {id} is outside the vocabulary of {vocab_size}"),
                })
            }
        };
        let bos_id = resolve(&config.bos, model.map(|m| m.trainer.bos_id), DEFAULT_BOS)?;
        let eos_id = resolve(&config.eos, model.map(|m| m.trainer.eos_id), DEFAULT_EOS)?;
        let mut literal = tokenizer.clone();
        literal.set_encode_special_tokens(true);
        Ok(LlamaTokenizer {
            tokenizer,
            literal,
            decoder,
            source: source.to_owned(),
            bos_id,
            eos_id,
            add_bos_token: config.add_bos_token.unwrap_or(true),
            add_eos_token: config.add_eos_token.unwrap_or(false),
        })
    }

    /// Encodes one piece of text on its own (SentencePiece adds its dummy "▁" prefix to it), with
    /// BOS first when `add_bos` is set and no other special id added.
    pub fn encode_chunk(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.encode_with(&self.tokenizer, text, add_bos)
    }

    fn encode_with(&self, tokenizer: &Tokenizer, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| tokenizer_error(&self.source, e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos {
            ids.push(self.bos_id);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// What transformers' `tokenizer(text).input_ids` gives: BOS and EOS as
    /// `tokenizer_config.json` says (`add_bos_token` defaults to true, `add_eos_token` to false).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_bos_eos(&self.tokenizer, text)
    }

    /// [`Self::encode`] for text holding a user's words: `<s>`, `</s>` or `<unk>` written in it
    /// are tokenized as the characters they are, never as the special ids.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_bos_eos(&self.literal, text)
    }

    fn encode_bos_eos(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_with(tokenizer, text, self.add_bos_token)?;
        if self.add_eos_token {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// Decodes like `decode(ids, skip_special_tokens=True)` of the reference's slow tokenizer:
    /// special tokens skipped, the dummy-prefix space of the first piece dropped, invalid bytes
    /// as U+FFFD. Not stripped: see [`crate::model::prompt::clean_answer`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decoder
            .decode(ids)
            .map_err(|id| ModelError::Tokenizer {
                path: self.source.clone(),
                msg: format!(
                    "cannot decode id {id}: the vocabulary has {} entries",
                    self.vocab_size()
                ),
            })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Whether [`Self::encode`] starts with BOS (`add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos_token
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The file the vocabulary was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying `tokenizers` tokenizer (no post-processor, no truncation, no padding).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Whether the tokenizer puts "▁" in front of a text (normalizer `Prepend` or a `Metaspace`
/// pre-tokenizer): then decoding drops that space again, as SentencePiece does.
fn adds_dummy_prefix(tokenizer: &Tokenizer) -> tokenizers::Result<bool> {
    let mut normalized = NormalizedString::from("a");
    if let Some(normalizer) = tokenizer.get_normalizer() {
        normalizer.normalize(&mut normalized)?;
    }
    let mut pretokenized = PreTokenizedString::from(normalized);
    if let Some(pre_tokenizer) = tokenizer.get_pre_tokenizer() {
        pre_tokenizer.pre_tokenize(&mut pretokenized)?;
    }
    let splits = pretokenized.get_splits(OffsetReferential::Original, OffsetType::Char);
    Ok(splits
        .first()
        .is_some_and(|(s, _, _)| s.starts_with(SPACE_MARK)))
}

fn tokenizer_error(path: &Path, e: tokenizers::Error) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_owned(),
        msg: e.to_string(),
    }
}
