//! Builds a `tokenizers` BPE tokenizer that encodes exactly like a SentencePiece BPE model.
//!
//! SentencePiece BPE encodes by repeatedly merging the adjacent pair of symbols whose
//! concatenation is the highest-scoring piece. A `tokenizers` BPE merges the pair with the lowest
//! merge rank. So the merge list is every way of splitting a piece into two pieces, ranked by the
//! merged piece's score, highest first: the two procedures then pick the same pair at every step
//! (this is also how transformers converts LLaMA's tokenizer to `tokenizer.json`). The rest is the
//! same normalizer (dummy prefix, spaces as "▁"), byte fallback for characters outside the
//! vocabulary, and control pieces as special tokens.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{NormalizerWrapper, Precompiled, Prepend, Replace, Sequence};
use tokenizers::{AddedToken, Tokenizer};

use super::sentencepiece_model::{ModelType, PieceType, SentencePieceModel};

/// SentencePiece's whitespace marker, U+2581.
pub const SPACE_MARK: &str = "\u{2581}";

/// The equivalent `tokenizers` tokenizer, without post-processor: callers add BOS/EOS themselves.
pub fn build_tokenizer(model: &SentencePieceModel) -> Result<Tokenizer, String> {
    check_supported(model)?;
    let vocab = vocab(model)?;
    let unk = &model.pieces[model.trainer.unk_id as usize].piece;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges(model))
        .unk_token(unk.clone())
        .fuse_unk(true)
        .byte_fallback(model.trainer.byte_fallback)
        .build()
        .map_err(|e| format!("cannot build the BPE model: {e}"))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer(model)?))
        .map_err(|e| format!("cannot set the normalizer: {e}"))?;
    tokenizer.with_decoder(Some(decoder(model)?));
    let specials: Vec<AddedToken> = model
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, PieceType::Control | PieceType::Unknown))
        .map(|p| AddedToken::from(p.piece.clone(), true).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| format!("cannot add the special tokens: {e}"))?;
    Ok(tokenizer)
}

fn check_supported(model: &SentencePieceModel) -> Result<(), String> {
    let trainer = &model.trainer;
    if trainer.model_type != ModelType::Bpe {
        return Err(format!(
            "is a SentencePiece {:?} model; only BPE models (as LLaMA/Vicuna ship) are supported. \
             Use the model's own tokenizer.model, or put a tokenizer.json beside it",
            trainer.model_type
        ));
    }
    if trainer.treat_whitespace_as_suffix {
        return Err("treat_whitespace_as_suffix SentencePiece models are not supported".into());
    }
    Ok(())
}

fn vocab(model: &SentencePieceModel) -> Result<Vocab, String> {
    let mut vocab = Vocab::default();
    for (id, p) in model.pieces.iter().enumerate() {
        if vocab.insert(p.piece.clone(), id as u32).is_some() {
            return Err(format!(
                "piece {:?} occurs twice in the vocabulary",
                p.piece
            ));
        }
    }
    Ok(vocab)
}

/// Every split of a mergeable piece into two mergeable pieces, ranked by the piece's score
/// (highest first); ties by piece id, then by the ids of the two halves, as transformers does.
fn merges(model: &SentencePieceModel) -> Merges {
    let mergeable: HashMap<&str, u32> = model
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind.is_mergeable())
        .map(|(id, p)| (p.piece.as_str(), id as u32))
        .collect();
    let mut ranked: Vec<(f32, u32, u32, u32, &str, &str)> = Vec::new();
    for (id, p) in model.pieces.iter().enumerate() {
        if !p.kind.is_mergeable() {
            continue;
        }
        for (at, _) in p.piece.char_indices().skip(1) {
            let (left, right) = p.piece.split_at(at);
            if let (Some(&l), Some(&r)) = (mergeable.get(left), mergeable.get(right)) {
                ranked.push((p.score, id as u32, l, r, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, _, _, l, r)| (l.to_owned(), r.to_owned()))
        .collect()
}

/// SentencePiece's normalizer: optional Unicode rules, optional whitespace clean-up, the dummy
/// "▁" prefix (not on empty text), then spaces as "▁".
fn normalizer(model: &SentencePieceModel) -> Result<NormalizerWrapper, String> {
    let spec = &model.normalizer;
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if !spec.precompiled_charsmap.is_empty() {
        let charsmap = Precompiled::from(&spec.precompiled_charsmap).map_err(|e| {
            format!(
                "bad precompiled_charsmap in normalizer {:?}: {e}",
                spec.name
            )
        })?;
        steps.push(charsmap.into());
    }
    if spec.remove_extra_whitespaces {
        for (pattern, with) in [("^ +", ""), (" +$", ""), (" {2,}", " ")] {
            steps.push(replace(ReplacePattern::Regex(pattern.into()), with)?.into());
        }
    }
    if spec.add_dummy_prefix {
        steps.push(Prepend::new(SPACE_MARK.to_owned()).into());
    }
    if spec.escape_whitespaces {
        steps.push(replace(" ".into(), SPACE_MARK)?.into());
    }
    Ok(Sequence::new(steps).into())
}

fn replace(pattern: ReplacePattern, with: &str) -> Result<Replace, String> {
    Replace::new(pattern, with).map_err(|e| format!("cannot build a Replace normalizer: {e}"))
}

/// The decoder transformers writes for LLaMA. [`super::LlamaTokenizer::decode`] does not use it
/// (it follows SentencePiece's own rules for invalid bytes), but the tokenizer stays complete.
fn decoder(model: &SentencePieceModel) -> Result<DecoderWrapper, String> {
    let mut steps: Vec<DecoderWrapper> = vec![
        replace(SPACE_MARK.into(), " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if model.normalizer.add_dummy_prefix {
        steps.push(StripDecoder::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}
