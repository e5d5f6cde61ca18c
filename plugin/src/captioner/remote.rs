//! Captions of one stream through a language-model server, without ever holding up the
//! worker: a due caption starts a request and the worker goes back to encoding frames (the
//! window keeps sliding); the reply is collected between jobs. At most one request is in
//! flight per stream: a caption that falls due meanwhile is skipped and counted late. A
//! server that is away or failing (retryable errors) gets the next attempt after a backoff
//! that doubles up to [`MAX_BACKOFF`], with a warning when the outage starts and a message
//! when it ends; a refusal (4xx: wrong model name, prompt embeds not enabled, too long) is
//! returned as an error, for the element to stop on.

use std::time::{Duration, Instant};

use super::worker::CaptionEvent;
use crate::model::remote::{Completion, RemoteCaptionInput, RemoteLanguageModel, PROBE};
use crate::model::{ModelError, Result};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What became of a due caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    Sent,
    /// The previous request is still in flight: this caption is late and skipped.
    Busy,
    /// The server failed recently: no request before the backoff ends.
    BackingOff,
}

/// What a reply brought.
#[derive(Debug)]
pub enum Collected {
    /// The caption's event (text still empty) and the server's completion.
    Caption(CaptionEvent, Completion),
    /// The server failed and will be asked again after the backoff; `first` is true for the
    /// first failure of an outage (warn once).
    Unavailable { error: ModelError, first: bool },
    /// The server answered again after `failures` failed attempts.
    Recovered { failures: u32 },
}

pub struct RemoteCaptions {
    model: RemoteLanguageModel,
    /// The caption whose request is in flight (`None` for the start-up probe).
    pending: Option<CaptionEvent>,
    /// The arrival of the last frame of the pending caption, for its latency.
    pending_arrived: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
    /// Captions skipped because a request was still in flight.
    pub late: u64,
}

impl RemoteCaptions {
    /// Starts with a probe of the server (`/v1/models`): an unreachable server is reported
    /// at once, a server that does not serve the model is refused at once.
    pub fn new(model: RemoteLanguageModel) -> Result<Self> {
        model.start_probe()?;
        Ok(Self {
            model,
            pending: None,
            pending_arrived: None,
            retry_at: None,
            failures: 0,
            late: 0,
        })
    }

    pub fn model(&self) -> &RemoteLanguageModel {
        &self.model
    }

    pub fn in_flight(&self) -> bool {
        self.model.busy()
    }

    /// True when a caption due now would not be sent (counting it late when a request is in
    /// flight), so that its input need not be built.
    pub fn start_blocked(&mut self) -> bool {
        if self.model.busy() {
            self.late += 1;
            return true;
        }
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// Sends a due caption, unless a request is in flight or the server is backed off from.
    /// `event` describes the window (its text is filled in when the reply comes), `arrived`
    /// is when its last frame arrived.
    pub fn start(
        &mut self,
        input: RemoteCaptionInput,
        event: CaptionEvent,
        arrived: Instant,
    ) -> Result<Started> {
        if self.model.busy() {
            self.late += 1;
            return Ok(Started::Busy);
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(Started::BackingOff);
        }
        self.model.start(input)?;
        self.pending = Some(event);
        self.pending_arrived = Some(arrived);
        Ok(Started::Sent)
    }

    /// The request in flight is of no use any more (a flush): its reply will be dropped.
    pub fn abandon(&mut self) {
        if self.pending.take().is_some() {
            self.model.abandon();
        }
        self.pending_arrived = None;
    }

    /// Collects the reply in flight if it comes within `wait`. Fatal failures are returned
    /// as errors.
    pub fn poll(&mut self, wait: Duration) -> Result<Vec<Collected>> {
        let Some(reply) = self.model.reply(wait) else {
            return Ok(Vec::new());
        };
        let pending = self.pending.take();
        let arrived = self.pending_arrived.take();
        let mut collected = Vec::new();
        match reply {
            Ok(completion) => {
                if self.failures > 0 {
                    collected.push(Collected::Recovered {
                        failures: self.failures,
                    });
                }
                self.failures = 0;
                self.retry_at = None;
                if let Some(mut event) = pending {
                    if completion.finish_reason.as_deref() != Some(PROBE) {
                        if let Some(arrived) = arrived {
                            event.latency = arrived.elapsed();
                        }
                        collected.push(Collected::Caption(event, completion));
                    }
                }
            }
            Err(ModelError::Remote(e)) if e.is_retryable() => {
                self.failures += 1;
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << (self.failures - 1).min(16))
                    .min(MAX_BACKOFF);
                self.retry_at = Some(Instant::now() + backoff);
                collected.push(Collected::Unavailable {
                    error: ModelError::Remote(e),
                    first: self.failures == 1,
                });
            }
            Err(e) => return Err(e),
        }
        Ok(collected)
    }

    /// Waits for the request in flight (an EOS drains it), checking `cancelled` every 10 ms.
    pub fn drain(&mut self, cancelled: impl Fn() -> bool) -> Result<Vec<Collected>> {
        let mut collected = Vec::new();
        while self.model.busy() && !cancelled() {
            collected.extend(self.poll(Duration::from_millis(10))?);
        }
        Ok(collected)
    }
}
