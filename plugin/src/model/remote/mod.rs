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
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;

pub use client::{Completion, CompletionsClient, ServedModel, ServerConfig, API_KEY_ENV};
pub use error::RemoteError;
pub use payload::Sampling;

use super::{Caption, CaptionPrompt, GenerationParams, LlamaVid, ModelError, Result};
use crate::sync::lock;

type Work =
    Box<dyn FnOnce(&CompletionsClient) -> std::result::Result<Completion, RemoteError> + Send>;
type Reply = (u64, std::result::Result<Completion, RemoteError>);

/// Requests of one stream, run one at a time on a thread of their own so that the caller can
/// go on (encode frames) or give up waiting (a flush, a state change) without a connection
/// being torn down mid-reply.
struct RequestLine {
    work: Sender<(u64, Work)>,
    replies: Receiver<Reply>,
    next_id: u64,
    /// The request started and not yet answered, and whether its caller still wants it.
    in_flight: Option<(u64, bool)>,
}

/// A language model served elsewhere, for one stream: at most one request is in flight at a
/// time. [`start`](Self::start) and [`reply`](Self::reply) let the caller work meanwhile;
/// [`complete`](Self::complete) waits, cancellably.
pub struct RemoteLanguageModel {
    client: Arc<CompletionsClient>,
    /// What the server said about the model, asked once it is first reached.
    served: Arc<Mutex<Option<ServedModel>>>,
    line: Mutex<RequestLine>,
}

/// What a server needs to caption a window.
#[derive(Debug, Clone)]
pub struct RemoteCaptionInput {
    /// The language model's input (1, n, H): prompt ‖ window tokens ‖ question.
    pub embeddings: Tensor,
    pub sampling: Sampling,
    /// The local model's context, which also bounds what is asked of the server.
    pub max_positions: usize,
}

/// The `finish_reason` of the reply to [`RemoteLanguageModel::start_probe`].
pub const PROBE: &str = "probe";

/// How often a waiting caller looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(10);

