//! The conversation template and LLaVA's `<image>`-aware prompt tokenization.
//!
//! The reference tokenizes the text on each side of `<image>` separately, so SentencePiece puts
//! a dummy "▁" at the start of every chunk. Tokenizing the whole prompt at once gives different
//! ids around the image, and the model was trained on these.

use super::error::{ModelError, Result};
use super::tokenizer::LlamaTokenizer;

/// The id LLaVA puts where the visual tokens go (never looked up in the embedding).
pub const IMAGE_TOKEN_INDEX: i64 = -200;
/// The placeholder text in a prompt.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// `vicuna_v1`'s system text (the "user" wording of the evaluation scripts and training, not the
/// CLI's `llava_v1` "human" one).
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious user and an artificial intelligence \
     assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// `vicuna_v1`'s `sep2`: the reference also stops generating on this text and cuts it off.
pub const STOP_STR: &str = "</s>";

/// The single-turn prompt: system text, `USER: <image>\n{question}`, then ` ASSISTANT:` with
/// nothing after it. The question is used as given (as a string; see
/// [`PromptIds::for_question`] for the ids, which treat the question as text).
pub fn vicuna_v1_prompt(question: &str) -> String {
    let (before, after) = vicuna_v1_chunks(question);
    format!("{before}{IMAGE_PLACEHOLDER}{after}")
}

/// The text before and after the image of [`vicuna_v1_prompt`]; the question is in the second.
fn vicuna_v1_chunks(question: &str) -> (String, String) {
    (
        format!("{VICUNA_V1_SYSTEM} USER: "),
        format!("\n{question} ASSISTANT:"),
    )
}

/// LLaVA's `tokenizer_image_token`: each chunk between `<image>` placeholders is tokenized on its
/// own as `tokenizer(chunk).input_ids`; if the first chunk starts with BOS, that BOS is kept
/// and the first id of every chunk (its BOS) is dropped; chunks are joined with
/// [`IMAGE_TOKEN_INDEX`]. A prompt without `<image>` is just `tokenizer(prompt)`.
pub fn tokenize_with_image(tok: &LlamaTokenizer, prompt: &str) -> Result<Vec<i64>> {
    let chunks = prompt
        .split(IMAGE_PLACEHOLDER)
        .map(|chunk| tok.encode(chunk))
        .collect::<Result<Vec<_>>>()?;
    Ok(join_chunks(tok, &chunks))
}

/// LLaVA's joining of chunks tokenized one by one (see [`tokenize_with_image`]).
fn join_chunks(tok: &LlamaTokenizer, chunks: &[Vec<u32>]) -> Vec<i64> {
    let starts_with_bos = chunks
        .first()
        .and_then(|c| c.first())
        .is_some_and(|&id| id == tok.bos_id());
    let offset = usize::from(starts_with_bos);
    let mut ids = Vec::with_capacity(chunks.iter().map(Vec::len).sum::<usize>() + chunks.len());
    if starts_with_bos {
        ids.push(i64::from(tok.bos_id()));
    }
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            ids.push(IMAGE_TOKEN_INDEX);
        }
        ids.extend(chunk.iter().skip(offset).map(|&id| i64::from(id)));
    }
    ids
}

/// The prompt ids on either side of the single image placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    pub before: Vec<u32>,
    pub after: Vec<u32>,
}

impl PromptIds {
    /// The ids of `vicuna_v1_prompt(question)`, split at its image, with the question taken
    /// as text: an `<image>` in it is not a second placeholder, and special tokens written in it
    /// (`</s>`) are not special. For any other question the ids are the reference's
    /// (`tokenize_with_image` of the whole prompt).
    pub fn for_question(tok: &LlamaTokenizer, question: &str) -> Result<Self> {
        let (before, after) = vicuna_v1_chunks(question);
        let chunks = [tok.encode(&before)?, tok.encode_literal(&after)?];
        split_at_image(&join_chunks(tok, &chunks))
    }

    /// Length of the LLM input once `visual_tokens` rows replace the placeholder.
    pub fn sequence_len(&self, visual_tokens: usize) -> usize {
        self.before.len() + visual_tokens + self.after.len()
    }
}

/// Splits ids at the one [`IMAGE_TOKEN_INDEX`]; errors when there is none or more than one (the
/// video tokens have one place to go), or when another id is not a vocabulary id.
pub fn split_at_image(ids: &[i64]) -> Result<PromptIds> {
    let mut parts = ids.split(|&id| id == IMAGE_TOKEN_INDEX);
    let (Some(before), Some(after), None) = (parts.next(), parts.next(), parts.next()) else {
        let images = ids.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count();
        return Err(ModelError::InvalidInput(format!(
            "the prompt has {images} {IMAGE_PLACEHOLDER} placeholders; exactly one is needed"
        )));
    };
    let to_u32 = |part: &[i64]| {
        part.iter()
            .map(|&id| {
                u32::try_from(id).map_err(|_| {
                    ModelError::InvalidInput(format!("prompt id {id} is not a vocabulary id"))
                })
            })
            .collect::<Result<Vec<u32>>>()
    };
    Ok(PromptIds {
        before: to_u32(before)?,
        after: to_u32(after)?,
    })
}

/// The reference's answer clean-up: strip (Python `str.strip`), cut a trailing [`STOP_STR`],
/// strip again. Apply it to [`LlamaTokenizer::decode`]'s output.
pub fn clean_answer(decoded: &str) -> &str {
    let text = python_strip(decoded);
    python_strip(text.strip_suffix(STOP_STR).unwrap_or(text))
}

/// Python's `str.strip()`: Unicode white space plus the separators U+001C..U+001F, which Rust's
/// `trim` keeps.
fn python_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}
