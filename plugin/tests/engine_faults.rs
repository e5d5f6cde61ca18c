//! Faults injected around the real model (issue 13): the scheduler runs the fixture's LLaMA-VID
//! through [`FaultInjectingEngine`], a test double that passes every call to the model and,
//! when told, makes an encode or a caption step fail, panic or take ten times as long. What a
//! user of the element would see is checked on the scheduler's outputs (the element only
//! forwards them: an output's `error` becomes the element error, its captions the text):
//!
//! * a frame that fails or panics fails its own stream alone; the other stream sharing the
//!   model captions on, with the texts it gets without any fault;
//! * a caption step that fails or panics fails the captions in that step; the scheduler goes on
//!   and captions the next stream normally once the fault clears;
//! * a model ten times slower never holds up a live stream's submissions (the thread that
//!   pushes video): its oldest waiting frames are replaced, and captions come again at the
//!   usual pace when it recovers.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use common::model_dir;
use gstllamavid::captioner::{
    BatchLimits, CaptionEngine, CaptionEvent, CaptionOutput, CaptionSettings, FrameJob, Job,
    OwnedFrame, Problem, Pushed, QueuePolicy, Scheduler, StreamHandle,
};
use gstllamavid::model::preprocess::{FrameView, PixelFormat, YuvToRgb};
use gstllamavid::model::{
    Cancel, GenerationParams, LlamaVid, LoadOptions, ModelError, Result, WeightFormat,
};

const MS: u64 = 1_000_000;
const WAIT: Duration = Duration::from_secs(60);

/// The first byte of a frame that makes its encode fail, or panic.
const FAILING_FRAME: u8 = 201;
const PANICKING_FRAME: u8 = 202;

fn model() -> Arc<LlamaVid> {
    static MODEL: OnceLock<Arc<LlamaVid>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let mut options = LoadOptions::new(model_dir());
            options.weight_format = WeightFormat::Pickle;
            Arc::new(LlamaVid::load(&options).expect("fixture model loads"))
        })
        .clone()
}

/// What the next caption steps do.
#[derive(Clone, Copy, Debug, PartialEq)]
enum StepFault {
    None,
    Fail,
    Panic,
}

/// Test double: the real model, with faults on demand.
struct FaultInjectingEngine {
    model: Arc<LlamaVid>,
    step_fault: Mutex<StepFault>,
    /// Extra time per call, as a multiple of the call's own duration (0: none).
    slowdown: AtomicU32,
    /// Encode calls that held a bad frame beside other frames.
    shared_bad_batches: AtomicU32,
}

impl FaultInjectingEngine {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            model: model(),
            step_fault: Mutex::new(StepFault::None),
            slowdown: AtomicU32::new(0),
            shared_bad_batches: AtomicU32::new(0),
        })
    }

    fn set_step_fault(&self, fault: StepFault) {
        *self.step_fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Runs `call`, then waits `slowdown` times as long again.
    fn timed<T>(&self, call: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = call();
        let factor = self.slowdown.load(Ordering::SeqCst);
        std::thread::sleep(t0.elapsed() * factor);
        out
    }
}

impl CaptionEngine for FaultInjectingEngine {
    type Prompt = <LlamaVid as CaptionEngine>::Prompt;
    type Sequence = <LlamaVid as CaptionEngine>::Sequence;

    fn prepare(&self, question: &str) -> Result<Self::Prompt> {
        <LlamaVid as CaptionEngine>::prepare(&self.model, question)
    }

    fn frames_that_fit(&self, prompt: &Self::Prompt, max_new_tokens: usize) -> usize {
        <LlamaVid as CaptionEngine>::frames_that_fit(&self.model, prompt, max_new_tokens)
    }

