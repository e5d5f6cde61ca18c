//! The blocking HTTP client of an OpenAI-compatible completions server (ureq, rustls). It is
//! called from the model's thread, never from a streaming thread: every call may block up to
//! the request timeout.

use std::io::ErrorKind;
use std::time::Duration;

use candle_core::Tensor;
use serde::Deserialize;

use super::error::{server_message, RemoteError};
use super::payload::{completion_body, encode_prompt_embeds, Sampling};

/// The environment variable an API key is read from ([`ServerConfig::api_key_from_env`]). The
/// key is sent as `Authorization: Bearer KEY` (vLLM's `--api-key`); it only authenticates and
/// changes nothing that is computed.
pub const API_KEY_ENV: &str = "LLAMAVID_LLM_SERVER_API_KEY";

/// Where the server is and how long to wait for it.
#[derive(Clone, PartialEq)]
pub struct ServerConfig {
    /// Base URL, e.g. `http://10.0.0.5:8000` (a trailing `/` or `/v1` is accepted).
    pub url: String,
    /// The served model name (`--served-model-name`, else the path the server was given).
    pub model: String,
    pub api_key: Option<String>,
    /// Establishing the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// The whole request, from connecting to the last byte of the reply.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl ServerConfig {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            api_key: None,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The key of [`API_KEY_ENV`], when set and not empty.
    pub fn api_key_from_env() -> Option<String> {
        std::env::var(API_KEY_ENV)
            .ok()
            .filter(|k| !k.trim().is_empty())
    }

    /// The URL without a trailing `/` or `/v1`.
    pub fn base_url(&self) -> &str {
        let url = self.url.trim().trim_end_matches('/');
        url.strip_suffix("/v1").unwrap_or(url)
    }
}

/// One finished completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The generated ids, without the EOS or stop id that ended them (as the local path
    /// reports them); `None` when the server does not return ids.
    pub token_ids: Option<Vec<u32>>,
    /// The server's own decoding of the ids.
    pub text: String,
    /// `stop` (EOS or a stop id), `length` (max_tokens or the context), or another reason.
    pub finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CompletionReply {
    choices: Vec<ReplyChoice>,
}

#[derive(Deserialize)]
struct ReplyChoice {
    #[serde(default)]
    text: String,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    finish_reason: Option<String>,
    /// vLLM: null when EOS stopped it, the id of a stop token, or a matched stop string.
    #[serde(default)]
    stop_reason: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    #[serde(default)]
    max_model_len: Option<usize>,
}

/// A model the server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    pub id: String,
    /// Its context length, when the server says (vLLM does).
    pub max_model_len: Option<usize>,
}

/// Largest reply read (a caption is a few hundred bytes; an error page a few kB).
const MAX_REPLY_BYTES: u64 = 8 << 20;

pub struct CompletionsClient {
    config: ServerConfig,
    agent: ureq::Agent,
}

