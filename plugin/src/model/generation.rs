//! Generation as a state that advances one token per step, vLLM-style: one [`CaptionSequence`]
//! per caption being written, and [`LlamaVid::step`] advancing any number of them by one token
//! in ONE forward of the language model (a sequence that just joined prefills beside the
//! others' decode steps; every weight is read once for all of them). Sequences join and leave
//! between steps; the one-caption path ([`LlamaVid::generate`]) is the same code with one
//! sequence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

use super::cancel::{Cancel, CANCELLED};
use super::llama::{LlamaCache, LogitsFor, SequenceStep};
use super::llamavid::{Generation, LlamaVid};
use super::prefix_cache::PrefixKv;
use super::sampling::{GenerationParams, Sampler};
use super::{ModelError, Result};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model wrote its end-of-sequence token (not part of the ids).
    Eos,
    /// `max_new_tokens` were written, or the context is full.
    Length,
    /// Its cancel flag was set (see [`CaptionSequence::set_cancel_flag`]).
    Cancelled,
}

/// One caption being generated: its KV cache, sampler, the ids so far and the bookkeeping of
/// when it stops. Made by [`LlamaVid::start_sequence`], advanced by [`LlamaVid::step`].
pub struct CaptionSequence {
    cache: LlamaCache,
    sampler: Sampler,
    /// What the next step runs: the prefill's embeddings (1, S, H), then the embedding of the
    /// last token written (1, 1, H).
    input: Tensor,
    token_ids: Vec<u32>,
    step_logits: Option<Vec<Tensor>>,
    max_new: usize,
    eos: u32,
    finished: Option<FinishReason>,
    cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for CaptionSequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionSequence")
            .field("positions", &self.cache.len())
            .field("tokens", &self.token_ids.len())
            .field("max_new", &self.max_new)
            .field("finished", &self.finished)
            .finish()
    }
}

impl CaptionSequence {
    /// Keeps the logits (vocab,) of every step (tests, debugging).
    pub fn keeping_step_logits(mut self) -> Self {
        self.step_logits = Some(Vec::new());
        self
    }

