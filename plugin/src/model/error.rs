//! One error type for everything the model can refuse: files a user must fix, and tensor errors.

use std::path::{Path, PathBuf};

/// What went wrong while loading or running the model.
///
/// Messages are written for the person who pointed the element at a model directory: they name
/// the file (and the tensor or field) and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{what} not found: {path} ({hint})")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("cancelled")]
    Cancelled,
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The language-model server failed; see [`RemoteError::is_retryable`].
    #[error(transparent)]
    Remote(#[from] super::remote::RemoteError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub fn bad_file(path: &Path, msg: impl Into<String>) -> Self {
        ModelError::BadFile {
            path: path.to_owned(),
            msg: msg.into(),
        }
    }
}
