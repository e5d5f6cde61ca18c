//! What can go wrong talking to the server, classified by what the caller should do about it.

use std::time::Duration;

/// A failed completion request. [`RemoteError::is_retryable`] says whether trying again later
/// can help (the server is away, busy or broke for a moment) or whether the request itself is
/// wrong and a person must act (wrong model name, prompt embeds not enabled, too long).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemoteError {
    /// No connection: refused, reset, name not resolved, or the server went away mid-reply.
    #[error("the language-model server {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    /// Connecting or the whole request took longer than allowed.
    #[error("the language-model server {url} did not {phase} within {after:.1?}")]
    Timeout {
        url: String,
        phase: &'static str,
        after: Duration,
    },
    /// A 4xx answer: the server refused this request; retrying the same one cannot help.
    #[error("the language-model server {url} refused the request (HTTP {status}): {message}")]
    Rejected {
        url: String,
        status: u16,
        message: String,
    },
    /// A 5xx answer (or 408/429): the server failed or is overloaded for now.
    #[error("the language-model server {url} failed (HTTP {status}): {message}")]
    ServerError {
        url: String,
        status: u16,
        message: String,
    },
    /// A 2xx answer that is not a completion: not an OpenAI-compatible server?
    #[error("the language-model server {url} sent an unexpected reply: {detail}")]
    BadReply { url: String, detail: String },
    /// The client cannot be set up or the request cannot be sent as configured (bad URL, TLS).
    #[error("cannot send to the language-model server {url}: {detail}")]
    Config { url: String, detail: String },
}

impl RemoteError {
    /// True when the same request may succeed later: back off and retry.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::ServerError { .. }
        )
    }
}

/// The server's own words from an error body: vLLM answers
/// `{"error": {"message": ..., "type": ..., "code": ...}}` (older releases and other servers
/// `{"message": ...}` or `{"detail": ...}`); anything else is quoted, shortened.
pub fn server_message(body: &str) -> String {
    const MAX: usize = 600;
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("error"))
            .map(|m| match m.as_str() {
                Some(s) => s.to_owned(),
                None => m.to_string(),
            })
    });
    let text = message.unwrap_or_else(|| body.trim().to_owned());
    let text = if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text
    };
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_vllm_and_other_error_shapes() {
        let vllm = r#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":"model","code":404}}"#;
        assert_eq!(server_message(vllm), "The model `x` does not exist.");
        assert_eq!(server_message(r#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(server_message("  bad gateway \n"), "bad gateway");
        assert_eq!(server_message(""), "(empty body)");
        assert!(server_message(&"x".repeat(5000)).chars().count() <= 601);
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        let url = || "http://h".to_owned();
        assert!(RemoteError::Unreachable {
            url: url(),
            detail: String::new()
        }
        .is_retryable());
        assert!(RemoteError::ServerError {
            url: url(),
            status: 503,
            message: String::new()
        }
        .is_retryable());
        assert!(!RemoteError::Rejected {
            url: url(),
            status: 400,
            message: String::new()
        }
        .is_retryable());
        assert!(!RemoteError::BadReply {
            url: url(),
            detail: String::new()
        }
        .is_retryable());
    }
}
