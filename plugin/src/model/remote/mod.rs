//! The language-model step on a server: the caption's input embeddings (prompt ‖ window
//! tokens ‖ question, exactly what the local path feeds its LLaMA) go to an OpenAI-compatible
//! server started with `--enable-prompt-embeds` (vLLM), which generates the caption. The
//! vision side, the prompt and the token embedding table stay local.
//!
//! ```text
//! LlamaVid::input_embeddings ─► payload (base64 torch.save) ─► RemoteLanguageModel
//!     ─► request thread ─► CompletionsClient (ureq) ─► POST /v1/completions ─► token ids
//!     ─► the checkpoint's tokenizer ─► Caption (as LlamaVid::caption makes it)
//! ```
//!
//! Supported: vLLM 0.32 (the payload format of `vllm/renderers/embed_utils.py` in that
//! release). Greedy captions have exactly the local path's ids (the check in
//! `gst-tests/check-vllm.sh`); sampled ones follow the server's own sampler, reproducible there
//! with a seed but not equal to the local sampler's draws.

pub mod client;
pub mod error;
pub mod payload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;

pub use client::{Completion, CompletionsClient, ServedModel, ServerConfig, API_KEY_ENV};
pub use error::RemoteError;
pub use payload::Sampling;

use super::{Caption, CaptionPrompt, GenerationParams, LlamaVid, ModelError, Result};

type Work =
    Box<dyn FnOnce(&CompletionsClient) -> std::result::Result<Completion, RemoteError> + Send>;

/// Requests of one stream, run one at a time on a thread of their own so that the caller can
/// give up waiting (a flush, a state change) without a connection being torn down mid-reply.
struct RequestLine {
    work: Sender<(u64, Work)>,
    replies: Receiver<(u64, std::result::Result<Completion, RemoteError>)>,
    next_id: u64,
    /// A request whose caller stopped waiting: its reply is still to come.
    abandoned: Option<u64>,
}

/// A language model served elsewhere, for one stream: at most one request is in flight at a
/// time (a new caption waits for an abandoned one to end, cancellably).
pub struct RemoteLanguageModel {
    client: Arc<CompletionsClient>,
    /// What the server said about the model, asked once it is first reached.
    served: Arc<Mutex<Option<ServedModel>>>,
    line: Mutex<RequestLine>,
}

/// How often a waiting caller looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(10);

impl RemoteLanguageModel {
    /// Sets up the client (nothing is sent yet: the server may come up later).
    pub fn new(config: ServerConfig) -> std::result::Result<Self, RemoteError> {
        let client = Arc::new(CompletionsClient::new(config)?);
        let (work_tx, work_rx) = mpsc::channel::<(u64, Work)>();
        let (reply_tx, reply_rx) = mpsc::channel();
        let thread_client = client.clone();
        std::thread::Builder::new()
            .name("llamavid-llm-http".into())
            .spawn(move || {
                // Ends when the model (the sender) is dropped, after the request in progress.
                while let Ok((id, work)) = work_rx.recv() {
                    if reply_tx.send((id, work(&thread_client))).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| RemoteError::Config {
                url: client.config().url.clone(),
                detail: format!("cannot start the request thread: {e}"),
            })?;
        Ok(Self {
            client,
            served: Arc::new(Mutex::new(None)),
            line: Mutex::new(RequestLine {
                work: work_tx,
                replies: reply_rx,
                next_id: 0,
                abandoned: None,
            }),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        self.client.config()
    }

    /// The model as the server listed it, once reached.
    pub fn served_model(&self) -> Option<ServedModel> {
        lock(&self.served).clone()
    }

    /// Runs `work` on the request thread and waits for its reply, giving up (with
    /// [`ModelError::Cancelled`]) when `cancel` is raised; the request then runs to its end
    /// unobserved, and the next call waits for it first.
    fn run(&self, work: Work, cancel: Option<&AtomicBool>) -> Result<Completion> {
        let mut line = lock(&self.line);
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        let wait = |line: &mut RequestLine, id: u64| -> Result<Option<_>> {
            loop {
                if cancelled() {
                    return Ok(None);
                }
                match line.replies.recv_timeout(CANCEL_POLL) {
                    Ok((got, reply)) if got == id => return Ok(Some(reply)),
                    Ok(_) => continue,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(ModelError::InvalidInput(
                            "the language-model request thread has stopped".into(),
                        ))
                    }
                }
            }
        };
        if let Some(id) = line.abandoned {
            if wait(&mut line, id)?.is_none() {
                return Err(ModelError::Cancelled);
            }
            line.abandoned = None;
        }
        let id = line.next_id;
        line.next_id += 1;
        if line.work.send((id, work)).is_err() {
            return Err(ModelError::InvalidInput(
                "the language-model request thread has stopped".into(),
            ));
        }
        match wait(&mut line, id)? {
            Some(reply) => Ok(reply?),
            None => {
                line.abandoned = Some(id);
                Err(ModelError::Cancelled)
            }
        }
    }

    /// Completes `embeddings` (1, n, H) or (n, H) with `sampling`, asking the server for
    /// at most what fits its context (and `max_positions`, the local model's).
    pub fn complete(
        &self,
        embeddings: &Tensor,
        sampling: &Sampling,
        max_positions: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<Completion> {
        let embeddings = embeddings.clone();
        let prompt_len = match embeddings.rank() {
            3 => embeddings.dim(1)?,
            _ => embeddings.dim(0)?,
        };
        let mut sampling = sampling.clone();
        let served = self.served.clone();
        let work: Work = Box::new(move |client: &CompletionsClient| {
            let known = lock(&served).clone();
            let model = match known {
                Some(model) => model,
                None => {
                    let model = client.check_model()?;
                    *lock(&served) = Some(model.clone());
                    model
                }
            };
            let context = model
                .max_model_len
                .unwrap_or(max_positions)
                .min(max_positions);
            // The server counts prompt + max_tokens against its context and refuses more;
            // a prompt that does not fit is sent as it is, for the server to refuse.
            if prompt_len < context {
                sampling.max_tokens = sampling.max_tokens.min(context - prompt_len);
            }
            client.complete(&embeddings, &sampling)
        });
        self.run(work, cancel)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LlamaVid {
    /// [`LlamaVid::caption`] with the language model on `remote`: the same input embeddings,
    /// generated by the server, decoded with this checkpoint's tokenizer.
    pub fn caption_remote(
        &self,
        video_tokens: &Tensor,
        prompt: &CaptionPrompt,
        params: &GenerationParams,
        remote: &RemoteLanguageModel,
        cancel: Option<&AtomicBool>,
    ) -> Result<Caption> {
        let embeddings = self.input_embeddings(prompt, video_tokens)?;
        if params.max_new_tokens == 0 {
            return self.caption_from_ids(Vec::new());
        }
        let sampling = Sampling::from_params(params, self.llm_tokenizer().eos_id());
        let completion =
            remote.complete(&embeddings, &sampling, self.llm().max_positions(), cancel)?;
        match completion.token_ids {
            Some(ids) => self.caption_from_ids(ids),
            // A server that does not return ids: its own text, cleaned like ours.
            None => Ok(Caption {
                text: super::prompt::clean_answer(&completion.text).to_owned(),
                token_ids: Vec::new(),
            }),
        }
    }
}
