//! The model's compute runs in its own thread pool (issue 9, item 7): our kernels and candle's
//! own CPU ops alike, never rayon's global pool, with the thread count and priority asked for.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::IndexOp;
use common::{model_dir, reference};
use gstllamavid::model::pool::NICE_INCREMENT;
use gstllamavid::model::preprocess::FrameView;
use gstllamavid::model::{GenerationParams, LlamaVid, LoadOptions, WeightFormat};
use llamavid_kernels::cpu::host;

fn load(threads: usize, lower_priority: bool) -> LlamaVid {
    let mut options = LoadOptions::new(model_dir());
    options.weight_format = WeightFormat::Pickle;
    options.threads = Some(threads);
    options.lower_thread_priority = lower_priority;
    LlamaVid::load(&options).expect("fixture loads")
}

/// Encodes the fixture's frames and captions them: every kind of compute the element asks for.
fn encode_and_caption(model: &LlamaVid) -> Vec<u32> {
    let frames = reference()["frames"].clone();
    let (t, h, w, _) = frames.dims4().unwrap();
    let data: Vec<Vec<u8>> = (0..t)
        .map(|i| {
            frames
                .i(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let views: Vec<FrameView> = data
        .iter()
        .map(|d| FrameView::packed_rgb(w, h, d))
        .collect();
    let question = common::prompt_json()["question"]
        .as_str()
        .unwrap()
        .to_owned();
    let prompt = model.prompt(&question).unwrap();
    let tokens = model.encode_frames(&views, &prompt).unwrap();
    let video = tokens.reshape((t * 2, ())).unwrap();
    let params = GenerationParams {
        max_new_tokens: 8,
        ..GenerationParams::default()
    };
    model
        .caption(&video, &prompt, &params, None)
        .unwrap()
        .token_ids
}

/// Holds every thread of rayon's global pool until dropped.
struct BlockedGlobalPool {
    release: Arc<(Mutex<bool>, Condvar)>,
}

impl BlockedGlobalPool {
    fn block() -> Self {
        let threads = rayon::current_num_threads();
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (started_tx, started_rx) = mpsc::channel();
        for _ in 0..threads {
            let release = release.clone();
            let started = started_tx.clone();
            rayon::spawn(move || {
                started.send(()).unwrap();
                let (lock, cv) = &*release;
                let mut go = lock.lock().unwrap();
                while !*go {
                    go = cv.wait(go).unwrap();
                }
            });
        }
        for _ in 0..threads {
            started_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("every global pool thread starts its blocking job");
        }
        Self { release }
    }
}

impl Drop for BlockedGlobalPool {
    fn drop(&mut self) {
        let (lock, cv) = &*self.release;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

#[test]
fn compute_never_waits_for_rayons_global_pool() {
    // With every global-pool thread held, any parallel loop of ours or of candle's that ran
    // outside the model's pool would wait for them: the work would not finish.
    let blocked = BlockedGlobalPool::block();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let model = load(2, true);
        done_tx.send(encode_and_caption(&model)).unwrap();
    });
    let result = done_rx.recv_timeout(Duration::from_secs(300));
    drop(blocked);
    let ids = result.expect(
        "loading, encoding and captioning did not finish while rayon's global pool was busy: \
         some of the model's compute ran outside its own pool",
    );
    assert_eq!(ids.len(), 8);
}

#[test]
fn the_pool_has_the_threads_and_priority_asked_for() {
    let model = load(3, true);
    assert_eq!(model.pool().threads(), 3);
    assert_eq!(model.install(rayon::current_num_threads), 3);
    let names = model
        .pool()
        .broadcast(|| std::thread::current().name().map(str::to_owned));
    assert_eq!(names.len(), 3);
    assert!(
        names.iter().all(|n| n
            .as_deref()
            .is_some_and(|n| n.starts_with("llamavid-model-"))),
        "{names:?}"
    );
    if cfg!(target_os = "linux") {
        // Pool threads inherit the nice value of the thread that built them (this one).
        let base = host::current_thread_nice().expect("nice value readable");
        let lowered = model.pool().broadcast(host::current_thread_nice);
        assert!(
            lowered
                .iter()
                .all(|&n| n == Some((base + NICE_INCREMENT).min(19))),
            "base {base}, pool {lowered:?}"
        );
        let untouched = load(2, false).pool().broadcast(host::current_thread_nice);
        assert!(untouched.iter().all(|&n| n == Some(base)), "{untouched:?}");
    }
}
