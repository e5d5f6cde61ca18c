//! One stream's captions through a language-model server, as a [`CaptionBackend`] the stream
//! owns: a due caption starts a request (the window's input embeddings) and the scheduler goes
//! back to encoding frames (the window keeps sliding); the reply is collected when it comes.
//! At most one request is in flight per stream: a caption that falls due meanwhile is skipped.
//! The start-up probe is not a caption: one falling due while it runs waits for it, then goes.
//! A server that is away or failing (retryable errors) gets the next attempt after a backoff
//! that doubles up to [`MAX_BACKOFF`], with a warning when the outage starts and a message
//! when it ends; a refusal (4xx: wrong model name, prompt embeds not enabled, too long) fails
//! the stream, for the element to stop on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::backend::{CaptionBackend, CaptionId, Finished, Outcome, Report};
use super::engine::CaptionEngine;
use super::stream::Problem;
use crate::model::remote::{RemoteCaptionInput, RemoteLanguageModel, PROBE};
use crate::model::{Cancel, GenerationParams, ModelError, Result};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How often the scheduler looks for the server's reply while one is awaited.
const POLL: Duration = Duration::from_millis(20);

pub struct RemoteCaptions<E: CaptionEngine> {
    /// Builds the server's input and decodes its ids (the local embeddings and tokenizer).
    engine: Arc<E>,
    model: RemoteLanguageModel,
    /// The caption whose request is in flight (`None` for the start-up probe).
    pending: Option<CaptionId>,
    /// Whether the start-up probe is still in flight.
    probing: bool,
    /// A caption that fell due while the probe ran: sent when the probe has answered.
    after_probe: Option<(CaptionId, RemoteCaptionInput)>,
    retry_at: Option<Instant>,
    failures: u32,
}

impl<E: CaptionEngine> RemoteCaptions<E> {
    /// Starts with a probe of the server (`/v1/models`): an unreachable server is reported
    /// at once, a server that does not serve the model is refused at once.
    pub fn new(engine: Arc<E>, model: RemoteLanguageModel) -> Result<Self> {
        model.start_probe()?;
        Ok(Self {
            engine,
            model,
            pending: None,
            probing: true,
            after_probe: None,
            retry_at: None,
            failures: 0,
        })
    }

    fn backing_off(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    fn url(&self) -> &str {
        &self.model.config().url
    }
}

impl<E: CaptionEngine> CaptionBackend<E::Prompt> for RemoteCaptions<E> {
    fn accepts(&mut self) -> bool {
        let probe_only = self.probing && self.after_probe.is_none();
        (probe_only || !self.model.busy()) && !self.backing_off()
    }

    fn stream_waits(&self) -> bool {
        false
    }

    fn start(
        &mut self,
        id: CaptionId,
        tokens: &Tensor,
        prompt: &E::Prompt,
        params: &GenerationParams,
    ) -> Result<()> {
        let input = self.engine.remote_input(tokens, prompt, params)?;
        if self.probing {
            self.after_probe = Some((id, input));
            return Ok(());
        }
        self.model.start(input)?;
        self.pending = Some(id);
        Ok(())
    }

    /// The reply of the request in flight will be dropped (a flush): it still runs to its end
    /// on the server, and no new request starts before it has.
    fn abandon(&mut self, id: CaptionId) {
        if self
            .after_probe
            .as_ref()
            .is_some_and(|(queued, _)| *queued == id)
        {
            self.after_probe = None;
        }
        if self.pending == Some(id) {
            self.pending = None;
            self.model.abandon();
        }
    }

    fn captions(&self) -> Vec<CaptionId> {
        self.pending
            .into_iter()
            .chain(self.after_probe.as_ref().map(|(id, _)| *id))
            .collect()
    }

    fn ready(&self) -> bool {
        false
    }

    fn poll_every(&self) -> Option<Duration> {
        self.model.busy().then_some(POLL)
    }

    fn advance(&mut self, _cancel: Cancel) -> Vec<Report> {
        let Some(reply) = self.model.reply(Duration::ZERO) else {
            return Vec::new();
        };
        let pending = self.pending.take();
        let after_probe = if std::mem::take(&mut self.probing) {
            self.after_probe.take()
        } else {
            None
        };
        let mut reports = Vec::new();
        match reply {
            Ok(completion) => {
                if self.failures > 0 {
                    reports.push(Report::Info(format!(
                        "The language-model server answers again (after {} failed attempts)",
                        self.failures
                    )));
                }
                self.failures = 0;
                self.retry_at = None;
                if let Some(id) = pending {
                    if completion.finish_reason.as_deref() != Some(PROBE) {
                        let outcome = match self.engine.remote_text(completion) {
                            Ok(text) => Outcome::Text(text),
                            Err(e) => Outcome::Failed(Problem::model(
                                "decoding the language-model server's reply",
                                &e,
                            )),
                        };
                        reports.push(Report::Finished(Finished {
                            id,
                            outcome,
                            batch: 1,
                        }));
                    }
                }
                if let Some((id, input)) = after_probe {
                    match self.model.start(input) {
                        Ok(()) => self.pending = Some(id),
                        Err(e) => reports.push(Report::Failed(Problem::model(
                            "captioning through the language-model server",
                            &e,
                        ))),
                    }
                }
            }
            Err(ModelError::Remote(e)) if e.is_retryable() => {
                self.failures += 1;
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << (self.failures - 1).min(16))
                    .min(MAX_BACKOFF);
                self.retry_at = Some(Instant::now() + backoff);
                if self.failures == 1 {
                    reports.push(Report::Warning(Problem {
                        message: format!(
                            "The language-model server {} cannot caption now; captions resume \
                             when it answers (retrying with backoff)",
                            self.url()
                        ),
                        debug: e.to_string(),
                        log: None,
                    }));
                }
                for id in pending.into_iter().chain(after_probe.map(|(id, _)| id)) {
                    reports.push(Report::Finished(Finished {
                        id,
                        outcome: Outcome::Lost,
                        batch: 1,
                    }));
                }
            }
            Err(e) => reports.push(Report::Failed(Problem::model(
                "captioning through the language-model server",
                &e,
            ))),
        }
        reports
    }
}