fn thread_stopped() -> ModelError {
    ModelError::InvalidInput("the language-model request thread has stopped".into())
}

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
                in_flight: None,
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

    /// Whether a request is in flight (also one whose caller stopped waiting for it).
    pub fn busy(&self) -> bool {
        let mut line = lock(&self.line);
        if line.in_flight.is_some_and(|(_, wanted)| !wanted) {
            Self::collect(&mut line, Duration::ZERO);
        }
        line.in_flight.is_some()
    }

    /// Takes the reply of the request in flight if it arrives within `wait`; the reply of an
    /// abandoned request is dropped on the way.
    fn collect(line: &mut RequestLine, wait: Duration) -> Option<Reply> {
        let (id, wanted) = line.in_flight?;
        let reply = if wait.is_zero() {
            line.replies.try_recv().ok()
        } else {
            line.replies.recv_timeout(wait).ok()
        };
        match reply {
            Some((got, result)) if got == id => {
                line.in_flight = None;
                wanted.then_some((got, result))
            }
            _ => None,
        }
    }

    /// Starts completing `input` in the background. Refused while a request is in flight.
    pub fn start(&self, input: RemoteCaptionInput) -> Result<()> {
        self.start_work(self.work(input))
    }

    /// Starts asking the server which models it serves, in the background (a check at start:
    /// is it there, does it serve our model). Its [`reply`](Self::reply) is an empty
    /// completion whose `finish_reason` is [`PROBE`].
    pub fn start_probe(&self) -> Result<()> {
        let served = self.served.clone();
        self.start_work(Box::new(move |client: &CompletionsClient| {
            let model = client.check_model()?;
            *lock(&served) = Some(model);
            Ok(Completion {
                token_ids: Some(Vec::new()),
                text: String::new(),
                finish_reason: Some(PROBE.into()),
            })
        }))
    }

    fn start_work(&self, work: Work) -> Result<()> {
        let mut line = lock(&self.line);
        if line.in_flight.is_some_and(|(_, wanted)| !wanted) {
            Self::collect(&mut line, Duration::ZERO);
        }
        if line.in_flight.is_some() {
            return Err(ModelError::InvalidInput(
                "a language-model request is already in flight for this stream".into(),
            ));
        }
        let id = line.next_id;
        line.next_id += 1;
        line.work.send((id, work)).map_err(|_| thread_stopped())?;
        line.in_flight = Some((id, true));
        Ok(())
    }

    /// The reply of the started request, if it comes within `wait` (`None`: not yet, or
    /// nothing was started).
    pub fn reply(&self, wait: Duration) -> Option<Result<Completion>> {
        let mut line = lock(&self.line);
        Self::collect(&mut line, wait).map(|(_, result)| result.map_err(ModelError::from))
    }

    /// Stops wanting the reply of the request in flight (a flush): it still runs to its end,
    /// and no new request starts before it has.
    pub fn abandon(&self) {
        if let Some((_, wanted)) = lock(&self.line).in_flight.as_mut() {
            *wanted = false;
        }
    }

    /// Completes `input`, waiting for the reply; gives up with [`ModelError::Cancelled`] when
    /// `cancel` is raised (the request is then abandoned). A request in flight is waited for
    /// first.
    pub fn complete(
        &self,
        input: RemoteCaptionInput,
        cancel: Option<&AtomicBool>,
    ) -> Result<Completion> {
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        let mut started = false;
        loop {
            if cancelled() {
                if started {
                    self.abandon();
                }
                return Err(ModelError::Cancelled);
            }
            if !started {
                if self.busy() {
                    std::thread::sleep(CANCEL_POLL);
                    continue;
                }
                self.start(input.clone())?;
                started = true;
            }
            if let Some(reply) = self.reply(CANCEL_POLL) {
                return reply;
            }
        }
    }

    /// The request's work on the request thread: learn the server's context once, bound
    /// `max_tokens` by it, send.
    fn work(&self, input: RemoteCaptionInput) -> Work {
        let served = self.served.clone();
        Box::new(move |client: &CompletionsClient| {
            let RemoteCaptionInput {
                embeddings,
                mut sampling,
                max_positions,
            } = input;
            let known = lock(&served).clone();
            let model = match known {
                Some(model) => model,
                None => {
                    let model = client.check_model()?;
                    *lock(&served) = Some(model.clone());
                    model
                }
            };
            let prompt_len = embeddings.dims().iter().rev().nth(1).copied().unwrap_or(0);
            let context = model
                .max_model_len
                .unwrap_or(max_positions)
                .min(max_positions);
            // The server counts prompt + max_tokens against its context and refuses more; a
            // prompt that does not fit is sent as it is, for the server to refuse.
            if prompt_len < context {
                sampling.max_tokens = sampling.max_tokens.min(context - prompt_len);
            }
            client.complete(&embeddings, &sampling)
        })
    }
}

impl LlamaVid {
    /// What a server needs to caption `video_tokens`: the input embeddings
    /// [`LlamaVid::caption`] would feed the local LLaMA, and the sampling settings.
    pub fn remote_caption_input(
        &self,
        video_tokens: &Tensor,
        prompt: &CaptionPrompt,
        params: &GenerationParams,
    ) -> Result<RemoteCaptionInput> {
        Ok(RemoteCaptionInput {
            embeddings: self.input_embeddings(prompt, video_tokens)?,
            sampling: Sampling::from_params(params, self.llm_tokenizer().eos_id()),
            max_positions: self.llm().max_positions(),
        })
    }

    /// The caption of a server's completion: its ids decoded as [`LlamaVid::caption`] does
    /// (a server that returns no ids: its text, cleaned the same way).
    pub fn caption_from_completion(&self, completion: Completion) -> Result<Caption> {
        match completion.token_ids {
            Some(ids) => self.caption_from_ids(ids),
            None => Ok(Caption {
                text: super::prompt::clean_answer(&completion.text).to_owned(),
                token_ids: Vec::new(),
            }),
        }
    }

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
        if params.max_new_tokens == 0 {
            return self.caption_from_ids(Vec::new());
        }
        let input = self.remote_caption_input(video_tokens, prompt, params)?;
        self.caption_from_completion(remote.complete(input, cancel)?)
    }
}
