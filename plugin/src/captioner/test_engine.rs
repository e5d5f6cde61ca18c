//! Test doubles of the model and of an element's output, for the worker's and the scheduler's
//! tests (compiled for tests only).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::engine::CaptionEngine;
use super::frame::OwnedFrame;
use super::job::{FrameJob, Job};
use super::stream::{CaptionEvent, CaptionOutput, Problem};
use crate::model::preprocess::{FrameView, PixelFormat, YuvToRgb};
use crate::model::{Cancel, GenerationParams, ModelError, Result};

pub const MS: u64 = 1_000_000;

/// Test double of the model: a frame's token is the red value of its first pixel (its tag), a
/// caption lists the tags it saw after the question (`"q: 0,1,2"`).
///
/// `panic_on_caption` simulates a bug inside the model; `fit` is how many frames its context
/// holds; questions containing `refuse` cannot be prepared; a frame tagged `fail_on_frame`
/// fails with a candle error carrying a backtrace; `encode_layers` and `step_layers` make each
/// encode or step that many 1 ms "layers", checking `cancel` before each; a caption takes
/// `caption_steps` steps, or `slow_steps` when its question contains "slow". The tags of every
/// encode batch and the size of every step are recorded; `pause` holds every model call at its
/// start until `resume`.
pub struct ScriptedEngine {
    pub panic_on_caption: bool,
    pub fit: usize,
    pub refuse: Option<&'static str>,
    pub fail_on_frame: Option<u8>,
    pub encode_layers: usize,
    pub step_layers: usize,
    pub caption_steps: usize,
    pub slow_steps: usize,
    pub encode_batches: Mutex<Vec<Vec<u8>>>,
    pub step_batches: Mutex<Vec<usize>>,
    pub paused: Mutex<bool>,
    pub resumed: Condvar,
    /// How many encodes or steps run at this moment (must never exceed 1: one model thread).
    pub running: AtomicUsize,
    /// How many model calls `pause` holds at this moment.
    pub held: AtomicUsize,
}

impl ScriptedEngine {
    pub fn healthy() -> Self {
        Self {
            panic_on_caption: false,
            fit: usize::MAX,
            refuse: None,
            fail_on_frame: None,
            encode_layers: 0,
            step_layers: 0,
            caption_steps: 1,
            slow_steps: 1,
            encode_batches: Mutex::new(Vec::new()),
            step_batches: Mutex::new(Vec::new()),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            running: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        }
    }

