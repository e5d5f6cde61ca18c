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
    /// The error in one line for the person running the pipeline: what failed and where,
    /// without the backtrace that candle attaches to its errors when `RUST_BACKTRACE` is set
    /// (see [`ModelError::backtrace`] for that, to log it) and without line breaks.
    pub fn summary(&self) -> String {
        match self {
            ModelError::Tensor(e) => candle_summary(e),
            other => one_line(&other.to_string()),
        }
    }

    /// The backtrace candle captured with the error, if any (debug logs only).
    pub fn backtrace(&self) -> Option<&std::backtrace::Backtrace> {
        let ModelError::Tensor(e) = self else {
            return None;
        };
        let mut e: &candle_core::Error = e;
        loop {
            match e {
                candle_core::Error::WithBacktrace { backtrace, .. } => return Some(backtrace),
                candle_core::Error::Context { inner, .. }
                | candle_core::Error::WithPath { inner, .. } => e = inner,
                _ => return None,
            }
        }
    }

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

/// The text of a caught panic's payload (`panic!` with a literal gives a `&str`, with
/// arguments a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown panic")
}

/// A candle error without its backtraces, contexts joined on one line: how candle errors
/// become text in our messages.
pub fn candle_summary(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_summary(inner),
        candle_core::Error::Context { inner, context } => {
            format!(
                "{}: {}",
                one_line(&context.to_string()),
                candle_summary(inner)
            )
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_summary(inner))
        }
        other => one_line(&other.to_string()),
    }
}

/// Line breaks (and the indentation after them) become "; ".
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A candle error as `bail!` makes it when `RUST_BACKTRACE` is set, built by hand so that
    /// the test does not depend on the environment.
    fn with_backtrace(msg: &str) -> candle_core::Error {
        candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg(msg.into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
    }

    #[test]
    fn summary_leaves_candle_backtraces_out() {
        let e = ModelError::from(with_backtrace("shape mismatch in matmul"));
        assert!(
            e.to_string().lines().count() > 2,
            "the full text carries the backtrace: {e}"
        );
        assert_eq!(e.summary(), "shape mismatch in matmul");
        assert!(e.backtrace().is_some());
        let wrapped = ModelError::from(with_backtrace("inner").context("loading layer 3"));
        assert_eq!(wrapped.summary(), "loading layer 3: inner");
        assert!(wrapped.backtrace().is_some());
    }

    #[test]
    fn summary_of_other_errors_is_their_text_on_one_line() {
        let e = ModelError::bad_file(Path::new("/m/config.json"), "bad\n  field");
        assert_eq!(e.summary(), "/m/config.json: bad; field");
        assert!(e.backtrace().is_none());
    }
}