impl CompletionsClient {
    pub fn new(config: ServerConfig) -> Result<Self, RemoteError> {
        let base = config.base_url().to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(RemoteError::Config {
                url: config.url.clone(),
                detail: "the URL must start with http:// or https://".into(),
            });
        }
        if config.model.trim().is_empty() {
            return Err(RemoteError::Config {
                url: config.url.clone(),
                detail: "no served model name given".into(),
            });
        }
        let agent = ureq::Agent::config_builder()
            // 4xx and 5xx are answers to classify, not transport failures.
            .http_status_as_error(false)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_global(Some(config.request_timeout))
            .user_agent(concat!("gst-llamavid/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self { config, agent })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.config.base_url())
    }

    /// Maps a transport failure to what the caller can do about it.
    fn transport_error(&self, url: &str, error: ureq::Error) -> RemoteError {
        let url = url.to_owned();
        match error {
            ureq::Error::Timeout(timeout) => {
                let (phase, after) = match timeout {
                    ureq::Timeout::Connect | ureq::Timeout::Resolve => {
                        ("accept a connection", self.config.connect_timeout)
                    }
                    _ => ("answer", self.config.request_timeout),
                };
                RemoteError::Timeout { url, phase, after }
            }
            ureq::Error::Io(e) if e.kind() == ErrorKind::TimedOut => RemoteError::Timeout {
                url,
                phase: "answer",
                after: self.config.request_timeout,
            },
            ureq::Error::BadUri(detail) => RemoteError::Config { url, detail },
            e @ (ureq::Error::Http(_)
            | ureq::Error::InvalidProxyUrl
            | ureq::Error::Rustls(_)
            | ureq::Error::Tls(_)
            | ureq::Error::RequireHttpsOnly(_)) => RemoteError::Config {
                url,
                detail: e.to_string(),
            },
            other => RemoteError::Unreachable {
                url,
                detail: other.to_string(),
            },
        }
    }

    /// Reads a reply: its status and body, the status classified.
    fn read_reply(
        &self,
        url: &str,
        reply: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<String, RemoteError> {
        let mut reply = reply.map_err(|e| self.transport_error(url, e))?;
        let status = reply.status().as_u16();
        let body = reply
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_string()
            .map_err(|e| self.transport_error(url, e))?;
        match status {
            200..=299 => Ok(body),
            // Request timeout and rate limiting: the same request can succeed later.
            408 | 429 | 500..=599 => Err(RemoteError::ServerError {
                url: url.to_owned(),
                status,
                message: server_message(&body),
            }),
            _ => Err(RemoteError::Rejected {
                url: url.to_owned(),
                status,
                message: server_message(&body),
            }),
        }
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.config.api_key {
            Some(key) => request.header("Authorization", format!("Bearer {key}")),
            None => request,
        }
    }

    /// `POST /v1/completions` with an already built JSON body.
    pub fn complete_body(&self, body: &serde_json::Value) -> Result<Completion, RemoteError> {
        let url = self.endpoint("/v1/completions");
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        let request = self
            .authorized(self.agent.post(&url))
            .header("Content-Type", "application/json");
        let body = self.read_reply(&url, request.send(&bytes[..]))?;
        let bad = |detail: String| RemoteError::BadReply {
            url: url.clone(),
            detail,
        };
        let reply: CompletionReply = serde_json::from_str(&body)
            .map_err(|e| bad(format!("not a completion ({e}): {}", server_message(&body))))?;
        let Some(choice) = reply.choices.into_iter().next() else {
            return Err(bad("the completion has no choices".into()));
        };
        let mut token_ids = choice.token_ids;
        // A generation stopped by a token (EOS or a stop id, not a stop string) ends with
        // that token in vLLM's ids; the local path does not count it.
        let stopped_by_token = choice.finish_reason.as_deref() == Some("stop")
            && !choice.stop_reason.as_ref().is_some_and(|r| r.is_string());
        if stopped_by_token {
            if let Some(ids) = token_ids.as_mut() {
                ids.pop();
            }
        }
        Ok(Completion {
            token_ids,
            text: choice.text,
            finish_reason: choice.finish_reason,
        })
    }

    /// Completes `embeddings` (n, H) with `sampling`.
    pub fn complete(
        &self,
        embeddings: &Tensor,
        sampling: &Sampling,
    ) -> Result<Completion, RemoteError> {
        let embeds = encode_prompt_embeds(embeddings).map_err(|e| RemoteError::Config {
            url: self.config.url.clone(),
            detail: format!("cannot encode the prompt embeddings: {e}"),
        })?;
        self.complete_body(&completion_body(&self.config.model, embeds, sampling))
    }

    /// `GET /v1/models`: what the server offers (a readiness and configuration check).
    pub fn models(&self) -> Result<Vec<ServedModel>, RemoteError> {
        let url = self.endpoint("/v1/models");
        let body = self.read_reply(&url, self.authorized(self.agent.get(&url)).call())?;
        let list: ModelList = serde_json::from_str(&body).map_err(|e| RemoteError::BadReply {
            url: url.clone(),
            detail: format!("not a model list ({e})"),
        })?;
        Ok(list
            .data
            .into_iter()
            .map(|m| ServedModel {
                id: m.id,
                max_model_len: m.max_model_len,
            })
            .collect())
    }

    /// The configured model as the server lists it, or a [`RemoteError::Rejected`] naming
    /// the models it does serve.
    pub fn check_model(&self) -> Result<ServedModel, RemoteError> {
        let models = self.models()?;
        let wanted = &self.config.model;
        models
            .iter()
            .find(|m| &m.id == wanted)
            .cloned()
            .ok_or_else(|| RemoteError::Rejected {
                url: self.endpoint("/v1/models"),
                status: 404,
                message: format!(
                    "the server does not serve a model named `{wanted}`; it serves: {}",
                    models
                        .iter()
                        .map(|m| format!("`{}`", m.id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }
}
