//! The scheduler with a scripted engine: batching happens (recorded batch sizes and members),
//! captions join and leave a running batch, one stream's flush, departure or error touches
//! only that stream, a greedy stream does not starve others, and hundreds of random
//! interleavings of streams coming, going, flushing and ending never deadlock, never let an
//! output through after its stream left and never mix epochs.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::captioner::test_engine::*;
use crate::model::GenerationParams;

const WAIT: Duration = Duration::from_secs(5);

fn settings(prompt: &str, window_ms: u64, caption_ms: u64) -> Arc<Mutex<CaptionSettings>> {
    Arc::new(Mutex::new(CaptionSettings {
        prompt: prompt.into(),
        params: GenerationParams::default(),
        window_duration: window_ms * MS,
        caption_interval: caption_ms * MS,
    }))
}

/// One element's side of a stream, as the tests drive it.
struct Cam {
    handle: StreamHandle<ScriptedEngine>,
    output: Arc<RecordingOutput>,
    rx: mpsc::Receiver<Event>,
    settings: Arc<Mutex<CaptionSettings>>,
}

impl Cam {
    fn new(scheduler: &Scheduler<ScriptedEngine>, prompt: &str, caption_ms: u64) -> Self {
        let settings = settings(prompt, 60_000, caption_ms);
        let (output, rx) = RecordingOutput::new();
        let output = Arc::new(output);
        let handle = scheduler.attach(settings.clone(), output.clone(), 16);
        Self {
            handle,
            output,
            rx,
            settings,
        }
    }

    fn submit(&self, job: Job) {
        assert!(matches!(
            self.handle.submit(job, QueuePolicy::Block),
            Pushed::Queued
        ));
    }