    fn layers(&self, n: usize, cancel: Cancel) -> Result<()> {
        for _ in 0..n {
            if cancel.is_cancelled() {
                return Err(ModelError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Holds model calls at their start (one that started goes on).
    pub fn pause(&self) {
        *self.paused.lock().unwrap() = true;
    }

    pub fn resume(&self) {
        *self.paused.lock().unwrap() = false;
        self.resumed.notify_all();
    }

    /// Sizes of the encode batches so far.
    pub fn encode_sizes(&self) -> Vec<usize> {
        self.encode_batches
            .lock()
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect()
    }

    pub fn step_sizes(&self) -> Vec<usize> {
        self.step_batches.lock().unwrap().clone()
    }

    /// Waits (up to 5 s) until `done` holds of the engine.
    pub fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn enter(&self) -> Running<'_> {
        let mut paused = self.paused.lock().unwrap();
        if *paused {
            self.held.fetch_add(1, Ordering::SeqCst);
            while *paused {
                paused = self.resumed.wait(paused).unwrap();
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        drop(paused);
        let before = self.running.fetch_add(1, Ordering::SeqCst);
        assert_eq!(before, 0, "two model calls at once");
        Running(&self.running)
    }
}

struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct ScriptedSequence {
    text: String,
    steps_left: usize,
    panic: bool,
}

impl CaptionEngine for ScriptedEngine {
    type Prompt = String;
    type Sequence = ScriptedSequence;

    fn prepare(&self, question: &str) -> Result<String> {
        if self.refuse.is_some_and(|r| question.contains(r)) {
            return Err(ModelError::InvalidInput(format!("cannot ask {question:?}")));
        }
        Ok(question.to_owned())
    }

    fn frames_that_fit(&self, _prompt: &String, _max_new_tokens: usize) -> usize {
        self.fit
    }

    fn encode_batch(
        &self,
        frames: &[(FrameView<'_>, &String)],
        cancel: Cancel,
    ) -> Vec<Result<Tensor>> {
        let _running = self.enter();
        let tags = frames.iter().map(|(f, _)| f.planes[0][0]).collect();
        self.encode_batches.lock().unwrap().push(tags);
        if let Err(e) = self.layers(self.encode_layers, cancel) {
            return frames.iter().map(|_| Err(clone_error(&e))).collect();
        }
        frames
            .iter()
            .map(|(frame, _)| {
                let tag = frame.planes[0][0];
                if self.fail_on_frame == Some(tag) {
                    return Err(ModelError::Tensor(candle_core::Error::WithBacktrace {
                        inner: Box::new(candle_core::Error::Msg("matmul shape mismatch".into())),
                        backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
                    }));
                }
                Ok(Tensor::full(tag as f32, (2, 1), &Device::Cpu)?)
            })
            .collect()
    }

    fn start_sequence(
        &self,
        tokens: &Tensor,
        prompt: &String,
        _params: &GenerationParams,
    ) -> Result<ScriptedSequence> {
        let values: Vec<f32> = tokens.flatten_all()?.to_vec1()?;
        let frames: Vec<String> = values.iter().step_by(2).map(|v| v.to_string()).collect();
        let steps = if prompt.contains("slow") {
            self.slow_steps
        } else {
            self.caption_steps
        };
        Ok(ScriptedSequence {
            text: format!("{prompt}: {}", frames.join(",")),
            steps_left: steps.max(1),
            panic: self.panic_on_caption,
        })
    }

    fn step(
        &self,
        sequences: &mut [&mut ScriptedSequence],
        cancel: Cancel,
    ) -> Result<Vec<Option<String>>> {
        let _running = self.enter();
        self.step_batches.lock().unwrap().push(sequences.len());
        self.layers(self.step_layers, cancel)?;
        Ok(sequences
            .iter_mut()
            .map(|seq| {
                assert!(!seq.panic, "model exploded");
                seq.steps_left -= 1;
                (seq.steps_left == 0).then(|| seq.text.clone())
            })
            .collect())
    }
}

fn clone_error(e: &ModelError) -> ModelError {
    match e {
        ModelError::Cancelled => ModelError::Cancelled,
        other => ModelError::InvalidInput(other.to_string()),
    }
}

/// What an output received, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// (text, start ms, end ms, frames, is_final)
    Caption(String, u64, u64, u32, bool),
    Idle(u64),
    Eos,
    Warning(String),
    Error(Problem),
}

/// A recording [`CaptionOutput`]: events to a channel, encoded frames and caption batch sizes
/// counted.
pub struct RecordingOutput {
    pub events: Mutex<mpsc::Sender<Event>>,
    pub encoded: AtomicUsize,
    pub encoded_in_batches: AtomicUsize,
    pub caption_batches: Mutex<Vec<u32>>,
    /// (epoch, text) of every caption.
    pub caption_epochs: Mutex<Vec<(u64, String)>>,
    /// Set by a test once its stream detached: any later output is a bug.
    pub closed: AtomicBool,
    pub after_close: AtomicUsize,
}

impl RecordingOutput {
    pub fn new() -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel();
        (
            Self {
                events: Mutex::new(tx),
                encoded: AtomicUsize::new(0),
                encoded_in_batches: AtomicUsize::new(0),
                caption_batches: Mutex::new(Vec::new()),
                caption_epochs: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                after_close: AtomicUsize::new(0),
            },
            rx,
        )
    }

    fn send(&self, event: Event) {
        self.check_open();
        let _ = self.events.lock().unwrap().send(event);
    }

    /// Counts an output that came after `closed` was set (tests assert there is none).
    fn check_open(&self) {
        if self.closed.load(Ordering::SeqCst) {
            self.after_close.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl CaptionOutput for RecordingOutput {
    fn frame_encoded(&self, _epoch: u64, batch: usize) {
        self.check_open();
        self.encoded.fetch_add(1, Ordering::SeqCst);
        if batch > 1 {
            self.encoded_in_batches.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn caption(&self, e: CaptionEvent) {
        self.caption_batches.lock().unwrap().push(e.batch);
        let record = (e.epoch, e.text.clone());
        self.caption_epochs.lock().unwrap().push(record);
        self.send(Event::Caption(
            e.text,
            e.start / MS,
            e.end / MS,
            e.frames,
            e.is_final,
        ));
    }
    fn idle_until(&self, _epoch: u64, until: u64) {
        self.send(Event::Idle(until / MS));
    }
    fn eos(&self, _epoch: u64) {
        self.send(Event::Eos);
    }
    fn warning(&self, problem: Problem) {
        self.send(Event::Warning(problem.message));
    }
    fn error(&self, problem: Problem) {
        self.send(Event::Error(problem));
    }
}

/// A 1×1 RGB frame whose red value tags it.
pub fn frame(tag: u8) -> OwnedFrame {
    OwnedFrame {
        format: PixelFormat::Rgb,
        width: 1,
        height: 1,
        planes: vec![vec![tag, 0, 0]],
        strides: vec![3],
        yuv: YuvToRgb::default_for_height(1),
    }
}

/// The frame at `seconds` of running time (sampled once a second), tagged with it.
pub fn frame_job(epoch: u64, seconds: u64) -> Job {
    tagged_job(epoch, seconds, seconds as u8)
}

/// The frame at `seconds` of running time, tagged `tag`.
pub fn tagged_job(epoch: u64, seconds: u64, tag: u8) -> Job {
    Job::Frame {
        epoch,
        job: FrameJob {
            running_time: seconds * 1000 * MS,
            next_sample_due: (seconds + 1) * 1000 * MS,
            arrived: Instant::now(),
            frame: frame(tag),
        },
    }
}

/// The captions among `events`.
pub fn captions_of(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| matches!(e, Event::Caption(..)))
        .collect()
}

pub fn warnings_of(events: &[Event]) -> Vec<&String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w),
            _ => None,
        })
        .collect()
}
