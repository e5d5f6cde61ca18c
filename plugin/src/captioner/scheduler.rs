//! One scheduler per loaded model: the only thread that runs it. Every stream sharing the model
//! (one per element) submits its sampled frames; the scheduler encodes frames of all streams in
//! batches, and decodes the captions due on all streams together, one forward per step, with
//! captions joining and leaving between steps (continuous batching, see [`backend`]).
//!
//! Each stream keeps its own state (window, schedule, prompt: [`StreamLogic`]) and its own
//! queue of frames with its own drop policy (live streams drop their oldest waiting frame,
//! files wait). A stream whose language model is on a server brings its own caption backend
//! (`captioner::remote`): its captions never occupy the model's thread.
//!
//! Work is shared fairly: frames are taken round-robin across streams, one caption per stream
//! runs at a time and captions enter the batch oldest first. When both frames and captions
//! wait, the model's time is split: an encode batch runs once the decode steps since the last
//! one took as long as it did. A flush, EOS or prompt change of one stream touches only its
//! work (its caption leaves the batch at the next step; the model is interrupted between
//! layers only when nothing else in the batch is wanted); an error in one stream's frame fails
//! that stream alone; a stream may leave at any moment.
//!
//! [`backend`]: super::backend

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::backend::{CaptionBackend, CaptionId, Finished, LocalCaptions, Outcome, Report};
use super::engine::CaptionEngine;
use super::job::{FrameJob, Job};
use super::queue::{JobQueue, Pushed, QueuePolicy};
use super::stream::{
    CaptionOutput, CaptionRequest, CaptionSettings, Encoded, Problem, StreamLogic,
};
use crate::model::preprocess::FrameView;
use crate::model::{Cancel, ModelError};
use crate::sync::lock;

/// How much the scheduler puts in one call of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Frames encoded together.
    pub encode: usize,
    /// Captions decoded together.
    pub caption: usize,
}

impl BatchLimits {
    /// On a CPU the vision tower is compute-bound (a bigger batch gains little and delays the
    /// captions waiting behind it), while decoding reads every weight per step (a batch shares
    /// that read); a GPU wants bigger batches of both.
    pub fn default_for(gpu: bool) -> Self {
        if gpu {
            Self {
                encode: 16,
                caption: 32,
            }
        } else {
            Self {
                encode: 4,
                caption: 8,
            }
        }
    }
}

/// The scheduler of one loaded model. Dropping it stops its thread (interrupting the model
/// between layers) and waits for it.
pub struct Scheduler<E: CaptionEngine> {
    core: Arc<Core<E>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Core<E: CaptionEngine> {
    engine: Arc<E>,
    limits: BatchLimits,
    streams: Mutex<Vec<Arc<StreamCore<E::Prompt>>>>,
    /// Held while deciding to sleep and while waking (no wake-up is lost in between).
    wake: Mutex<()>,
    woken: Condvar,
    shutdown: AtomicBool,
    next_stream: AtomicU64,
    thread_id: Mutex<Option<ThreadId>>,
}

/// One stream as the scheduler sees it; its element holds it through a [`StreamHandle`].
struct StreamCore<P> {
    id: u64,
    inbox: JobQueue<Job>,
    settings: Arc<Mutex<CaptionSettings>>,
    output: Arc<dyn CaptionOutput>,
    /// Flushes started, and the flush whose reset the scheduler processed last: the stream's
    /// work is cancelled while they differ.
    flushes_started: AtomicU64,
    flush_of_next_reset: AtomicU64,
    flushes_done: AtomicU64,
    /// Results may still go out (false once the stream detached or failed).
    gate: Gate,
    /// Locked by the scheduler thread only (never by the element), so results may go out
    /// while it is held without a lock order anyone else could break.
    lane: Mutex<Lane<P>>,
}

/// What the scheduler does for one stream beyond its queue.
struct Lane<P> {
    logic: StreamLogic<P>,
    /// The stream's own caption backend (a server); `None`: the scheduler's shared one.
    own: Option<Box<dyn CaptionBackend<P>>>,
    /// The stream's caption in the backend.
    in_flight: Option<InFlight<P>>,
    /// Results that must wait for the caption in flight, in order (a frame encoded in the
    /// same batch after the one that made a caption due).
    deferred: VecDeque<Deferred<P>>,
}

struct InFlight<P> {
    id: CaptionId,
    request: CaptionRequest<P>,
    /// EOS (of this epoch) goes out after the caption: it was the final one.
    eos_after: Option<u64>,
}

enum Deferred<P> {
    Idle { epoch: u64, until: u64 },
    Due(CaptionRequest<P>),
}

impl<P> Lane<P> {
    /// No caption in flight and nothing waiting for one.
    fn idle(&self) -> bool {
        self.in_flight.is_none() && self.deferred.is_empty()
    }

