//! One worker thread per stream, encoding one frame at a time and captioning one window at a
//! time: the design before the shared scheduler, kept as the baseline the `multi_stream`
//! benchmark compares the scheduler with (and for its tests). Elements use the scheduler.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::engine::CaptionEngine;
use super::job::Job;
use super::queue::{JobQueue, Pushed, QueuePolicy};
use super::stream::{
    CaptionOutput, CaptionRequest, CaptionSettings, Encoded, Problem, StreamLogic,
};
use crate::model::{Cancel, ModelError};
use crate::sync::lock;

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
    logic: StreamLogic<E::Prompt>,
}

impl Worker {
    /// Starts the worker thread. `capacity` is the number of frames that may wait for it.
    pub fn spawn<E: CaptionEngine>(
        engine: Arc<E>,
        settings: Arc<Mutex<CaptionSettings>>,
        output: Arc<dyn CaptionOutput>,
        capacity: usize,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(JobQueue::new(capacity));
        let cancel = Arc::new(AtomicBool::new(false));
        let logic = StreamLogic::new(lock(&settings).window_duration);
        let mut state = WorkerLoop {
            engine,
            settings,
            output,
            cancel: cancel.clone(),
            logic,
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

    /// Drops pending work and interrupts the model between layers.
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

impl<E: CaptionEngine> WorkerLoop<E> {
    fn run(&mut self, jobs: &JobQueue<Job>) {
        while let Some(job) = jobs.pop() {
            let what = job.what();
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.process(job)));
            let failure = match outcome {
                Ok(Ok(())) | Ok(Err(ModelError::Cancelled)) => None,
                Ok(Err(e)) => Some(Problem::model(what, &e)),
                Err(panic) => Some(Problem::panic(what, &*panic)),
            };
            if let Some(problem) = failure {
                self.output.error(problem);
                jobs.close();
                return;
            }
        }
    }

    fn process(&mut self, job: Job) -> crate::model::Result<()> {
        match job {
            Job::Reset { .. } => {
                self.logic.reset();
                self.cancel.store(false, Ordering::SeqCst);
                Ok(())
            }
            Job::Eos { epoch } => {
                let settings = lock(&self.settings).clone();
                let engine = &*self.engine;
                if let Some(request) =
                    self.logic
                        .final_caption(engine, &settings, epoch, &*self.output, || true)?
                {
                    self.caption(request)?;
                }
                self.output.eos(epoch);
                Ok(())
            }
            Job::Frame { epoch, job } => {
                let settings = lock(&self.settings).clone();
                let engine = &*self.engine;
                let prompt = self.logic.prompt(engine, &settings.prompt, &*self.output)?;
                let cancel = Cancel::on_flag(&self.cancel);
                let tokens = engine
                    .encode_batch(&[(job.frame.view(), &*prompt)], cancel)
                    .pop()
                    .expect("one result per frame")?;
                self.output.frame_encoded(epoch, 1);
                match self.logic.encoded(
                    engine,
                    &settings,
                    epoch,
                    job.timing(),
                    tokens,
                    &*self.output,
                    || true,
                )? {
                    Encoded::Due(request) => self.caption(request),
                    Encoded::Idle(until) => {
                        self.output.idle_until(epoch, until);
                        Ok(())
                    }
                }
            }
        }
    }

    /// Generates one caption to its end, alone.
    fn caption(&mut self, request: CaptionRequest<E::Prompt>) -> crate::model::Result<()> {
        let engine = &*self.engine;
        let cancel = Cancel::on_flag(&self.cancel);
        let mut sequence =
            engine.start_sequence(&request.tokens, &request.prompt, &request.params)?;
        let text = loop {
            if cancel.is_cancelled() {
                return Err(ModelError::Cancelled);
            }
            if let Some(text) = engine.step(&mut [&mut sequence], cancel)?.pop().flatten() {
                break text;
            }
        };
        self.output.caption(request.event(text, 1));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::captioner::test_engine::*;
    use crate::model::GenerationParams;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn settings(window_ms: u64, caption_ms: u64) -> Arc<Mutex<CaptionSettings>> {
        Arc::new(Mutex::new(CaptionSettings {
            prompt: "q".into(),
            params: GenerationParams::default(),
            window_duration: window_ms * MS,
            caption_interval: caption_ms * MS,
        }))
    }

    fn spawn(
        engine: ScriptedEngine,
        settings: Arc<Mutex<CaptionSettings>>,
    ) -> (Worker, mpsc::Receiver<Event>) {
        let (output, rx) = RecordingOutput::new();
        let worker = Worker::spawn(Arc::new(engine), settings, Arc::new(output), 8).unwrap();
        (worker, rx)
    }

    fn run(
        engine: ScriptedEngine,
        settings: Arc<Mutex<CaptionSettings>>,
        jobs: Vec<Job>,
    ) -> Vec<Event> {
        let (worker, rx) = spawn(engine, settings);
        for job in jobs {
            assert!(matches!(
                worker.submit(job, QueuePolicy::Block),
                Pushed::Queued
            ));
        }
        let mut events = Vec::new();
        while let Ok(event) = rx.recv_timeout(Duration::from_secs(5)) {
            let done = matches!(event, Event::Eos | Event::Error(_));
            events.push(event);
            if done {
                break;
            }
        }
        events
    }

    fn frames_then_eos(seconds: std::ops::Range<u64>) -> Vec<Job> {
        seconds
            .map(|t| frame_job(0, t))
            .chain([Job::Eos { epoch: 0 }])
            .collect()
    }

    #[test]
    fn captions_every_interval_and_once_more_at_eos() {
        let events = run(
            ScriptedEngine::healthy(),
            settings(60_000, 2000),
            frames_then_eos(0..5),
        );
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
        let events = run(
            ScriptedEngine::healthy(),
            settings(1500, 2000),
            frames_then_eos(0..4),
        );
        assert_eq!(
            captions_of(&events),
            vec![
                &Event::Caption("q: 1,2".into(), 1000, 2000, 2, false),
                &Event::Caption("q: 2,3".into(), 2000, 3000, 2, true),
            ]
        );
    }

    /// The next caption's text, skipping other events.
    fn next_caption(rx: &mpsc::Receiver<Event>) -> String {
        loop {
            if let Event::Caption(text, ..) = rx.recv_timeout(Duration::from_secs(5)).unwrap() {
                return text;
            }
        }
    }

    #[test]
    fn a_prompt_change_applies_to_the_next_caption() {
        let settings = settings(60_000, 1000);
        let (worker, rx) = spawn(ScriptedEngine::healthy(), settings.clone());
        worker.submit(frame_job(0, 0), QueuePolicy::Block);
        worker.submit(frame_job(0, 1), QueuePolicy::Block);
        let first = next_caption(&rx);
        settings.lock().unwrap().prompt = "new".into();
        worker.submit(frame_job(0, 2), QueuePolicy::Block);
        let second = next_caption(&rx);
        assert!(first.starts_with("q:"));
        assert!(second.starts_with("new:"), "got {second}");
    }

    #[test]
    fn a_panic_in_the_model_becomes_an_error_not_a_crash() {
        let engine = ScriptedEngine {
            panic_on_caption: true,
            ..ScriptedEngine::healthy()
        };
        let jobs = vec![frame_job(0, 0), frame_job(0, 5), Job::Eos { epoch: 0 }];
        let events = run(engine, settings(60_000, 1000), jobs);
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
            frame_job(0, 0),
            Job::Reset { epoch: 1 },
            frame_job(1, 3),
            Job::Eos { epoch: 1 },
        ];
        let events = run(ScriptedEngine::healthy(), settings(60_000, 1000), jobs);
        assert_eq!(
            captions_of(&events),
            vec![&Event::Caption("q: 3".into(), 3000, 3000, 1, true)]
        );
    }

    #[test]
    fn the_window_keeps_what_the_context_holds_and_says_so_once() {
        // Issue 9 item 1: a window longer than the context drops its oldest frames (with one
        // warning) instead of failing the caption.
        let engine = ScriptedEngine {
            fit: 3,
            ..ScriptedEngine::healthy()
        };
        let events = run(engine, settings(60_000, 2000), frames_then_eos(0..8));
        assert_eq!(
            captions_of(&events),
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
        // Issue 9 item 2 (the model side's safety net behind the element's validation).
        let settings = settings(60_000, 1000);
        let engine = ScriptedEngine {
            refuse: Some("<bad>"),
            ..ScriptedEngine::healthy()
        };
        let (worker, rx) = spawn(engine, settings.clone());
        worker.submit(frame_job(0, 0), QueuePolicy::Block);
        // The first frame is encoded with the first prompt.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(Event::Idle(1000))
        );
        settings.lock().unwrap().prompt = "a <bad> question".into();
        for t in 1..3 {
            worker.submit(frame_job(0, t), QueuePolicy::Block);
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
        let captions = captions_of(&events);
        assert!(!captions.is_empty());
        for caption in captions {
            let Event::Caption(text, ..) = caption else {
                unreachable!()
            };
            assert!(text.starts_with("q:"), "the previous prompt: {text}");
        }
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
            vec![frame_job(0, 0), frame_job(0, 1)],
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
        // Issue 9 item 10: a 1000-layer encode (1 s) is cut at the next layer boundary.
        let engine = ScriptedEngine {
            encode_layers: 1000,
            ..ScriptedEngine::healthy()
        };
        let (worker, _rx) = spawn(engine, settings(60_000, 1000));
        worker.submit(frame_job(0, 0), QueuePolicy::Block);
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
