//! The worker thread: the only place the model runs. It encodes each sampled frame into its
//! tokens, keeps the window, and captions it every `caption_interval` of running time.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::engine::CaptionEngine;
use super::frame::OwnedFrame;
use super::queue::{Droppable, JobQueue, Pushed, QueuePolicy};
use super::remote::{Collected, RemoteCaptions, Started};
use super::window::{TokenWindow, WindowEntry};
use crate::model::remote::RemoteLanguageModel;
use crate::model::{GenerationParams, ModelError};

/// What the worker reads before each job, so property changes apply while running.
#[derive(Debug, Clone)]
pub struct CaptionSettings {
    pub prompt: String,
    pub params: GenerationParams,
    pub window_duration: u64,
    pub caption_interval: u64,
}

#[derive(Debug)]
pub struct FrameJob {
    pub running_time: u64,
    /// The running time before which no other frame will be sampled: the text stream may
    /// advance to it when this frame brings no caption.
    pub next_sample_due: u64,
    pub arrived: Instant,
    pub frame: OwnedFrame,
}

/// Work for the worker, tagged with the element's flush epoch so that results of work
/// started before a flush are recognised and discarded.
#[derive(Debug)]
pub enum Job {
    Frame {
        epoch: u64,
        job: FrameJob,
    },
    /// Caption what is new, then report EOS.
    Eos {
        epoch: u64,
    },
    /// Forget the window and the caption schedule (after a flush).
    Reset {
        epoch: u64,
    },
}

impl Droppable for Job {
    fn droppable(&self) -> bool {
        matches!(self, Job::Frame { .. })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CaptionEvent {
    pub epoch: u64,
    pub text: String,
    /// Running time of the first and last frame in the captioned window.
    pub start: u64,
    pub end: u64,
    pub frames: u32,
    /// From the arrival of the window's last frame to the caption being ready.
    pub latency: Duration,
    /// Until the next caption is expected.
    pub duration: u64,
    pub prompt: String,
    pub is_final: bool,
}

/// Something to tell the person running the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// One line a user can act on.
    pub message: String,
    /// Details for the message's debug field (one line, no backtrace).
    pub debug: String,
    /// For the debug log only: a backtrace captured with the error.
    pub log: Option<String>,
}

impl Problem {
    /// The model failed while doing `what`.
    pub fn model(what: &str, error: &ModelError) -> Self {
        let summary = error.summary();
        Self {
            message: format!("The captioning model failed while {what}: {summary}"),
            debug: format!("{what}: {summary}"),
            log: error.backtrace().map(|b| format!("{what}: {summary}\n{b}")),
        }
    }
}

/// Where the worker's results go (the element, or a recorder in tests).
pub trait CaptionOutput: Send + Sync + 'static {
    fn frame_encoded(&self, epoch: u64);
    fn caption(&self, event: CaptionEvent);
    /// No caption will start before running time `until`.
    fn idle_until(&self, epoch: u64, until: u64);
    fn eos(&self, epoch: u64);
    /// Something the user should know; the stream goes on.
    fn warning(&self, problem: Problem);
    /// A failure the pipeline must stop for; the worker stops taking jobs.
    fn error(&self, problem: Problem);
    /// News worth a line (a language-model server that answers again).
    fn info(&self, _message: String) {}
}

/// Handle on the worker thread. Shared (`Arc`) between the threads that feed it: every method
/// takes `&self`, so a streaming thread blocked in `submit` never holds a lock that a flush or
/// a state change needs to release it.
pub struct Worker {
    queue: Arc<JobQueue<Job>>,
    cancel: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct WorkerLoop<E: CaptionEngine> {
    engine: Arc<E>,
    settings: Arc<Mutex<CaptionSettings>>,
    output: Arc<dyn CaptionOutput>,
    cancel: Arc<AtomicBool>,
    window: TokenWindow,
    prompt: Option<(String, E::Prompt)>,
    /// A question that could not be prepared (warned about once): the previous one stays.
    refused_prompt: Option<String>,
    /// The window was cut to the context's size at least once (warned about once).
    warned_cut: bool,
    next_caption: Option<u64>,
    /// The language model on a server, when the element has one (`llm-server`).
    remote: Option<RemoteCaptions>,
}

/// How often the worker looks for a server's reply while it has nothing else to do.
const REMOTE_POLL: Duration = Duration::from_millis(20);

impl Worker {
    /// Starts the worker thread. `capacity` is the number of frames that may wait for it.
    pub fn spawn<E: CaptionEngine>(
        engine: Arc<E>,
        settings: Arc<Mutex<CaptionSettings>>,
        output: Arc<dyn CaptionOutput>,
        capacity: usize,
    ) -> std::io::Result<Self> {
        Self::spawn_with_remote(engine, settings, output, capacity, None)
    }