    /// Results of the stream's next frames may go out now without overtaking its caption
    /// (none in flight, or one its backend lets frames go on beside).
    fn in_order(&self) -> bool {
        self.deferred.is_empty()
            && (self.in_flight.is_none() || self.own.as_ref().is_some_and(|b| !b.stream_waits()))
    }
}

impl<P> StreamCore<P> {
    fn cancelled(&self) -> bool {
        self.flushes_started.load(Ordering::SeqCst) != self.flushes_done.load(Ordering::SeqCst)
    }

    /// Nothing of this stream's current work is wanted.
    fn unwanted(&self) -> bool {
        self.gate.is_closed() || self.cancelled()
    }
}

/// Lets results out until closed; `close` waits for a result going out at that moment, so
/// that nothing reaches a stream's output after it left (unless the output itself is what
/// closes it, on the scheduler's thread).
struct Gate {
    state: Mutex<(bool, usize)>,
    idle: Condvar,
}

struct GateGuard<'a>(&'a Gate);

impl Gate {
    fn new() -> Self {
        Self {
            state: Mutex::new((false, 0)),
            idle: Condvar::new(),
        }
    }

    fn enter(&self) -> Option<GateGuard<'_>> {
        let mut state = lock(&self.state);
        if state.0 {
            return None;
        }
        state.1 += 1;
        Some(GateGuard(self))
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).0
    }

    fn close(&self, wait: bool) {
        let mut state = lock(&self.state);
        state.0 = true;
        while wait && state.1 > 0 {
            state = self.idle.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.1 -= 1;
        self.0.idle.notify_all();
    }
}

/// An element's stream on a scheduler: where it submits frames, flushes, and leaves (dropping
/// the handle leaves too). Every method returns at once, but `submit` under
/// [`QueuePolicy::Block`] with a full queue, which waits for room.
pub struct StreamHandle<E: CaptionEngine> {
    stream: Arc<StreamCore<E::Prompt>>,
    core: Arc<Core<E>>,
}

impl<E: CaptionEngine> StreamHandle<E> {
    pub fn submit(&self, job: Job, policy: QueuePolicy) -> Pushed<Job> {
        let pushed = self.stream.inbox.push(job, policy);
        self.core.wake();
        pushed
    }

    /// Drops the stream's waiting frames and its caption (at the next step boundary, or at
    /// once between layers when nothing else in the model's batch is wanted).
    pub fn flush_start(&self) {
        self.stream.flushes_started.fetch_add(1, Ordering::SeqCst);
        self.stream.inbox.set_flushing(true);
        self.core.wake();
    }

    /// Accepts work again, starting from an empty window.
    pub fn flush_stop(&self, epoch: u64) {
        let flush = self.stream.flushes_started.load(Ordering::SeqCst);
        self.stream
            .flush_of_next_reset
            .store(flush, Ordering::SeqCst);
        self.stream.inbox.set_flushing(false);
        self.stream
            .inbox
            .push(Job::Reset { epoch }, QueuePolicy::Block);
        self.core.wake();
    }

    /// Frames waiting for the model.
    pub fn pending(&self) -> usize {
        self.stream.inbox.len()
    }

    /// Leaves the scheduler: waiting work is dropped, the stream's caption leaves the batch,
    /// and once this returns nothing more reaches the stream's output.
    pub fn detach(&self) {
        self.stream.inbox.close();
        let on_scheduler = *lock(&self.core.thread_id) == Some(std::thread::current().id());
        self.stream.gate.close(!on_scheduler);
        self.core.wake();
    }
}

impl<E: CaptionEngine> Drop for StreamHandle<E> {
    fn drop(&mut self) {
        self.detach();
    }
}