    fn encode_batch(
        &self,
        frames: &[(FrameView<'_>, &Self::Prompt)],
        cancel: Cancel,
    ) -> Vec<Result<Tensor>> {
        let tag = |f: &FrameView<'_>| f.planes[0][0];
        let bad = |f: &FrameView<'_>| matches!(tag(f), FAILING_FRAME | PANICKING_FRAME);
        if frames.len() > 1 && frames.iter().any(|(f, _)| bad(f)) {
            self.shared_bad_batches.fetch_add(1, Ordering::SeqCst);
        }
        if frames.iter().any(|(f, _)| tag(f) == PANICKING_FRAME) {
            panic!("injected panic while encoding");
        }
        let encoded =
            self.timed(|| <LlamaVid as CaptionEngine>::encode_batch(&self.model, frames, cancel));
        encoded
            .into_iter()
            .zip(frames)
            .map(|(result, (frame, _))| match tag(frame) {
                FAILING_FRAME => Err(ModelError::InvalidInput("injected encode failure".into())),
                _ => result,
            })
            .collect()
    }

    fn start_sequence(
        &self,
        tokens: &Tensor,
        prompt: &Self::Prompt,
        params: &GenerationParams,
    ) -> Result<Self::Sequence> {
        <LlamaVid as CaptionEngine>::start_sequence(&self.model, tokens, prompt, params)
    }

    fn step(
        &self,
        sequences: &mut [&mut Self::Sequence],
        cancel: Cancel,
    ) -> Result<Vec<Option<String>>> {
        // Copied out first: a panic below must not poison the lock for the next step.
        let fault = *self.step_fault.lock().unwrap_or_else(|e| e.into_inner());
        match fault {
            StepFault::None => {}
            StepFault::Fail => {
                return Err(ModelError::InvalidInput("injected caption failure".into()))
            }
            StepFault::Panic => panic!("injected panic while decoding"),
        }
        self.timed(|| <LlamaVid as CaptionEngine>::step(&self.model, sequences, cancel))
    }
}

#[derive(Debug)]
enum Event {
    Caption(String),
    Error(String),
    Eos,
}

/// The scheduler's outputs for one stream, as the element would forward them.
struct Recorder(Mutex<mpsc::Sender<Event>>);

impl CaptionOutput for Recorder {
    fn frame_encoded(&self, _epoch: u64, _batch: usize) {}
    fn caption(&self, event: CaptionEvent) {
        let _ = self.0.lock().unwrap().send(Event::Caption(event.text));
    }
    fn idle_until(&self, _epoch: u64, _until: u64) {}
    fn eos(&self, _epoch: u64) {
        let _ = self.0.lock().unwrap().send(Event::Eos);
    }
    fn warning(&self, _problem: Problem) {}
    fn error(&self, problem: Problem) {
        let _ = self.0.lock().unwrap().send(Event::Error(problem.message));
    }
}

/// One element's side of a stream: a caption each second of video, greedy, 8 tokens.
struct Cam {
    handle: StreamHandle<FaultInjectingEngine>,
    rx: Mutex<mpsc::Receiver<Event>>,
}

impl Cam {
    fn new(scheduler: &Scheduler<FaultInjectingEngine>) -> Self {
        Self::with_queue(scheduler, 16)
    }

    /// A stream whose queue holds `capacity` waiting frames (the element's is small).
    fn with_queue(scheduler: &Scheduler<FaultInjectingEngine>, capacity: usize) -> Self {
        let settings = Arc::new(Mutex::new(CaptionSettings {
            prompt: "What is happening?".into(),
            params: GenerationParams {
                max_new_tokens: 8,
                ..GenerationParams::default()
            },
            window_duration: 60_000 * MS,
            caption_interval: 1000 * MS,
        }));
        let (tx, rx) = mpsc::channel();
        let handle = scheduler.attach(settings, Arc::new(Recorder(Mutex::new(tx))), capacity);
        Self {
            handle,
            rx: Mutex::new(rx),
        }
    }

    fn submit(&self, job: Job, policy: QueuePolicy) -> Pushed<Job> {
        self.handle.submit(job, policy)
    }

    /// Frames at 0..n seconds (tag = the second, or `tags` where given), then EOS.
    fn play(&self, seconds: u64, tag: impl Fn(u64) -> u8) {
        for s in 0..seconds {
            let queued = self.submit(frame_job(s, tag(s)), QueuePolicy::Block);
            if !matches!(queued, Pushed::Queued) {
                return; // The stream failed: it takes nothing more.
            }
        }
        let _ = self.submit(Job::Eos { epoch: 0 }, QueuePolicy::Block);
    }

    /// Events until EOS or an error.
    fn until_end(&self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let event = self
                .rx
                .lock()
                .unwrap()
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("nothing ended the stream within {WAIT:?}: {events:?}"));
            let done = matches!(event, Event::Eos | Event::Error(_));
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

fn frame(tag: u8) -> OwnedFrame {
    let (width, height) = (32, 24);
    let mut data: Vec<u8> = (0..width * height * 3)
        .map(|i| (i as u8).wrapping_mul(tag | 1))
        .collect();
    data[0] = tag;
    OwnedFrame {
        format: PixelFormat::Rgb,
        width,
        height,
        planes: vec![data],
        strides: vec![width * 3],
        yuv: YuvToRgb::default_for_height(height),
    }
}

fn frame_job(seconds: u64, tag: u8) -> Job {
    Job::Frame {
        epoch: 0,
        job: FrameJob {
            running_time: seconds * 1000 * MS,
            next_sample_due: (seconds + 1) * 1000 * MS,
            arrived: Instant::now(),
            frame: frame(tag),
        },
    }
}

fn captions(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Caption(text) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn scheduler(engine: &Arc<FaultInjectingEngine>) -> Scheduler<FaultInjectingEngine> {
    Scheduler::spawn(
        engine.clone(),
        BatchLimits {
            encode: 4,
            caption: 4,
        },
    )
    .unwrap()
}

/// The captions of 4 s of the healthy stream, with no fault anywhere.
fn healthy_captions() -> Vec<String> {
    let engine = FaultInjectingEngine::new();
    let scheduler = scheduler(&engine);
    let cam = Cam::new(&scheduler);
    cam.play(4, |s| s as u8);
    let events = cam.until_end();
    assert!(matches!(events.last(), Some(Event::Eos)), "{events:?}");
    captions(&events).iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_frame_that_fails_or_panics_fails_its_stream_alone() {
    let expected = healthy_captions();
    assert!(expected.len() >= 3, "{expected:?}");
    for bad in [FAILING_FRAME, PANICKING_FRAME] {
        let engine = FaultInjectingEngine::new();
        let scheduler = scheduler(&engine);
        let (faulty, healthy) = (Cam::new(&scheduler), Cam::new(&scheduler));
        // A third stream's frame keeps the model busy (slowed down) while both streams queue
        // all their frames, so that the next encodes take one frame of each together.
        let blocker = Cam::new(&scheduler);
        engine.slowdown.store(300, Ordering::SeqCst);
        blocker.submit(frame_job(0, 7), QueuePolicy::Block);
        std::thread::sleep(Duration::from_millis(20));
        faulty.play(4, |sec| if sec == 2 { bad } else { 100 + sec as u8 });
        healthy.play(4, |sec| sec as u8);
        engine.slowdown.store(0, Ordering::SeqCst);
        blocker.submit(Job::Eos { epoch: 0 }, QueuePolicy::Block);
        let events = faulty.until_end();
        let Some(Event::Error(message)) = events.last() else {
            panic!("frame {bad}: the faulty stream gets an error: {events:?}");
        };
        assert!(!message.contains('\n'), "one line: {message}");
        let events = healthy.until_end();
        assert!(
            matches!(events.last(), Some(Event::Eos)),
            "frame {bad}: {events:?}"
        );
        // Even when the bad frame shared an encode batch with a healthy one (a panic takes
        // the whole call: the scheduler encodes that batch's frames again one by one).
        assert_eq!(
            captions(&events),
            expected,
            "frame {bad}: the healthy stream captions as if alone"
        );
        assert!(
            engine.shared_bad_batches.load(Ordering::SeqCst) >= 1,
            "frame {bad}: the bad frame never shared an encode batch"
        );
    }
}

#[test]
fn a_caption_step_that_fails_or_panics_fails_its_captions_and_the_next_stream_captions() {
    let expected = healthy_captions();
    for fault in [StepFault::Fail, StepFault::Panic] {
        let engine = FaultInjectingEngine::new();
        let scheduler = scheduler(&engine);
        engine.set_step_fault(fault);
        let first = Cam::new(&scheduler);
        first.play(4, |s| s as u8);
        let events = first.until_end();
        assert!(
            matches!(events.last(), Some(Event::Error(_))),
            "{fault:?}: the captioning stream gets an error: {events:?}"
        );
        // The fault clears; a stream attached now captions as if nothing had happened.
        engine.set_step_fault(StepFault::None);
        let next = Cam::new(&scheduler);
        next.play(4, |s| s as u8);
        let events = next.until_end();
        assert!(
            matches!(events.last(), Some(Event::Eos)),
            "{fault:?}: {events:?}"
        );
        assert_eq!(captions(&events), expected, "{fault:?}");
    }
}

#[test]
fn a_model_ten_times_slower_never_holds_up_a_live_stream_and_recovers() {
    let engine = FaultInjectingEngine::new();
    let scheduler = scheduler(&engine);
    let cam = Cam::with_queue(&scheduler, 2);
    engine.slowdown.store(10, Ordering::SeqCst);
    // 20 s of live video pushed faster than the slow model encodes.
    let (mut slowest, mut replaced) = (Duration::ZERO, 0);
    for s in 0..20 {
        let t0 = Instant::now();
        match cam.submit(frame_job(s, s as u8), QueuePolicy::DropOldest) {
            Pushed::Queued => {}
            Pushed::Replaced(_) => replaced += 1,
            Pushed::Refused(_) => panic!("a live stream's frame was refused"),
        }
        slowest = slowest.max(t0.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a submission waited {slowest:?} for the slow model"
    );
    assert!(replaced > 0, "the slow model made no frame wait");
    // Recovered: captions come again.
    engine.slowdown.store(0, Ordering::SeqCst);
    for s in 20..24 {
        let _ = cam.submit(frame_job(s, s as u8), QueuePolicy::DropOldest);
    }
    let _ = cam.submit(Job::Eos { epoch: 0 }, QueuePolicy::DropOldest);
    let events = cam.until_end();
    assert!(matches!(events.last(), Some(Event::Eos)), "{events:?}");
    assert!(!captions(&events).is_empty(), "{events:?}");
    println!(
        "slow model: slowest submission {slowest:?}, {replaced} of 20 frames replaced, \
         {} captions after it recovered",
        captions(&events).len()
    );
}