    /// Events until EOS (or an error), failing after [`WAIT`].
    fn until_eos(&self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let event = self
                .rx
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no EOS within {WAIT:?}: {events:?}"));
            let done = matches!(event, Event::Eos | Event::Error(_));
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// The next caption's text, skipping other events.
    fn next_caption(&self) -> String {
        loop {
            match self.rx.recv_timeout(WAIT) {
                Ok(Event::Caption(text, ..)) => return text,
                Ok(Event::Error(problem)) => panic!("error instead of a caption: {problem:?}"),
                Ok(_) => {}
                Err(_) => panic!("no caption within {WAIT:?}"),
            }
        }
    }

    fn caption_batches(&self) -> Vec<u32> {
        self.output.caption_batches.lock().unwrap().clone()
    }
}

fn scheduler(
    engine: &Arc<ScriptedEngine>,
    encode: usize,
    caption: usize,
) -> Scheduler<ScriptedEngine> {
    Scheduler::spawn(engine.clone(), BatchLimits { encode, caption }).unwrap()
}

/// Holds the model inside its first call (on `first`'s frame), so that what is submitted next
/// waits for the batches that follow.
fn hold_first_call(engine: &ScriptedEngine, first: &Cam, job: Job) {
    engine.pause();
    first.submit(job);
    engine.wait_until("the first call is held", |e| {
        e.held.load(Ordering::SeqCst) == 1
    });
}

fn tags_of(text: &str) -> Vec<u8> {
    let list = text.split_once(": ").map_or("", |(_, list)| list);
    list.split(',').filter_map(|t| t.parse().ok()).collect()
}

#[test]
fn frames_waiting_on_several_streams_are_encoded_together_one_per_stream_per_round() {
    let engine = Arc::new(ScriptedEngine::healthy());
    let scheduler = scheduler(&engine, 4, 8);
    let cams: Vec<Cam> = (0..4).map(|_| Cam::new(&scheduler, "q", 60_000)).collect();
    hold_first_call(&engine, &cams[0], tagged_job(0, 0, 0));
    // Four more frames on every stream.
    for (k, cam) in cams.iter().enumerate() {
        let first = if k == 0 { 1 } else { 0 };
        for t in first..first + 4 {
            cam.submit(tagged_job(0, t, (10 * k as u64 + t) as u8));
        }
    }
    engine.resume();
    for cam in &cams {
        cam.submit(Job::Eos { epoch: 0 });
    }
    for (k, cam) in cams.iter().enumerate() {
        let events = cam.until_eos();
        let frames = if k == 0 { 5 } else { 4 };
        let expected: Vec<u8> = (0..frames).map(|t| (10 * k + t) as u8).collect();
        match captions_of(&events).as_slice() {
            [Event::Caption(text, ..)] => assert_eq!(tags_of(text), expected, "{text}"),
            other => panic!("one final caption expected: {other:?}"),
        }
    }
    let batches = engine.encode_batches.lock().unwrap().clone();
    assert_eq!(engine.encode_sizes(), vec![1, 4, 4, 4, 4], "{batches:?}");
    for batch in &batches[1..] {
        let mut streams: Vec<u8> = batch.iter().map(|tag| tag / 10).collect();
        streams.sort();
        assert_eq!(streams, vec![0, 1, 2, 3], "one frame per stream: {batch:?}");
    }
    // Each stream's frames in order.
    for k in 0..4u8 {
        let order: Vec<u8> = batches
            .iter()
            .flatten()
            .filter(|t| *t / 10 == k)
            .copied()
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }
    assert_eq!(cams[0].output.encoded_in_batches.load(Ordering::SeqCst), 4);
    assert_eq!(cams[1].output.encoded_in_batches.load(Ordering::SeqCst), 4);
}

#[test]
fn captions_due_together_decode_together_each_with_its_own_prompt() {
    let engine = Arc::new(ScriptedEngine {
        caption_steps: 3,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 8, 8);
    let cams: Vec<Cam> = (0..4)
        .map(|k| Cam::new(&scheduler, &format!("q{k}"), 1000))
        .collect();
    hold_first_call(&engine, &cams[0], frame_job(0, 0));
    for (k, cam) in cams.iter().enumerate() {
        if k > 0 {
            cam.submit(frame_job(0, 0));
        }
        cam.submit(frame_job(0, 1));
    }
    engine.resume();
    for (k, cam) in cams.iter().enumerate() {
        assert_eq!(cam.next_caption(), format!("q{k}: 0,1"));
    }
    assert_eq!(engine.encode_sizes(), vec![1, 7]);
    assert_eq!(
        engine.step_sizes(),
        vec![4, 4, 4],
        "one forward per step for all four"
    );
    for cam in &cams {
        assert_eq!(cam.caption_batches(), vec![4]);
    }
}

#[test]
fn a_caption_joins_the_running_batch_and_leaves_it_when_done() {
    let engine = Arc::new(ScriptedEngine {
        step_layers: 2,
        caption_steps: 3,
        slow_steps: 40,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 4, 8);
    let slow = Cam::new(&scheduler, "slow", 1000);
    let quick = Cam::new(&scheduler, "quick", 1000);
    slow.submit(frame_job(0, 0));
    slow.submit(frame_job(0, 1));
    engine.wait_until("the slow caption decodes", |e| e.step_sizes().len() >= 5);
    quick.submit(frame_job(0, 0));
    quick.submit(frame_job(0, 1));
    assert_eq!(quick.next_caption(), "quick: 0,1");
    assert_eq!(slow.next_caption(), "slow: 0,1");
    assert_eq!(
        quick.caption_batches(),
        vec![2],
        "decoded beside the slow one"
    );
    assert_eq!(
        slow.caption_batches(),
        vec![1],
        "alone again once the quick one left"
    );
    let sizes = engine.step_sizes();
    assert_eq!(sizes.iter().filter(|&&n| n == 2).count(), 3, "{sizes:?}");
    assert_eq!(
        sizes.iter().sum::<usize>(),
        43,
        "no step lost or repeated: {sizes:?}"
    );
    assert_eq!(sizes.last(), Some(&1));
}

#[test]
fn captions_wait_for_room_in_a_full_batch_oldest_first() {
    let engine = Arc::new(ScriptedEngine {
        caption_steps: 2,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 8, 2);
    let cams: Vec<Cam> = (0..3)
        .map(|k| Cam::new(&scheduler, &format!("q{k}"), 1000))
        .collect();
    hold_first_call(&engine, &cams[0], frame_job(0, 0));
    for (k, cam) in cams.iter().enumerate() {
        if k > 0 {
            cam.submit(frame_job(0, 0));
        }
        cam.submit(frame_job(0, 1));
    }
    engine.resume();
    for cam in &cams {
        cam.next_caption();
    }
    // Two run, the third enters when they leave.
    assert_eq!(engine.step_sizes(), vec![2, 2, 1, 1]);
}

#[test]
fn a_flush_of_one_stream_drops_only_its_caption() {
    let engine = Arc::new(ScriptedEngine {
        step_layers: 2,
        slow_steps: 100,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 8, 8);
    let flushed = Cam::new(&scheduler, "slow a", 1000);
    let other = Cam::new(&scheduler, "slow b", 1000);
    hold_first_call(&engine, &flushed, frame_job(0, 0));
    other.submit(frame_job(0, 0));
    flushed.submit(frame_job(0, 1));
    other.submit(frame_job(0, 1));
    engine.resume();
    engine.wait_until("both decode", |e| e.step_sizes().contains(&2));
    flushed.handle.flush_start();
    flushed.handle.flush_stop(1);
    assert_eq!(
        other.next_caption(),
        "slow b: 0,1",
        "the other stream's caption goes on"
    );
    assert_eq!(
        other.caption_batches(),
        vec![1],
        "alone once the flushed one left"
    );
    let sizes = engine.step_sizes();
    let twos = sizes.iter().filter(|&&n| n == 2).count();
    assert!(
        twos < 100 && sizes.iter().sum::<usize>() == 100 + twos,
        "{sizes:?}"
    );
    // The flushed stream starts again from an empty window.
    flushed.settings.lock().unwrap().prompt = "q".into();
    flushed.submit(frame_job(1, 5));
    flushed.submit(frame_job(1, 6));
    flushed.submit(Job::Eos { epoch: 1 });
    let events = flushed.until_eos();
    let captions = captions_of(&events);
    assert_eq!(
        captions,
        vec![&Event::Caption("q: 5,6".into(), 5000, 6000, 2, false)],
        "{events:?}"
    );
    let epochs = flushed.output.caption_epochs.lock().unwrap().clone();
    assert_eq!(
        epochs,
        vec![(1, "q: 5,6".to_owned())],
        "nothing of epoch 0 came out"
    );
}

#[test]
fn a_flush_interrupts_the_model_between_layers_when_nothing_else_is_wanted() {
    // A 2000-layer encode (2 s) of the only stream is cut at the next layer boundary.
    let engine = Arc::new(ScriptedEngine {
        encode_layers: 2000,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 4, 8);
    let cam = Cam::new(&scheduler, "q", 1000);
    cam.submit(frame_job(0, 0));
    engine.wait_until("the encode runs", |e| e.running.load(Ordering::SeqCst) == 1);
    let started = Instant::now();
    cam.handle.flush_start();
    engine.wait_until("the encode stops", |e| {
        e.running.load(Ordering::SeqCst) == 0
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(300),
        "the flush waited {took:?}"
    );
}

#[test]
fn a_flush_does_not_interrupt_a_batch_that_other_streams_still_want() {
    let engine = Arc::new(ScriptedEngine {
        encode_layers: 200,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 4, 8);
    let flushed = Cam::new(&scheduler, "q", 60_000);
    let other = Cam::new(&scheduler, "q", 60_000);
    hold_first_call(&engine, &flushed, frame_job(0, 0));
    other.submit(frame_job(0, 1));
    flushed.submit(frame_job(0, 1));
    engine.resume();
    engine.wait_until("the shared batch runs", |e| e.encode_sizes() == vec![1, 2]);
    flushed.handle.flush_start();
    other.submit(Job::Eos { epoch: 0 });
    let events = other.until_eos();
    assert_eq!(
        captions_of(&events),
        vec![&Event::Caption("q: 1".into(), 1000, 1000, 1, true)],
        "the other stream's frame was encoded to the end: {events:?}"
    );
}

#[test]
fn a_stream_leaving_mid_batch_is_safe_and_hears_nothing_more() {
    let engine = Arc::new(ScriptedEngine {
        step_layers: 2,
        slow_steps: 60,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 8, 8);
    let leaving = Cam::new(&scheduler, "slow a", 1000);
    let staying = Cam::new(&scheduler, "slow b", 1000);
    hold_first_call(&engine, &leaving, frame_job(0, 0));
    for job in [frame_job(0, 0), frame_job(0, 1)] {
        staying.submit(job);
    }
    leaving.submit(frame_job(0, 1));
    engine.resume();
    engine.wait_until("both decode", |e| e.step_sizes().contains(&2));
    let Cam { handle, output, .. } = leaving;
    drop(handle);
    output.closed.store(true, Ordering::SeqCst);
    assert_eq!(staying.next_caption(), "slow b: 0,1");
    staying.submit(Job::Eos { epoch: 0 });
    staying.until_eos();
    assert_eq!(output.after_close.load(Ordering::SeqCst), 0);
    assert_eq!(scheduler.streams(), 1, "the leaver is forgotten");
}

#[test]
fn an_error_in_one_streams_frame_fails_that_stream_alone() {
    let engine = Arc::new(ScriptedEngine {
        fail_on_frame: Some(99),
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 8, 8);
    let failing = Cam::new(&scheduler, "q", 1000);
    let healthy = Cam::new(&scheduler, "q", 1000);
    hold_first_call(&engine, &healthy, frame_job(0, 0));
    failing.submit(tagged_job(0, 0, 99));
    healthy.submit(frame_job(0, 1));
    engine.resume();
    healthy.submit(frame_job(0, 2));
    healthy.submit(Job::Eos { epoch: 0 });
    let events = failing.until_eos();
    let Some(Event::Error(problem)) = events.last() else {
        panic!("the failing stream gets an error: {events:?}");
    };
    assert!(
        problem.message.contains("matmul shape mismatch"),
        "{problem:?}"
    );
    let shared = engine.encode_batches.lock().unwrap()[1].clone();
    assert!(
        shared.contains(&99) && shared.contains(&1),
        "the bad frame shared a batch with a good one: {shared:?}"
    );
    let events = healthy.until_eos();
    assert!(
        !events.iter().any(|e| matches!(e, Event::Error(_))),
        "{events:?}"
    );
    let texts: Vec<Vec<u8>> = captions_of(&events)
        .iter()
        .map(|e| match e {
            Event::Caption(text, ..) => tags_of(text),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(texts, vec![vec![0, 1], vec![0, 1, 2]]);
    // A failed stream takes nothing more.
    assert!(matches!(
        failing.handle.submit(frame_job(0, 3), QueuePolicy::Block),
        Pushed::Refused(_)
    ));
}

#[test]
fn a_panic_while_decoding_fails_the_captions_in_that_step_and_the_scheduler_goes_on() {
    let engine = Arc::new(ScriptedEngine {
        panic_on_caption: true,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 8, 8);
    let captioning = Cam::new(&scheduler, "q", 1000);
    let encoding = Cam::new(&scheduler, "q", 60_000);
    captioning.submit(frame_job(0, 0));
    captioning.submit(frame_job(0, 1));
    let events = captioning.until_eos();
    assert!(matches!(events.last(), Some(Event::Error(_))), "{events:?}");
    encoding.submit(frame_job(0, 0));
    encoding.submit(Job::Eos { epoch: 0 });
    // Its final caption panics too (the double panics on every caption), but it was encoded.
    encoding.until_eos();
    assert_eq!(encoding.output.encoded.load(Ordering::SeqCst), 1);
}

#[test]
fn a_stream_with_many_waiting_frames_does_not_starve_another() {
    let engine = Arc::new(ScriptedEngine::healthy());
    let scheduler = scheduler(&engine, 2, 8);
    let greedy = Cam::new(&scheduler, "q", 60_000);
    let modest = Cam::new(&scheduler, "q", 60_000);
    hold_first_call(&engine, &greedy, tagged_job(0, 0, 0));
    for t in 1..12 {
        greedy.submit(tagged_job(0, t, t as u8));
    }
    modest.submit(tagged_job(0, 0, 100));
    engine.resume();
    greedy.submit(Job::Eos { epoch: 0 });
    modest.submit(Job::Eos { epoch: 0 });
    modest.until_eos();
    greedy.until_eos();
    let batches = engine.encode_batches.lock().unwrap().clone();
    assert!(
        batches[1].contains(&100),
        "the modest frame is in the next batch: {batches:?}"
    );
}

#[test]
fn a_live_stream_drops_its_own_oldest_frame_when_behind() {
    let engine = Arc::new(ScriptedEngine::healthy());
    let scheduler = scheduler(&engine, 8, 8);
    let settings = settings("q", 60_000, 60_000);
    let (output, rx) = RecordingOutput::new();
    let live = scheduler.attach(settings.clone(), Arc::new(output), 2);
    let other = Cam::new(&scheduler, "q", 60_000);
    hold_first_call(&engine, &other, frame_job(0, 0));
    let replaced = (1..6)
        .filter(|&t| {
            matches!(
                live.submit(frame_job(0, t), QueuePolicy::DropOldest),
                Pushed::Replaced(_)
            )
        })
        .count();
    assert_eq!(replaced, 3, "a queue of 2: three of five replaced");
    other.submit(frame_job(0, 1));
    engine.resume();
    live.submit(Job::Eos { epoch: 0 }, QueuePolicy::Block);
    let events: Vec<Event> = std::iter::from_fn(|| rx.recv_timeout(WAIT).ok())
        .take_while(|e| *e != Event::Eos)
        .collect();
    assert_eq!(
        captions_of(&events),
        vec![&Event::Caption("q: 4,5".into(), 4000, 5000, 2, true)]
    );
    other.submit(Job::Eos { epoch: 0 });
    let events = other.until_eos();
    assert!(
        matches!(captions_of(&events).as_slice(), [Event::Caption(text, ..)] if text == "q: 0,1"),
        "the other stream lost nothing: {events:?}"
    );
}

#[test]
fn dropping_the_scheduler_interrupts_the_model_and_joins_its_thread() {
    let engine = Arc::new(ScriptedEngine {
        encode_layers: 2000,
        ..ScriptedEngine::healthy()
    });
    let scheduler = scheduler(&engine, 4, 8);
    let cam = Cam::new(&scheduler, "q", 1000);
    cam.submit(frame_job(0, 0));
    engine.wait_until("the encode runs", |e| e.running.load(Ordering::SeqCst) == 1);
    let started = Instant::now();
    drop(scheduler);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(300),
        "stopping waited {took:?}"
    );
    assert_eq!(engine.running.load(Ordering::SeqCst), 0);
}

/// A small deterministic generator for the interleavings (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

/// One element driven at random from its own thread: frames (waiting or dropping), prompt
/// changes, flushes, an element leaving and coming back; at the end an EOS that must come
/// back. Captions must carry only frames of their own epoch (a frame's tag says its epoch).
fn drive_stream(scheduler: Arc<Scheduler<ScriptedEngine>>, seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed | 1);
    let settings = settings("q", 3000, 1000 * (1 + rng.below(3)));
    let attach = || {
        let (output, rx) = RecordingOutput::new();
        let output = Arc::new(output);
        let handle = scheduler.attach(settings.clone(), output.clone(), 1 + rng_cap(seed));
        (handle, output, rx)
    };
    let (mut handle, mut output, mut rx) = attach();
    let mut departed = Vec::new();
    let mut epoch = 0u64;
    let mut t = 0u64;
    for _ in 0..(5 + rng.below(25)) {
        match rng.below(10) {
            0..=5 => {
                let tag = ((epoch % 4) * 60 + t % 60) as u8;
                let policy = if rng.below(2) == 0 {
                    QueuePolicy::Block
                } else {
                    QueuePolicy::DropOldest
                };
                handle.submit(tagged_job(epoch, t, tag), policy);
                t += 1;
            }
            6 => {
                handle.flush_start();
                if rng.below(2) == 0 {
                    std::thread::sleep(Duration::from_micros(rng.below(500)));
                }
                epoch += 1;
                handle.flush_stop(epoch);
            }
            7 => {
                let prompt = if rng.below(2) == 0 { "q" } else { "r" };
                settings.lock().unwrap().prompt = prompt.into();
            }
            8 => {
                handle.detach();
                output.closed.store(true, Ordering::SeqCst);
                departed.push(output);
                (handle, output, rx) = attach();
                epoch = 0;
                t = 0;
            }
            _ => std::thread::sleep(Duration::from_micros(rng.below(1000))),
        }
    }
    handle.submit(Job::Eos { epoch }, QueuePolicy::Block);
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Eos) => break,
            Ok(Event::Error(problem)) => return Err(format!("error: {problem:?}")),
            Ok(_) => {}
            Err(_) => return Err("no EOS: stalled".into()),
        }
    }
    for (epoch, text) in output.caption_epochs.lock().unwrap().iter() {
        for tag in tags_of(text) {
            if u64::from(tag) / 60 != epoch % 4 {
                return Err(format!(
                    "caption of epoch {epoch} holds frame {tag}: {text}"
                ));
            }
        }
    }
    for gone in &departed {
        let late = gone.after_close.load(Ordering::SeqCst);
        if late > 0 {
            return Err(format!("{late} outputs after the stream left"));
        }
    }
    Ok(())
}

fn rng_cap(seed: u64) -> usize {
    (seed % 4) as usize
}

#[test]
fn random_interleavings_of_streams_never_deadlock_leak_or_mix_epochs() {
    let started = Instant::now();
    for seed in 0..300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let engine = Arc::new(ScriptedEngine {
            encode_layers: rng.below(2) as usize,
            step_layers: rng.below(2) as usize,
            caption_steps: 1 + rng.below(4) as usize,
            ..ScriptedEngine::healthy()
        });
        let limits = BatchLimits {
            encode: 1 + rng.below(4) as usize,
            caption: 1 + rng.below(4) as usize,
        };
        let scheduler = Arc::new(Scheduler::spawn(engine.clone(), limits).unwrap());
        let streams = 1 + rng.below(4);
        let (done_tx, done_rx) = mpsc::channel();
        for k in 0..streams {
            let scheduler = scheduler.clone();
            let done = done_tx.clone();
            let stream_seed = seed * 16 + k;
            std::thread::spawn(move || {
                let _ = done.send(drive_stream(scheduler, stream_seed));
            });
        }
        for _ in 0..streams {
            match done_rx.recv_timeout(2 * WAIT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("seed {seed}: {e}"),
                Err(_) => panic!("seed {seed}: a stream's driver never finished (deadlock)"),
            }
        }
        let (stopped_tx, stopped_rx) = mpsc::channel();
        std::thread::spawn(move || {
            drop(scheduler);
            let _ = stopped_tx.send(());
        });
        assert!(
            stopped_rx.recv_timeout(WAIT).is_ok(),
            "seed {seed}: the scheduler did not stop"
        );
    }
    eprintln!("300 interleavings in {:?}", started.elapsed());
}