impl<E: CaptionEngine> Scheduler<E> {
    /// Starts the scheduler's thread; captions are generated by the engine's own language
    /// model, `limits.caption` at a time.
    pub fn spawn(engine: Arc<E>, limits: BatchLimits) -> std::io::Result<Self> {
        let limits = BatchLimits {
            encode: limits.encode.max(1),
            caption: limits.caption.max(1),
        };
        let backend = Box::new(LocalCaptions::new(engine.clone(), limits.caption));
        let core = Arc::new(Core {
            engine,
            limits,
            streams: Mutex::new(Vec::new()),
            wake: Mutex::new(()),
            woken: Condvar::new(),
            shutdown: AtomicBool::new(false),
            next_stream: AtomicU64::new(0),
            thread_id: Mutex::new(None),
        });
        let running = core.clone();
        let thread = std::thread::Builder::new()
            .name("llamavid-scheduler".into())
            .spawn(move || running.run(backend))?;
        *lock(&core.thread_id) = Some(thread.thread().id());
        Ok(Self {
            core,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// A new stream: `capacity` frames may wait in its queue; `settings` are read before each
    /// of its jobs; its results go to `output`.
    pub fn attach(
        &self,
        settings: Arc<Mutex<CaptionSettings>>,
        output: Arc<dyn CaptionOutput>,
        capacity: usize,
    ) -> StreamHandle<E> {
        self.attach_with(settings, output, capacity, None)
    }

    /// [`attach`](Self::attach) with the stream's captions generated by its own backend
    /// (`captioner::remote::RemoteCaptions`: a language-model server).
    pub fn attach_with(
        &self,
        settings: Arc<Mutex<CaptionSettings>>,
        output: Arc<dyn CaptionOutput>,
        capacity: usize,
        own: Option<Box<dyn CaptionBackend<E::Prompt>>>,
    ) -> StreamHandle<E> {
        let window_duration = lock(&settings).window_duration;
        let stream = Arc::new(StreamCore {
            id: self.core.next_stream.fetch_add(1, Ordering::SeqCst),
            inbox: JobQueue::new(capacity),
            settings,
            output,
            flushes_started: AtomicU64::new(0),
            flush_of_next_reset: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            gate: Gate::new(),
            lane: Mutex::new(Lane {
                logic: StreamLogic::new(window_duration),
                own,
                in_flight: None,
                deferred: VecDeque::new(),
            }),
        });
        lock(&self.core.streams).push(stream.clone());
        self.core.wake();
        StreamHandle {
            stream,
            core: self.core.clone(),
        }
    }

    /// Streams attached (those that left are forgotten at the scheduler's next round).
    pub fn streams(&self) -> usize {
        lock(&self.core.streams).len()
    }

    pub fn limits(&self) -> BatchLimits {
        self.core.limits
    }
}

impl<E: CaptionEngine> Drop for Scheduler<E> {
    fn drop(&mut self) {
        self.core.shutdown.store(true, Ordering::SeqCst);
        self.core.wake();
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            // Dropped on its own thread (an output callback let go of the last user of the
            // model): the thread ends by itself after the callback returns.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// The scheduler thread's own bookkeeping.
struct Round<P> {
    cursor: usize,
    next_caption: CaptionId,
    /// Which stream each caption in the backend belongs to.
    captions: HashMap<CaptionId, Arc<StreamCore<P>>>,
    /// Time of the last encode batch, and of the decode steps since.
    last_encode: Duration,
    decoding_since_encode: Duration,
}

/// A frame taken for the next encode batch.
struct Taken<P> {
    stream: Arc<StreamCore<P>>,
    epoch: u64,
    job: FrameJob,
    prompt: Arc<P>,
}

impl<E: CaptionEngine> Core<E> {
    fn wake(&self) {
        let _guard = lock(&self.wake);
        self.woken.notify_all();
    }

    fn run(&self, mut backend: Box<dyn CaptionBackend<E::Prompt>>) {
        let mut round = Round {
            cursor: 0,
            next_caption: 0,
            captions: HashMap::new(),
            last_encode: Duration::ZERO,
            decoding_since_encode: Duration::ZERO,
        };
        while let Some(streams) = self.wait_for_work(&*backend) {
            for stream in &streams {
                self.tidy(stream, &mut *backend, &mut round);
            }
            // Captions first; frames get the model once the steps since the last encode
            // took as long as it did (or when no caption runs).
            let frames_wait = streams.iter().any(|s| self.has_frame(s));
            let decode = backend.ready()
                && (!frames_wait || round.decoding_since_encode < round.last_encode);
            if decode {
                let started = Instant::now();
                self.step(&mut *backend, &mut round);
                round.decoding_since_encode += started.elapsed();
            } else if frames_wait {
                let taken = self.take_frames(&streams, &mut round);
                if !taken.is_empty() {
                    let started = Instant::now();
                    self.encode(taken, &mut *backend, &mut round);
                    round.last_encode = started.elapsed();
                    round.decoding_since_encode = Duration::ZERO;
                }
            }
        }
        // Stopped: nothing more goes out.
        for id in backend.captions() {
            backend.abandon(id);
        }
    }

    /// The attached streams once there is something to do; `None` at shutdown.
    fn wait_for_work(
        &self,
        backend: &dyn CaptionBackend<E::Prompt>,
    ) -> Option<Vec<Arc<StreamCore<E::Prompt>>>> {
        let mut guard = lock(&self.wake);
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return None;
            }
            let streams = lock(&self.streams).clone();
            if backend.ready() || streams.iter().any(|s| self.has_work(s)) {
                return Some(streams);
            }
            // Backends of streams that are polled (a server's reply) set the pace.
            let poll = streams
                .iter()
                .filter_map(|s| lock(&s.lane).own.as_ref().and_then(|b| b.poll_every()))
                .min();
            let (next, waited) = self
                .woken
                .wait_timeout(guard, poll.unwrap_or(Duration::from_secs(1)))
                .unwrap_or_else(|e| e.into_inner());
            guard = next;
            if poll.is_some() && waited.timed_out() {
                return Some(lock(&self.streams).clone());
            }
        }
    }

    fn has_work(&self, stream: &StreamCore<E::Prompt>) -> bool {
        let lane = lock(&stream.lane);
        if stream.gate.is_closed() || stream.cancelled() && !lane.idle() {
            return true;
        }
        stream.inbox.peek(|job| match job {
            Some(Job::Reset { .. }) => true,
            Some(Job::Frame { .. }) => lane.in_order() && !stream.cancelled(),
            Some(Job::Eos { .. }) => lane.idle() && !stream.cancelled(),
            None => false,
        })
    }

    fn has_frame(&self, stream: &StreamCore<E::Prompt>) -> bool {
        let lane = lock(&stream.lane);
        lane.in_order()
            && !stream.unwanted()
            && stream
                .inbox
                .peek(|job| matches!(job, Some(Job::Frame { .. })))
    }

    /// Cleans up after streams that left, failed or flushed, collects what their own
    /// backends brought, and handles the resets and EOS at the head of their queues.
    fn tidy(
        &self,
        stream: &Arc<StreamCore<E::Prompt>>,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
    ) {
        let mut guard = lock(&stream.lane);
        let lane = &mut *guard;
        if stream.gate.is_closed() {
            drop_work(lane, backend, round);
            lock(&self.streams).retain(|s| s.id != stream.id);
            return;
        }
        if stream.cancelled() {
            drop_work(lane, backend, round);
        }
        if let Some(own) = lane.own.as_mut() {
            let reports = own.advance(Cancel::NEVER);
            for report in reports {
                self.deliver(stream, lane, report, backend, round);
            }
            if stream.gate.is_closed() {
                return;
            }
        }
        loop {
            let head = stream.inbox.peek(|job| match job {
                Some(Job::Reset { .. }) => Some(true),
                Some(Job::Eos { .. }) => Some(false),
                _ => None,
            });
            match head {
                Some(true) => {
                    stream.inbox.try_pop();
                    drop_work(lane, backend, round);
                    lane.logic.reset();
                    let flush = stream.flush_of_next_reset.load(Ordering::SeqCst);
                    stream.flushes_done.store(flush, Ordering::SeqCst);
                }
                Some(false) if lane.idle() && !stream.cancelled() => {
                    let Some(Job::Eos { epoch }) = stream.inbox.try_pop() else {
                        continue;
                    };
                    let settings = lock(&stream.settings).clone();
                    let engine = &*self.engine;
                    let own = &mut lane.own;
                    let accepts = || own.as_mut().is_none_or(|b| b.accepts());
                    match lane.logic.final_caption(
                        engine,
                        &settings,
                        epoch,
                        &Gated(stream),
                        accepts,
                    ) {
                        Ok(Some(request)) => {
                            self.admit(stream, lane, request, Some(epoch), backend, round)
                        }
                        Ok(None) => send(stream, |o| o.eos(epoch)),
                        Err(e) => self.fail(
                            stream,
                            lane,
                            backend,
                            round,
                            "captioning at the end of the stream",
                            e,
                        ),
                    }
                }
                _ => return,
            }
        }
    }

    /// Up to a batch of frames, round-robin across the streams that can take one.
    fn take_frames(
        &self,
        streams: &[Arc<StreamCore<E::Prompt>>],
        round: &mut Round<E::Prompt>,
    ) -> Vec<Taken<E::Prompt>> {
        let mut taken = Vec::new();
        let n = streams.len();
        if n == 0 {
            return taken;
        }
        let start = round.cursor % n;
        round.cursor = start + 1;
        'rounds: loop {
            let before = taken.len();
            for k in 0..n {
                if taken.len() >= self.limits.encode {
                    break 'rounds;
                }
                let stream = &streams[(start + k) % n];
                if !self.has_frame(stream) {
                    continue;
                }
                let Some(Job::Frame { epoch, job }) = stream.inbox.try_pop() else {
                    continue;
                };
                let settings = lock(&stream.settings).clone();
                let mut lane = lock(&stream.lane);
                match lane
                    .logic
                    .prompt(&*self.engine, &settings.prompt, &Gated(stream))
                {
                    Ok(prompt) => taken.push(Taken {
                        stream: stream.clone(),
                        epoch,
                        job,
                        prompt,
                    }),
                    Err(ModelError::Cancelled) => {}
                    Err(e) => {
                        // The lane is idle: nothing in the backend to abandon.
                        stream.inbox.close();
                        send_error(stream, Problem::model("preparing the prompt", &e));
                    }
                }
            }
            if taken.len() == before {
                break;
            }
        }
        taken
    }

    /// The engine's encode of `frames`, one result per frame, a panic caught. When a batch
    /// panics, its frames are encoded again one by one, so that only a frame that panics on
    /// its own fails (its stream); the others in the batch go on. `Err` is a problem that
    /// fails the frame's stream.
    fn encode_catching(
        &self,
        frames: &[(FrameView<'_>, &E::Prompt)],
        cancel: Cancel<'_>,
    ) -> Vec<std::result::Result<crate::model::Result<Tensor>, Problem>> {
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.engine.encode_batch(frames, cancel)
        }));
        match caught {
            Ok(results) if results.len() == frames.len() => results.into_iter().map(Ok).collect(),
            Ok(results) => {
                let problem = Problem {
                    message: "Internal error: the model encoded a wrong number of frames".into(),
                    debug: format!("{} results for {} frames", results.len(), frames.len()),
                    log: None,
                };
                frames.iter().map(|_| Err(problem.clone())).collect()
            }
            Err(panic) if frames.len() == 1 => {
                vec![Err(Problem::panic("encoding a frame", &*panic))]
            }
            Err(_) => frames
                .iter()
                .flat_map(|frame| self.encode_catching(std::slice::from_ref(frame), cancel))
                .collect(),
        }
    }

    fn encode(
        &self,
        taken: Vec<Taken<E::Prompt>>,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
    ) {
        let frames: Vec<_> = taken
            .iter()
            .map(|t| (t.job.frame.view(), &*t.prompt))
            .collect();
        let unwanted =
            || self.shutdown.load(Ordering::SeqCst) || taken.iter().all(|t| t.stream.unwanted());
        let results = self.encode_catching(&frames, Cancel::on_probe(&unwanted));
        drop(frames);
        let batch = taken.len();
        for (t, result) in taken.into_iter().zip(results) {
            let stream = &t.stream;
            if stream.unwanted() {
                continue;
            }
            let tokens = match result {
                Ok(Ok(tokens)) => tokens,
                Ok(Err(ModelError::Cancelled)) => continue,
                Ok(Err(e)) => {
                    let mut lane = lock(&stream.lane);
                    self.fail(stream, &mut lane, backend, round, "encoding a frame", e);
                    continue;
                }
                Err(problem) => {
                    self.fail_with(stream, backend, round, problem);
                    continue;
                }
            };
            send(stream, |o| o.frame_encoded(t.epoch, batch));
            let settings = lock(&stream.settings).clone();
            let mut guard = lock(&stream.lane);
            let lane = &mut *guard;
            let own = &mut lane.own;
            let encoded = lane.logic.encoded(
                &*self.engine,
                &settings,
                t.epoch,
                t.job.timing(),
                tokens,
                &Gated(stream),
                || own.as_mut().is_none_or(|b| b.accepts()),
            );
            match encoded {
                Ok(Encoded::Due(request)) if lane.idle() => {
                    self.admit(stream, lane, request, None, backend, round)
                }
                // Behind this stream's caption in flight (a frame later in the same batch).
                Ok(Encoded::Due(request)) => lane.deferred.push_back(Deferred::Due(request)),
                Ok(Encoded::Idle(until)) if lane.in_order() => {
                    drop(guard);
                    send(stream, |o| o.idle_until(t.epoch, until));
                }
                Ok(Encoded::Idle(until)) => lane.deferred.push_back(Deferred::Idle {
                    epoch: t.epoch,
                    until,
                }),
                Err(e) => self.fail(stream, lane, backend, round, "encoding a frame", e),
            }
        }
    }

    /// Hands a due caption to the backend; it joins the running batch at the next step.
    fn admit(
        &self,
        stream: &Arc<StreamCore<E::Prompt>>,
        lane: &mut Lane<E::Prompt>,
        request: CaptionRequest<E::Prompt>,
        eos_after: Option<u64>,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
    ) {
        let id = round.next_caption;
        round.next_caption += 1;
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let (tokens, prompt, params) = (&request.tokens, &*request.prompt, &request.params);
            match lane.own.as_mut() {
                Some(own) => own.start(id, tokens, prompt, params),
                None => backend.start(id, tokens, prompt, params),
            }
        }));
        match started {
            Ok(Ok(())) => {
                round.captions.insert(id, stream.clone());
                lane.in_flight = Some(InFlight {
                    id,
                    request,
                    eos_after,
                });
            }
            Ok(Err(e)) => self.fail(stream, lane, backend, round, "starting a caption", e),
            Err(panic) => {
                let problem = Problem::panic("starting a caption", &*panic);
                close_with(stream, lane, backend, round, problem);
            }
        }
    }

    /// One round of the shared backend; finished captions go out, and what waited for them.
    fn step(&self, backend: &mut dyn CaptionBackend<E::Prompt>, round: &mut Round<E::Prompt>) {
        let streams: Vec<Arc<StreamCore<E::Prompt>>> = backend
            .captions()
            .iter()
            .filter_map(|id| round.captions.get(id).cloned())
            .collect();
        let unwanted =
            || self.shutdown.load(Ordering::SeqCst) || streams.iter().all(|s| s.unwanted());
        let reports = backend.advance(Cancel::on_probe(&unwanted));
        for report in reports {
            let Report::Finished(done) = &report else {
                continue; // The shared backend reports only captions.
            };
            let Some(stream) = round.captions.get(&done.id).cloned() else {
                continue;
            };
            let mut lane = lock(&stream.lane);
            self.deliver(&stream, &mut lane, report, backend, round);
        }
    }

    /// Hands on what a backend reported for `stream`.
    fn deliver(
        &self,
        stream: &Arc<StreamCore<E::Prompt>>,
        lane: &mut Lane<E::Prompt>,
        report: Report,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
    ) {
        let done: Finished = match report {
            Report::Finished(done) => done,
            Report::Warning(problem) => return send(stream, |o| o.warning(problem)),
            Report::Info(message) => return send(stream, |o| o.info(message)),
            Report::Failed(problem) => return close_with(stream, lane, backend, round, problem),
        };
        round.captions.remove(&done.id);
        if lane.in_flight.as_ref().is_none_or(|f| f.id != done.id) {
            return;
        }
        let flight = lane.in_flight.take().expect("in flight");
        match done.outcome {
            Outcome::Text(text) => {
                if !stream.unwanted() {
                    let event = flight.request.event(text, done.batch);
                    send(stream, |o| o.caption(event));
                }
                self.after_caption(stream, lane, flight.eos_after, backend, round);
            }
            Outcome::Lost => self.after_caption(stream, lane, flight.eos_after, backend, round),
            Outcome::Cancelled => lane.deferred.clear(),
            Outcome::Failed(problem) => close_with(stream, lane, backend, round, problem),
        }
    }

    /// After a stream's caption (with or without text): EOS when it was the final one, then
    /// what waited for it.
    fn after_caption(
        &self,
        stream: &Arc<StreamCore<E::Prompt>>,
        lane: &mut Lane<E::Prompt>,
        eos_after: Option<u64>,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
    ) {
        if stream.unwanted() {
            return;
        }
        if let Some(epoch) = eos_after {
            send(stream, |o| o.eos(epoch));
        }
        self.release_deferred(stream, lane, backend, round);
    }

    /// After a stream's caption: what waited for it goes out, up to its next due caption.
    fn release_deferred(
        &self,
        stream: &Arc<StreamCore<E::Prompt>>,
        lane: &mut Lane<E::Prompt>,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
    ) {
        while let Some(next) = lane.deferred.pop_front() {
            match next {
                Deferred::Idle { epoch, until } => send(stream, |o| o.idle_until(epoch, until)),
                Deferred::Due(request) => {
                    self.admit(stream, lane, request, None, backend, round);
                    return;
                }
            }
        }
    }

    fn fail(
        &self,
        stream: &Arc<StreamCore<E::Prompt>>,
        lane: &mut Lane<E::Prompt>,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
        what: &str,
        error: ModelError,
    ) {
        if matches!(error, ModelError::Cancelled) {
            return;
        }
        close_with(stream, lane, backend, round, Problem::model(what, &error));
    }

    fn fail_with(
        &self,
        stream: &Arc<StreamCore<E::Prompt>>,
        backend: &mut dyn CaptionBackend<E::Prompt>,
        round: &mut Round<E::Prompt>,
        problem: Problem,
    ) {
        let mut lane = lock(&stream.lane);
        close_with(stream, &mut lane, backend, round, problem);
    }
}