    /// [`spawn`](Self::spawn) with the language model on a server: captions are requested
    /// from it while frames go on being encoded (see `captioner::remote`).
    pub fn spawn_with_remote<E: CaptionEngine>(
        engine: Arc<E>,
        settings: Arc<Mutex<CaptionSettings>>,
        output: Arc<dyn CaptionOutput>,
        capacity: usize,
        remote: Option<RemoteLanguageModel>,
    ) -> std::io::Result<Self> {
        let remote = remote
            .map(RemoteCaptions::new)
            .transpose()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let queue = Arc::new(JobQueue::new(capacity));
        let cancel = Arc::new(AtomicBool::new(false));
        let window = TokenWindow::new(lock(&settings).window_duration);
        let mut state = WorkerLoop {
            engine,
            settings,
            output,
            cancel: cancel.clone(),
            window,
            prompt: None,
            refused_prompt: None,
            warned_cut: false,
            next_caption: None,
            remote,
        };
        let jobs = queue.clone();
        let thread = std::thread::Builder::new()
            .name("llamavid-worker".into())
            .spawn(move || state.run(&jobs))?;
        Ok(Self {
            queue,
            cancel,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn submit(&self, job: Job, policy: QueuePolicy) -> Pushed<Job> {
        self.queue.push(job, policy)
    }

    /// Drops pending work and interrupts a caption being generated.
    pub fn flush_start(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.queue.set_flushing(true);
    }

    /// Accepts work again, starting from an empty window.
    pub fn flush_stop(&self, epoch: u64) {
        self.queue.set_flushing(false);
        self.queue.push(Job::Reset { epoch }, QueuePolicy::Block);
    }

    pub fn pending(&self) -> usize {
        self.queue.len()
    }
}

impl Worker {
    /// Cancels the current job, refuses new ones and waits for the thread to end.
    pub fn shutdown(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.queue.close();
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl<E: CaptionEngine> WorkerLoop<E> {
    /// The next job; with a server's reply awaited, `Some(None)` every [`REMOTE_POLL`] to
    /// look for it. `None` once the queue is closed.
    fn next_job(&self, jobs: &JobQueue<Job>) -> Option<Option<Job>> {
        if self.remote.as_ref().is_some_and(|r| r.in_flight()) {
            jobs.pop_timeout(REMOTE_POLL).ok()
        } else {
            jobs.pop().map(Some)
        }
    }

    fn run(&mut self, jobs: &JobQueue<Job>) {
        while let Some(job) = self.next_job(jobs) {
            let what = match &job {
                Some(Job::Frame { .. }) => "encoding a frame",
                Some(Job::Eos { .. }) => "captioning at the end of the stream",
                Some(Job::Reset { .. }) => "starting over after a flush",
                None => "waiting for the language-model server",
            };
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| match job {
                Some(job) => self.process(job).and_then(|()| self.collect_remote()),
                None => self.collect_remote(),
            }));
            let failure = match outcome {
                Ok(Ok(())) | Ok(Err(ModelError::Cancelled)) => None,
                Ok(Err(e)) => Some(Problem::model(what, &e)),
                Err(panic) => Some(Problem {
                    message: "Internal error in the captioning worker".to_owned(),
                    debug: format!("panic while {what}: {}", panic_message(&*panic)),
                    log: None,
                }),
            };
            if let Some(problem) = failure {
                self.output.error(problem);
                jobs.close();
                return;
            }
        }
    }

    /// The prepared prompt for `question`, prepared again when the question changed. A new
    /// question that cannot be prepared is refused with a warning and the previous one stays
    /// (the element validates prompts before they get here; this is the safety net).
    fn ensure_prompt(&mut self, question: &str) -> crate::model::Result<()> {
        let current = self.prompt.as_ref().is_some_and(|(q, _)| q == question);
        let refused = self.refused_prompt.as_deref() == Some(question);
        if !(current || refused && self.prompt.is_some()) {
            match self.engine.prepare(question) {
                Ok(prepared) => {
                    self.prompt = Some((question.to_owned(), prepared));
                    self.refused_prompt = None;
                }
                Err(e @ ModelError::Cancelled) => return Err(e),
                Err(e) if self.prompt.is_some() => {
                    self.refused_prompt = Some(question.to_owned());
                    self.output.warning(Problem {
                        message: format!(
                            "The new prompt cannot be used, the previous one stays: {}",
                            e.summary()
                        ),
                        debug: format!("refused prompt: {question:?}"),
                        log: None,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Bounds the window by what the language model's context holds beside the prompt and
    /// the caption, saying so once when that cuts frames the duration would have kept.
    fn fit_window(&mut self, max_new_tokens: usize) {
        let Some((_, prompt)) = &self.prompt else {
            return;
        };
        let fit = self.engine.frames_that_fit(prompt, max_new_tokens);
        self.window.set_max_frames(fit);
        if self.window.cut_to_fit() > 0 && !self.warned_cut {
            self.warned_cut = true;
            self.output.warning(Problem {
                message: format!(
                    "The caption window holds more frames than the language model's context: \
                     only the newest {} frames are captioned (lower `window-duration`, raise \
                     `sample-interval`, or lower `max-new-tokens`)",
                    fit.max(1)
                ),
                debug: format!(
                    "{fit} frames fit beside the prompt and max-new-tokens={max_new_tokens}; \
                     older frames leave the window early"
                ),
                log: None,
            });
        }
    }

    fn process(&mut self, job: Job) -> crate::model::Result<()> {
        match job {
            Job::Reset { .. } => {
                self.window.clear();
                self.next_caption = None;
                if let Some(remote) = self.remote.as_mut() {
                    remote.abandon();
                }
                self.cancel.store(false, Ordering::SeqCst);
                Ok(())
            }
            Job::Eos { epoch } => {
                // A caption still on the server comes out before the final one.
                self.drain_remote()?;
                if self.window.fresh() > 0 {
                    let settings = lock(&self.settings).clone();
                    self.caption(epoch, &settings, settings.caption_interval, true)?;
                    self.drain_remote()?;
                }
                self.output.eos(epoch);
                Ok(())
            }
            Job::Frame { epoch, job } => self.frame(epoch, job),
        }
    }

    fn frame(&mut self, epoch: u64, job: FrameJob) -> crate::model::Result<()> {
        let settings = lock(&self.settings).clone();
        self.window.set_duration(settings.window_duration);
        let view = job.frame.view();
        self.ensure_prompt(&settings.prompt)?;
        let prompt = &self.prompt.as_ref().expect("prepared").1;
        let tokens = self.engine.encode(&view, prompt, &self.cancel)?;
        self.window.push(WindowEntry {
            running_time: job.running_time,
            arrived: job.arrived,
            tokens,
        });
        self.fit_window(settings.params.max_new_tokens);
        self.output.frame_encoded(epoch);

        let interval = settings.caption_interval.max(1);
        let due = *self.next_caption.get_or_insert(job.running_time + interval);
        if job.running_time >= due {
            // Due times stay on their grid; the caption lasts until the next one is due.
            let mut next = due + interval;
            if next <= job.running_time {
                next = job.running_time + interval;
            }
            self.next_caption = Some(next);
            self.caption(epoch, &settings, next - job.running_time, false)?;
        } else {
            self.output.idle_until(epoch, job.next_sample_due);
        }
        Ok(())
    }

    /// Hands on what the server sent back, if anything came.
    fn collect_remote(&mut self) -> crate::model::Result<()> {
        let Some(remote) = self.remote.as_mut() else {
            return Ok(());
        };
        let collected = remote.poll(Duration::ZERO)?;
        self.deliver(collected)
    }

    /// Waits for the server's reply in flight (until cancelled).
    fn drain_remote(&mut self) -> crate::model::Result<()> {
        let Some(remote) = self.remote.as_mut() else {
            return Ok(());
        };
        let cancel = self.cancel.clone();
        let collected = remote.drain(|| cancel.load(Ordering::Relaxed))?;
        self.deliver(collected)
    }

    fn deliver(&mut self, collected: Vec<Collected>) -> crate::model::Result<()> {
        for item in collected {
            match item {
                Collected::Caption(mut event, completion) => {
                    event.text = self.engine.remote_text(completion)?;
                    self.output.caption(event);
                }
                Collected::Unavailable { error, first } => {
                    let url = self.remote.as_ref().map(|r| r.model().config().url.clone());
                    let message = format!(
                        "The language-model server {} cannot caption now; captions resume when \
                         it answers (retrying with backoff)",
                        url.unwrap_or_default()
                    );
                    if first {
                        self.output.warning(Problem {
                            message,
                            debug: error.to_string(),
                            log: None,
                        });
                    }
                }
                Collected::Recovered { failures } => self.output.info(format!(
                    "The language-model server answers again (after {failures} failed attempts)"
                )),
            }
        }
        Ok(())
    }

    fn caption(
        &mut self,
        epoch: u64,
        settings: &CaptionSettings,
        duration: u64,
        is_final: bool,
    ) -> crate::model::Result<()> {
        self.ensure_prompt(&settings.prompt)?;
        self.fit_window(settings.params.max_new_tokens);
        let Some(tokens) = self.window.tokens()? else {
            return Ok(());
        };
        let (first, last) = match (self.window.first(), self.window.last()) {
            (Some(first), Some(last)) => (first.running_time, (last.running_time, last.arrived)),
            _ => return Ok(()),
        };
        let frames = self.window.len() as u32;
        let (question, prompt) = self.prompt.as_ref().expect("prepared");
        if let Some(remote) = self.remote.as_mut() {
            let event = CaptionEvent {
                epoch,
                text: String::new(),
                start: first,
                end: last.0,
                frames,
                latency: Duration::ZERO,
                duration,
                prompt: question.clone(),
                is_final,
            };
            if remote.start_blocked() {
                // Late (the previous caption is still on the server) or backing off.
                return Ok(());
            }
            let input = self
                .engine
                .remote_input(&tokens, prompt, &settings.params)?;
            if remote.start(input, event, last.1)? == Started::Sent {
                self.window.mark_captioned();
            }
            return Ok(());
        }
        let text = self
            .engine
            .caption(&tokens, prompt, &settings.params, &self.cancel)?;
        let question = question.clone();
        self.window.mark_captioned();
        self.output.caption(CaptionEvent {
            epoch,
            text,
            start: first,
            end: last.0,
            frames,
            latency: last.1.elapsed(),
            duration,
            prompt: question,
            is_final,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::preprocess::{FrameView, PixelFormat, YuvToRgb};
    use candle_core::{Device, Tensor};
    use std::sync::mpsc;

    const MS: u64 = 1_000_000;

    /// Test double of the model: a frame's token is its running time in ms, a caption lists
    /// the tokens it saw. `panic_on_caption` simulates a bug inside the model; `fit` is how many
    /// frames its context holds; questions containing `refuse` cannot be prepared; a frame
    /// tagged `fail_on_frame` fails with a candle error carrying a backtrace; `encode_layers`
    /// makes each encode that many 10 ms "layers", checking `cancel` before each.
    struct ScriptedEngine {
        panic_on_caption: bool,
        fit: usize,
        refuse: Option<&'static str>,
        fail_on_frame: Option<u8>,
        encode_layers: usize,
    }

    impl CaptionEngine for ScriptedEngine {
        type Prompt = String;

        fn prepare(&self, question: &str) -> crate::model::Result<String> {
            if self.refuse.is_some_and(|r| question.contains(r)) {
                return Err(ModelError::InvalidInput(format!("cannot ask {question:?}")));
            }
            Ok(question.to_owned())
        }

        fn frames_that_fit(&self, _prompt: &String, _max_new_tokens: usize) -> usize {
            self.fit
        }

        fn encode(
            &self,
            frame: &FrameView,
            _prompt: &String,
            cancel: &AtomicBool,
        ) -> crate::model::Result<Tensor> {
            for _ in 0..self.encode_layers {
                if cancel.load(Ordering::SeqCst) {
                    return Err(ModelError::Cancelled);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let tag = frame.planes[0][0];
            if self.fail_on_frame == Some(tag) {
                return Err(ModelError::Tensor(candle_core::Error::WithBacktrace {
                    inner: Box::new(candle_core::Error::Msg("matmul shape mismatch".into())),
                    backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
                }));
            }
            Ok(Tensor::full(tag as f32, (2, 1), &Device::Cpu)?)
        }

        fn caption(
            &self,
            tokens: &Tensor,
            prompt: &String,
            _params: &GenerationParams,
            _cancel: &AtomicBool,
        ) -> crate::model::Result<String> {
            assert!(!self.panic_on_caption, "model exploded");
            let values: Vec<f32> = tokens.flatten_all()?.to_vec1()?;
            let frames: Vec<String> = values.iter().step_by(2).map(|v| v.to_string()).collect();
            Ok(format!("{prompt}: {}", frames.join(",")))
        }
    }

    impl ScriptedEngine {
        fn healthy() -> Self {
            Self {
                panic_on_caption: false,
                fit: usize::MAX,
                refuse: None,
                fail_on_frame: None,
                encode_layers: 0,
            }
        }
    }

    fn captions_of(events: &[Event]) -> Vec<&Event> {
        events
            .iter()
            .filter(|e| matches!(e, Event::Caption(..)))
            .collect()
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        Caption(String, u64, u64, u32, bool),
        Idle(u64),
        Eos,
        Warning(String),
        Error(Problem),
    }

    struct RecordingOutput(Mutex<mpsc::Sender<Event>>);

    impl CaptionOutput for RecordingOutput {
        fn frame_encoded(&self, _epoch: u64) {}
        fn caption(&self, e: CaptionEvent) {
            let event = Event::Caption(e.text, e.start / MS, e.end / MS, e.frames, e.is_final);
            self.0.lock().unwrap().send(event).unwrap();
        }
        fn idle_until(&self, _epoch: u64, until: u64) {
            self.0
                .lock()
                .unwrap()
                .send(Event::Idle(until / MS))
                .unwrap();
        }
        fn eos(&self, _epoch: u64) {
            self.0.lock().unwrap().send(Event::Eos).unwrap();
        }
        fn warning(&self, problem: Problem) {
            let event = Event::Warning(problem.message);
            self.0.lock().unwrap().send(event).unwrap();
        }
        fn error(&self, problem: Problem) {
            self.0.lock().unwrap().send(Event::Error(problem)).unwrap();
        }
    }

    fn settings(window_ms: u64, caption_ms: u64) -> Arc<Mutex<CaptionSettings>> {
        Arc::new(Mutex::new(CaptionSettings {
            prompt: "q".into(),
            params: GenerationParams::default(),
            window_duration: window_ms * MS,
            caption_interval: caption_ms * MS,
        }))
    }

    /// A 1×1 RGB frame whose red value tags it.
    fn frame(tag: u8) -> OwnedFrame {
        OwnedFrame {
            format: PixelFormat::Rgb,
            width: 1,
            height: 1,
            planes: vec![vec![tag, 0, 0]],
            strides: vec![3],
            yuv: YuvToRgb::default_for_height(1),
        }
    }

    fn run(
        engine: ScriptedEngine,
        settings: Arc<Mutex<CaptionSettings>>,
        jobs: Vec<Job>,
    ) -> Vec<Event> {
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn(
            Arc::new(engine),
            settings,
            Arc::new(RecordingOutput(Mutex::new(tx))),
            8,
        )
        .unwrap();
        for job in jobs {
            assert!(matches!(
                worker.submit(job, QueuePolicy::Block),
                Pushed::Queued
            ));
        }
        let mut events = Vec::new();
        while let Ok(event) = rx.recv_timeout(std::time::Duration::from_secs(5)) {
            let done = matches!(event, Event::Eos | Event::Error(_));
            events.push(event);
            if done {
                break;
            }
        }
        events
    }

    fn frame_job(seconds: u64) -> Job {
        Job::Frame {
            epoch: 0,
            job: FrameJob {
                running_time: seconds * 1000 * MS,
                next_sample_due: (seconds + 1) * 1000 * MS,
                arrived: Instant::now(),
                frame: frame(seconds as u8),
            },
        }
    }

    #[test]
    fn captions_every_interval_and_once_more_at_eos() {
        let jobs = (0..5)
            .map(frame_job)
            .chain([Job::Eos { epoch: 0 }])
            .collect();
        let events = run(ScriptedEngine::healthy(), settings(60_000, 2000), jobs);
        assert_eq!(
            events,
            vec![
                Event::Idle(1000),
                Event::Idle(2000),
                Event::Caption("q: 0,1,2".into(), 0, 2000, 3, false),
                Event::Idle(4000),
                Event::Caption("q: 0,1,2,3,4".into(), 0, 4000, 5, false),
                Event::Eos,
            ]
        );
    }

    #[test]
    fn final_caption_covers_frames_since_the_last_one_and_the_window_slides() {
        let jobs = (0..4)
            .map(frame_job)
            .chain([Job::Eos { epoch: 0 }])
            .collect();
        let events = run(ScriptedEngine::healthy(), settings(1500, 2000), jobs);
        let captions = captions_of(&events);
        assert_eq!(
            captions,
            vec![
                &Event::Caption("q: 1,2".into(), 1000, 2000, 2, false),
                &Event::Caption("q: 2,3".into(), 2000, 3000, 2, true),
            ]
        );
    }

    #[test]
    fn a_prompt_change_applies_to_the_next_caption() {
        let settings = settings(60_000, 1000);
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn(
            Arc::new(ScriptedEngine::healthy()),
            settings.clone(),
            Arc::new(RecordingOutput(Mutex::new(tx))),
            8,
        )
        .unwrap();
        worker.submit(frame_job(0), QueuePolicy::Block);
        worker.submit(frame_job(1), QueuePolicy::Block);
        let first = loop {
            if let Event::Caption(text, ..) =
                rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap()
            {
                break text;
            }
        };
        settings.lock().unwrap().prompt = "new".into();
        worker.submit(frame_job(2), QueuePolicy::Block);
        let second = loop {
            if let Event::Caption(text, ..) =
                rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap()
            {
                break text;
            }
        };
        assert!(first.starts_with("q:"));
        assert!(second.starts_with("new:"), "got {second}");
    }

    #[test]
    fn a_panic_in_the_model_becomes_an_error_not_a_crash() {
        let jobs = vec![frame_job(0), frame_job(5), Job::Eos { epoch: 0 }];
        let events = run(
            ScriptedEngine {
                panic_on_caption: true,
                ..ScriptedEngine::healthy()
            },
            settings(60_000, 1000),
            jobs,
        );
        match events.last() {
            Some(Event::Error(problem)) => {
                assert!(problem.debug.contains("model exploded"), "{problem:?}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn reset_forgets_the_window() {
        let jobs = vec![
            frame_job(0),
            Job::Reset { epoch: 1 },
            frame_job(3),
            Job::Eos { epoch: 1 },
        ];
        let events = run(ScriptedEngine::healthy(), settings(60_000, 1000), jobs);
        let captions = captions_of(&events);
        assert_eq!(
            captions,
            vec![&Event::Caption("q: 3".into(), 3000, 3000, 1, true)]
        );
    }

    fn warnings_of(events: &[Event]) -> Vec<&String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Warning(w) => Some(w),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_window_keeps_what_the_context_holds_and_says_so_once() {
        // Issue 9 item 1: a window longer than the context drops its oldest frames (with one
        // warning) instead of failing the caption.
        let engine = ScriptedEngine {
            fit: 3,
            ..ScriptedEngine::healthy()
        };
        let jobs = (0..8)
            .map(frame_job)
            .chain([Job::Eos { epoch: 0 }])
            .collect();
        let events = run(engine, settings(60_000, 2000), jobs);
        let captions = captions_of(&events);
        assert_eq!(
            captions,
            vec![
                &Event::Caption("q: 0,1,2".into(), 0, 2000, 3, false),
                &Event::Caption("q: 2,3,4".into(), 2000, 4000, 3, false),
                &Event::Caption("q: 4,5,6".into(), 4000, 6000, 3, false),
                &Event::Caption("q: 5,6,7".into(), 5000, 7000, 3, true),
            ]
        );
        let warnings = warnings_of(&events);
        assert_eq!(warnings.len(), 1, "{events:?}");
        assert!(warnings[0].contains("newest 3 frames"), "{warnings:?}");
    }

    #[test]
    fn an_unusable_new_prompt_is_refused_and_the_previous_one_stays() {
        // Issue 9 item 2 (the worker's safety net behind the element's validation).
        let settings = settings(60_000, 1000);
        let (tx, rx) = mpsc::channel();
        let engine = ScriptedEngine {
            refuse: Some("<bad>"),
            ..ScriptedEngine::healthy()
        };
        let worker = Worker::spawn(
            Arc::new(engine),
            settings.clone(),
            Arc::new(RecordingOutput(Mutex::new(tx))),
            8,
        )
        .unwrap();
        worker.submit(frame_job(0), QueuePolicy::Block);
        // The first frame is encoded with the first prompt.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(Event::Idle(1000))
        );
        settings.lock().unwrap().prompt = "a <bad> question".into();
        for t in 1..3 {
            worker.submit(frame_job(t), QueuePolicy::Block);
        }
        worker.submit(Job::Eos { epoch: 0 }, QueuePolicy::Block);
        let events: Vec<Event> = std::iter::from_fn(|| {
            rx.recv_timeout(Duration::from_secs(5))
                .ok()
                .filter(|e| *e != Event::Eos)
        })
        .collect();
        let warnings = warnings_of(&events);
        assert_eq!(
            warnings.len(),
            1,
            "one warning per refused prompt: {events:?}"
        );
        assert!(warnings[0].contains("previous one stays"), "{warnings:?}");
        for caption in captions_of(&events) {
            let Event::Caption(text, ..) = caption else {
                unreachable!()
            };
            assert!(text.starts_with("q:"), "the previous prompt: {text}");
        }
        assert!(!captions_of(&events).is_empty());
        assert!(!events.iter().any(|e| matches!(e, Event::Error(_))));
    }

    #[test]
    fn a_model_error_is_reported_in_one_line_with_the_backtrace_kept_for_the_log() {
        // Issue 9 item 3: candle's backtrace never reaches the message or its debug details.
        let engine = ScriptedEngine {
            fail_on_frame: Some(1),
            ..ScriptedEngine::healthy()
        };
        let events = run(
            engine,
            settings(60_000, 5000),
            vec![frame_job(0), frame_job(1)],
        );
        let Some(Event::Error(problem)) = events.last() else {
            panic!("expected an error: {events:?}");
        };
        assert_eq!(
            problem.message,
            "The captioning model failed while encoding a frame: matmul shape mismatch"
        );
        assert!(!problem.debug.contains('\n'), "{:?}", problem.debug);
        let log = problem
            .log
            .as_deref()
            .expect("the backtrace, for the debug log");
        assert!(log.lines().count() > 2, "{log}");
    }

    #[test]
    fn shutdown_interrupts_an_encode_within_one_layer() {
        // Issue 9 item 10: a 100-layer encode (1 s) is cut at the next layer boundary.
        let engine = ScriptedEngine {
            encode_layers: 100,
            ..ScriptedEngine::healthy()
        };
        let (tx, _rx) = mpsc::channel();
        let worker = Worker::spawn(
            Arc::new(engine),
            settings(60_000, 1000),
            Arc::new(RecordingOutput(Mutex::new(tx))),
            8,
        )
        .unwrap();
        worker.submit(frame_job(0), QueuePolicy::Block);
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        worker.shutdown();
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(300),
            "shutdown waited {took:?} for the encode"
        );
    }
}
