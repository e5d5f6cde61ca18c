//! Text to ids and back: the LLaMA SentencePiece tokenizer for the prompt and the answer, and the
//! BERT-uncased WordPiece tokenizer for the Q-Former's question.
//!
//! Both are built on the `tokenizers` crate. The LLaMA one also loads from a bare
//! `tokenizer.model` (what real releases ship) by reading its protobuf and building an equivalent
//! BPE; the BERT one is built from `vocab.txt`, bert-base-uncased's release format.

mod bert;
mod hf_config;
mod llama;
mod piece_decoder;
pub mod protobuf;
pub mod sentencepiece_model;
mod spm_to_bpe;

pub use bert::{BertTokenizer, DEC_TOKEN, QFORMER_MAX_TOKENS};
pub use hf_config::{SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG};
pub use llama::LlamaTokenizer;
pub use sentencepiece_model::{
    ModelType, NormalizerSpec, Piece, PieceType, SentencePieceModel, TrainerSpec,
};
pub use spm_to_bpe::SPACE_MARK;