/// The stream's caption leaves its backend and what waited for it is dropped.
fn drop_work<P>(lane: &mut Lane<P>, backend: &mut dyn CaptionBackend<P>, round: &mut Round<P>) {
    if let Some(flight) = lane.in_flight.take() {
        match lane.own.as_mut() {
            Some(own) => own.abandon(flight.id),
            None => backend.abandon(flight.id),
        }
        round.captions.remove(&flight.id);
    }
    lane.deferred.clear();
}

/// A failure the stream cannot go on after: reported once, its work dropped, its queue
/// closed. Other streams are not touched.
fn close_with<P>(
    stream: &Arc<StreamCore<P>>,
    lane: &mut Lane<P>,
    backend: &mut dyn CaptionBackend<P>,
    round: &mut Round<P>,
    problem: Problem,
) {
    drop_work(lane, backend, round);
    stream.inbox.close();
    send_error(stream, problem);
}

/// Reports `problem` unless the stream left, then lets nothing more out.
fn send_error<P>(stream: &StreamCore<P>, problem: Problem) {
    if !stream.cancelled() {
        send(stream, |o| o.error(problem));
    }
    stream.gate.close(false);
}

/// Calls the stream's output unless it left.
fn send<P>(stream: &StreamCore<P>, call: impl FnOnce(&dyn CaptionOutput)) {
    if let Some(_open) = stream.gate.enter() {
        call(&*stream.output);
    }
}

/// A stream's output behind its gate, for the stream's logic (its warnings).
struct Gated<'a, P>(&'a StreamCore<P>);

impl<P: Send + Sync> CaptionOutput for Gated<'_, P> {
    fn frame_encoded(&self, epoch: u64, batch: usize) {
        send(self.0, |o| o.frame_encoded(epoch, batch));
    }
    fn caption(&self, event: super::stream::CaptionEvent) {
        send(self.0, |o| o.caption(event));
    }
    fn idle_until(&self, epoch: u64, until: u64) {
        send(self.0, |o| o.idle_until(epoch, until));
    }
    fn eos(&self, epoch: u64) {
        send(self.0, |o| o.eos(epoch));
    }
    fn warning(&self, problem: Problem) {
        send(self.0, |o| o.warning(problem));
    }
    fn error(&self, problem: Problem) {
        send(self.0, |o| o.error(problem));
    }
    fn info(&self, message: String) {
        send(self.0, |o| o.info(message));
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
