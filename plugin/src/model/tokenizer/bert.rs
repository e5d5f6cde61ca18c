//! The Q-Former's text tokenizer: BERT-uncased WordPiece built from `vocab.txt` alone (what
//! `bert-base-uncased` ships), reproducing the reference's slow `BertTokenizer` with
//! `truncation_side="left"`.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::Vocab;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

use crate::model::error::{ModelError, Result};

/// The reference tokenizes the question with `truncation=True, max_length=256`.
pub const QFORMER_MAX_TOKENS: usize = 256;

/// Special tokens of the uncased BERT vocabulary; in the text they stay whole, as in
/// transformers, when present in `vocab.txt`.
const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// LAVIS adds `[DEC]` as BOS after the vocabulary (never inserted, but matched in text).
pub const DEC_TOKEN: &str = "[DEC]";

#[derive(Debug, Clone)]
pub struct BertTokenizer {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token matching off, for user text.
    literal: Tokenizer,
    cls_id: u32,
    sep_id: u32,
    source: PathBuf,
}

impl BertTokenizer {
    /// Builds the lower-casing WordPiece tokenizer from a `vocab.txt` (one token per line, id =
    /// line number) and appends `[DEC]` as the next id, as the reference does.
    pub fn from_vocab_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                what: "BERT vocabulary",
                path: path.to_owned(),
                hint: "the Q-Former tokenizer needs bert-base-uncased's vocab.txt".to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let err = |msg: String| ModelError::Tokenizer {
            path: path.to_owned(),
            msg,
        };
        // Python's `readlines()` + `rstrip("\n")`: every line is a token, duplicates keep the
        // last id.
        let mut vocab = Vocab::default();
        for (id, line) in text.lines().enumerate() {
            let id = u32::try_from(id).map_err(|_| err("more than 2^32 lines".to_owned()))?;
            vocab.insert(line.to_owned(), id);
        }
        let id_of = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| err(format!("{token} is missing from the vocabulary")))
        };
        let cls_id = id_of("[CLS]")?;
        let sep_id = id_of("[SEP]")?;
        id_of("[UNK]")?;
        let present: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .filter(|t| vocab.contains_key(**t))
            .map(|t| AddedToken::from(*t, true))
            .collect();

        let wordpiece = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".to_owned())
            .continuing_subword_prefix("##".to_owned())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| err(format!("cannot build WordPiece: {e}")))?;
        let mut tokenizer = Tokenizer::new(wordpiece);
        tokenizer
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(|e| err(format!("cannot set the normalizer: {e}")))?;
        tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
        tokenizer
            .add_special_tokens(present)
            .and_then(|_| tokenizer.add_special_tokens([AddedToken::from(DEC_TOKEN, true)]))
            .map_err(|e| err(format!("cannot add the special tokens: {e}")))?;
        let mut literal = tokenizer.clone();
        literal.set_encode_special_tokens(true);
        Ok(BertTokenizer {
            tokenizer,
            literal,
            cls_id,
            sep_id,
            source: path.to_owned(),
        })
    }

    /// `[CLS] question [SEP]`, truncated to [`QFORMER_MAX_TOKENS`] from the left.
    pub fn encode_question(&self, question: &str) -> Result<Vec<u32>> {
        self.encode_with_max_len(question, QFORMER_MAX_TOKENS)
    }

    /// `[CLS] text [SEP]` with at most `max_len` ids. Like transformers 4.31 with
    /// `truncation_side="left"`: the oldest text tokens are dropped, then `[CLS]`/`[SEP]` added.
    pub fn encode_with_max_len(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        self.encode_framed(&self.tokenizer, text, max_len)
    }

    /// [`Self::encode_with_max_len`] for a user's text: `[SEP]`, `[CLS]` or `[DEC]` written in
    /// it are tokenized as the characters they are, never as the special ids (the question
    /// cannot end itself early or pose as structure).
    pub fn encode_literal_with_max_len(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        self.encode_framed(&self.literal, text, max_len)
    }

    fn encode_framed(&self, tokenizer: &Tokenizer, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 2 {
            return Err(ModelError::InvalidInput(format!(
                "max_len {max_len} leaves no room for [CLS] and [SEP]"
            )));
        }
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                msg: e.to_string(),
            })?;
        let content = encoding.get_ids();
        let keep = content.len().min(max_len - 2);
        let mut ids = Vec::with_capacity(keep + 2);
        ids.push(self.cls_id);
        ids.extend_from_slice(&content[content.len() - keep..]);
        ids.push(self.sep_id);
        Ok(ids)
    }

    pub fn cls_id(&self) -> u32 {
        self.cls_id
    }

    pub fn sep_id(&self) -> u32 {
        self.sep_id
    }

    /// Ids including `[DEC]` (the Q-Former embedding has this many rows).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer (no post-processor: `[CLS]`/`[SEP]` are added by
    /// [`Self::encode_with_max_len`]).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