    /// Cancels this sequence alone once `flag` is set: checked before each step and between
    /// the layers of each forward. A forward interrupted this way advances no sequence of its
    /// batch (their caches stay as they were); the flagged ones finish with
    /// [`FinishReason::Cancelled`] and the others go on at the next step.
    pub fn set_cancel_flag(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    /// The ids written so far (EOS excluded).
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// The logits of every step, when kept.
    pub fn step_logits(&self) -> &[Tensor] {
        self.step_logits.as_deref().unwrap_or(&[])
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// Positions in the language model's context this sequence holds (prompt, video and the
    /// tokens run so far).
    pub fn positions(&self) -> usize {
        self.cache.len()
    }

    /// Rows the next step runs for this sequence: its prefill's length, then 1; 0 once
    /// finished (for a scheduler that bounds the rows of one forward).
    pub fn next_rows(&self) -> usize {
        if self.finished.is_some() {
            0
        } else {
            self.input.dim(1).unwrap_or(0)
        }
    }

    /// The generation as [`LlamaVid::generate`] reports it.
    pub fn into_generation(self) -> Generation {
        Generation {
            stopped_at_eos: self.finished == Some(FinishReason::Eos),
            token_ids: self.token_ids,
            step_logits: self.step_logits.unwrap_or_default(),
        }
    }

    fn cancel_requested(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }
}

impl LlamaVid {
    /// A sequence that will prefill `embeddings` (1, S, H) (from [`Self::input_embeddings`])
    /// at its first step, then decode until EOS, `params.max_new_tokens` or the end of the
    /// context. Checks the input here, so that a bad one never fails a batch.
    pub fn start_sequence(
        &self,
        embeddings: &Tensor,
        params: &GenerationParams,
    ) -> Result<CaptionSequence> {
        self.start_sequence_after(embeddings, None, params)
    }

    /// [`Self::start_sequence`] whose context starts from `prefix`'s keys and values, which
    /// must be those of the first `prefix.len()` rows of `embeddings` (as
    /// [`Self::start_caption`] finds them): the first step prefills only the rows after them.
    pub(crate) fn start_sequence_after(
        &self,
        embeddings: &Tensor,
        prefix: Option<&PrefixKv>,
        params: &GenerationParams,
    ) -> Result<CaptionSequence> {
        let llm = self.llm();
        if !llm.has_decoder() {
            return Err(ModelError::InvalidInput(
                "this model was loaded with the token embeddings only (its language model runs \
                 on a server): it cannot generate locally"
                    .into(),
            ));
        }
        let dims = embeddings.dims();
        if dims.len() != 3 || dims[0] != 1 || dims[1] == 0 || dims[2] != llm.hidden_size() {
            return Err(ModelError::InvalidInput(format!(
                "a caption's input embeddings are (1, S > 0, {}), got {dims:?}",
                llm.hidden_size()
            )));
        }
        let prefill_len = dims[1];
        if prefill_len > llm.max_positions() {
            return Err(ModelError::InvalidInput(format!(
                "the prompt and the window take {prefill_len} positions, more than the language \
                 model's {} (shorten the window)",
                llm.max_positions()
            )));
        }
        // The last token written is never run: the context holds the prefill and all but it.
        let room = llm.max_positions() - prefill_len;
        let max_new = params.max_new_tokens.min(room + 1);
        let mut cache = llm.new_cache(prefill_len + max_new);
        let mut input = embeddings.to_dtype(self.dtype())?;
        // Only with rows left to prefill: the first step's logits come from the last row.
        if let Some(prefix) = prefix.filter(|p| !p.is_empty() && p.len() < prefill_len) {
            prefix.start(&mut cache)?;
            input = input.narrow(1, prefix.len(), prefill_len - prefix.len())?;
        }
        Ok(CaptionSequence {
            cache,
            sampler: Sampler::new(params),
            input,
            token_ids: Vec::new(),
            step_logits: None,
            max_new,
            eos: self.llm_tokenizer().eos_id(),
            finished: (max_new == 0).then_some(FinishReason::Length),
            cancel: None,
        })
    }

    /// Advances every unfinished sequence of `sequences` by one token in one forward: the
    /// rows of all of them (a new sequence's whole prefill, one row for the others) go through
    /// each layer together, attention stays within each sequence. Finished sequences are
    /// skipped.
    ///
    /// Cancellation: `cancel` is checked before every layer; once it fires the step returns
    /// [`ModelError::Cancelled`] and no sequence has advanced (each can go on at a later
    /// step). A sequence's own flag ([`CaptionSequence::set_cancel_flag`]) finishes it alone
    /// within one layer: the step then returns `Ok` with the other sequences not advanced,
    /// to be advanced by the next call. On any other error no sequence has advanced either.
    pub fn step(&self, sequences: &mut [&mut CaptionSequence], cancel: Cancel) -> Result<()> {
        self.install(|| self.step_in_pool(sequences, cancel))
    }

    fn step_in_pool(&self, sequences: &mut [&mut CaptionSequence], cancel: Cancel) -> Result<()> {
        for seq in sequences.iter_mut() {
            if seq.finished.is_none() && seq.cancel_requested() {
                seq.finished = Some(FinishReason::Cancelled);
            }
        }
        let mut running: Vec<&mut CaptionSequence> = sequences
            .iter_mut()
            .filter(|s| s.finished.is_none())
            .map(|s| &mut **s)
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        let flags: Vec<Arc<AtomicBool>> = running.iter().filter_map(|s| s.cancel.clone()).collect();
        // Which side stopped the forward: the caller's cancel (asked once per layer, so that
        // a probe counting its calls sees one per layer), or a sequence's own flag.
        let caller_cancelled = AtomicBool::new(false);
        let probe = || {
            if cancel.is_cancelled() {
                caller_cancelled.store(true, Ordering::Relaxed);
                return true;
            }
            flags.iter().any(|f| f.load(Ordering::Relaxed))
        };
        let mut steps: Vec<SequenceStep> = running
            .iter_mut()
            .map(|s| SequenceStep {
                embeddings: &s.input,
                cache: &mut s.cache,
            })
            .collect();
        let logits = match self.llm().forward_rows(
            &mut steps,
            LogitsFor::LastPosition,
            None,
            Cancel::on_probe(&probe),
        ) {
            Ok(logits) => logits,
            Err(candle_core::Error::Msg(m)) if m == CANCELLED => {
                if caller_cancelled.load(Ordering::Relaxed) {
                    return Err(ModelError::Cancelled);
                }
                drop(steps);
                for seq in running.iter_mut().filter(|s| s.cancel_requested()) {
                    seq.finished = Some(FinishReason::Cancelled);
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        drop(steps);
        // Everything that can fail happens before the caches commit this step's rows (the
        // samplers advance on copies until then).
        let mut chosen = Vec::with_capacity(running.len());
        for (seq, logits) in running.iter().zip(&logits) {
            let row = logits.flatten_all()?;
            let mut sampler = seq.sampler.clone();
            let token = sampler.next(&row.to_vec1::<f32>()?);
            chosen.push((token, row, sampler));
        }
        let going_on: Vec<u32> = running
            .iter()
            .zip(&chosen)
            .filter(|(seq, (token, ..))| *token != seq.eos && seq.token_ids.len() + 1 < seq.max_new)
            .map(|(_, (token, ..))| *token)
            .collect();
        let embedded = match going_on.is_empty() {
            true => None,
            false => Some(self.llm().embed(&going_on)?),
        };
        let mut next = 0;
        for (seq, (token, row, sampler)) in running.iter_mut().zip(chosen) {
            seq.cache.commit(seq.input.dim(1)?);
            seq.sampler = sampler;
            if let Some(kept) = seq.step_logits.as_mut() {
                kept.push(row);
            }
            if token == seq.eos {
                seq.finished = Some(FinishReason::Eos);
                continue;
            }
            seq.token_ids.push(token);
            if seq.token_ids.len() >= seq.max_new {
                seq.finished = Some(FinishReason::Length);
                continue;
            }
            let embedded = embedded.as_ref().expect("tokens going on were embedded");
            seq.input = embedded.narrow(1, next, 1)?;
            next += 1;
        }
        Ok(())
    }
}
