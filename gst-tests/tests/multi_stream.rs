//! Many streams on one model (issue 10): four pipelines, and one pipeline with four branches,
//! whose elements share the fixture model and so its scheduler. Every stream captions, its
//! video passes untouched, captions and frames are batched across streams (`batch` > 1,
//! `frames-batched` > 0), batched captions equal the captions of a stream alone, and a flush
//! or a stop of one stream mid-caption leaves the others captioning.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use llamavid_gst_tests::*;

const CAMERAS: usize = 4;

/// Hashes (bytes and PTS) of every video buffer reaching `sink`, in order.
fn record_video(sink: &gst::Element) -> Arc<Mutex<Vec<u64>>> {
    let hashes = Arc::new(Mutex::new(Vec::new()));
    let recorded = hashes.clone();
    let pad = sink.static_pad("sink").expect("a sink pad");
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(buffer) = info.buffer() {
            let map = buffer.map_readable().expect("readable video");
            let mut hasher = DefaultHasher::new();
            map.as_slice().hash(&mut hasher);
            buffer.pts().hash(&mut hasher);
            recorded.lock().unwrap().push(hasher.finish());
        }
        gst::PadProbeReturn::Ok
    });
    hashes
}

fn parse(description: &str) -> gst::Pipeline {
    init();
    gst::parse::launch(description)
        .unwrap_or_else(|e| panic!("{description}: {e}"))
        .downcast::<gst::Pipeline>()
        .expect("a pipeline")
}

/// The video `pattern` of videotestsrc as 64x48 I420 at 10 fps, `buffers` frames long (-1:
/// endless).
fn source(pattern: usize, buffers: i64) -> String {
    format!(
        "videotestsrc pattern={pattern} num-buffers={buffers} \
         ! video/x-raw,format=I420,width=64,height=48,framerate=10/1"
    )
}

/// The hashes of the video of `source(pattern, buffers)` with no element in between.
fn reference_video(pattern: usize, buffers: i64) -> Vec<u64> {
    let pipeline = parse(&format!(
        "{} ! fakesink name=v sync=false",
        source(pattern, buffers)
    ));
    let hashes = record_video(&pipeline.by_name("v").unwrap());
    run_to_eos(&pipeline, TIMEOUT);
    let hashes = hashes.lock().unwrap().clone();
    hashes
}

/// One camera: `source ! llamavidcaption name=c ! appsink`, the text to a fakesink.
struct Camera {
    pipeline: gst::Pipeline,
    caption: gst::Element,
    video: Arc<Mutex<Vec<u64>>>,
}

impl Camera {
    fn new(pattern: usize, buffers: i64) -> Self {
        let pipeline = parse(&format!(
            "{} ! llamavidcaption name=c ! fakesink name=v sync=false \
             c.text_src ! fakesink sync=false",
            source(pattern, buffers)
        ));
        let caption = pipeline.by_name("c").unwrap();
        configure_caption(&caption);
        let video = record_video(&pipeline.by_name("v").unwrap());
        Self {
            pipeline,
            caption,
            video,
        }
    }
}

fn stat(element: &gst::Element, name: &str) -> u64 {
    element.property::<u64>(name)
}

/// Captions of one stream of `pattern` alone (no other stream on the model while it runs is
/// not guaranteed: other tests may run; the captions are greedy and must not depend on it).
fn captions_alone(pattern: usize, buffers: i64, prompt: &str) -> Vec<(String, u64, u32)> {
    let camera = Camera::new(pattern, buffers);
    camera.caption.set_property("prompt", prompt);
    let messages = run_to_eos(&camera.pipeline, TIMEOUT);
    summary(&captions(&messages))
}

fn summary(captions: &[Caption]) -> Vec<(String, u64, u32)> {
    captions
        .iter()
        .map(|c| (c.text.clone(), c.end / MS, c.frames))
        .collect()
}

#[test]
fn four_pipelines_on_one_model_all_caption_with_their_video_untouched_and_batched() {
    const BUFFERS: i64 = 16;
    let cameras: Vec<Camera> = (0..CAMERAS).map(|k| Camera::new(k, BUFFERS)).collect();
    let runs: Vec<_> = cameras
        .iter()
        .map(|camera| {
            let pipeline = camera.pipeline.clone();
            std::thread::spawn(move || run_to_eos(&pipeline, TIMEOUT))
        })
        .collect();
    let messages: Vec<Vec<gst::Message>> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let mut batched_captions = 0;
    let mut batched_frames = 0;
    for (k, camera) in cameras.iter().enumerate() {
        let captions = captions(&messages[k]);
        let timing: Vec<(u64, u32)> = captions.iter().map(|c| (c.end / MS, c.frames)).collect();
        assert_eq!(
            timing,
            [(500, 6), (1000, 11), (1500, 16)],
            "camera {k}: captions at 0.5 s, 1 s and 1.5 s (the last one at EOS)"
        );
        assert_eq!(
            *camera.video.lock().unwrap(),
            reference_video(k, BUFFERS),
            "camera {k}: the video passed untouched"
        );
        // Other tests in this process may share the model too: a batch may hold their
        // captions as well.
        assert!(captions.iter().all(|c| c.batch >= 1), "{captions:?}");
        batched_captions += captions.iter().filter(|c| c.batch > 1).count();
        batched_frames += stat(&camera.caption, "frames-batched");
        assert_eq!(stat(&camera.caption, "frames-encoded"), BUFFERS as u64);
    }
    println!("{batched_captions} captions and {batched_frames} frames batched");
    assert!(batched_captions > 0, "no caption decoded beside another's");
    assert!(batched_frames > 0, "no frame encoded beside another's");
}

#[test]
fn one_pipeline_with_four_branches_captions_every_branch_as_a_branch_alone_would() {
    const BUFFERS: i64 = 12;
    // Two questions over four branches: frames asked the same question are encoded together,
    // the others beside them in the same round.
    let prompts = [
        "What is there?",
        "Describe the colours.",
        "What is there?",
        "Describe the colours.",
    ];
    let branches: String = (0..CAMERAS)
        .map(|k| {
            format!(
                " t. ! queue ! llamavidcaption name=c{k} ! fakesink name=v{k} sync=false \
                 c{k}.text_src ! fakesink sync=false"
            )
        })
        .collect();
    let pipeline = parse(&format!("{} ! tee name=t{branches}", source(0, BUFFERS)));
    let elements: Vec<gst::Element> = (0..CAMERAS)
        .map(|k| {
            let caption = pipeline.by_name(&format!("c{k}")).unwrap();
            configure_caption(&caption);
            caption.set_property("prompt", prompts[k]);
            caption
        })
        .collect();
    let videos: Vec<_> = (0..CAMERAS)
        .map(|k| record_video(&pipeline.by_name(&format!("v{k}")).unwrap()))
        .collect();
    let messages = run_to_eos(&pipeline, TIMEOUT);
    let reference = reference_video(0, BUFFERS);
    let all = captions(&messages);
    for (k, element) in elements.iter().enumerate() {
        let name = element.name();
        let own: Vec<Caption> = messages
            .iter()
            .filter(|m| m.src().is_some_and(|s| s.name() == name))
            .filter_map(Caption::from_message)
            .collect();
        assert_eq!(own.len(), 3, "branch {k}: at 0.5 s, 1 s, EOS: {own:?}");
        assert!(own.iter().all(|c| c.prompt == prompts[k]));
        assert_eq!(
            *videos[k].lock().unwrap(),
            reference,
            "branch {k}: video untouched"
        );
        assert_eq!(
            summary(&own),
            captions_alone(0, BUFFERS, prompts[k]),
            "branch {k}: batched captions equal the captions of the stream alone"
        );
    }
    let batched: u64 = elements.iter().map(|e| stat(e, "frames-batched")).sum();
    assert!(batched > 0, "the branches' frames were encoded together");
    assert!(
        all.iter().any(|c| c.batch > 1),
        "some captions decoded together: {all:?}"
    );
}

/// Four endless cameras making long captions (100 tokens, one every 200 ms of video), so that
/// the model is mostly decoding.
fn busy_cameras() -> Vec<(Camera, StopOnDrop)> {
    (0..CAMERAS)
        .map(|k| {
            let camera = Camera::new(k, -1);
            camera.caption.set_property("max-new-tokens", 100u32);
            camera.caption.set_property("caption-interval", 200u64);
            let stop = StopOnDrop(camera.pipeline.clone());
            (camera, stop)
        })
        .collect()
}

/// Waits until the element has made `more` captions beyond `from`.
fn wait_captions(element: &gst::Element, from: u64, more: u64, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while stat(element, "captions") < from + more {
        assert!(Instant::now() < deadline, "{what}: no new captions");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn flushing_or_stopping_one_stream_mid_caption_leaves_the_others_captioning() {
    let cameras = busy_cameras();
    let buses: Vec<_> = cameras
        .iter()
        .map(|(c, _)| record_bus(&c.pipeline.bus().unwrap()))
        .collect();
    for (camera, _) in &cameras {
        set_state_within(&camera.pipeline, gst::State::Playing).unwrap();
    }
    for (camera, _) in &cameras {
        wait_captions(&camera.caption, 0, 2, "start");
    }
    let (flushed, stopped) = (&cameras[0].0, &cameras[1].0);
    for round in 0..3 {
        let before: Vec<u64> = cameras
            .iter()
            .map(|(c, _)| stat(&c.caption, "captions"))
            .collect();
        // A flushing seek back to the start on camera 0, camera 1 to NULL, while all four
        // are decoding long captions together.
        let started = Instant::now();
        flushed
            .pipeline
            .seek_simple(
                gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE,
                gst::ClockTime::ZERO,
            )
            .expect("the flushing seek");
        set_state_within(&stopped.pipeline, gst::State::Null).unwrap();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "round {round}: flush and stop took {took:?}"
        );
        let after_flush = stat(&flushed.caption, "captions");
        for (k, (camera, _)) in cameras.iter().enumerate().skip(2) {
            wait_captions(
                &camera.caption,
                before[k],
                2,
                &format!("round {round}: camera {k}"),
            );
        }
        wait_captions(
            &flushed.caption,
            after_flush,
            1,
            &format!("round {round}: the flushed camera"),
        );
        // Its statistics start again at READY -> PAUSED.
        set_state_within(&stopped.pipeline, gst::State::Playing).unwrap();
        wait_captions(
            &stopped.caption,
            0,
            1,
            &format!("round {round}: the restarted camera"),
        );
    }
    for (k, bus) in buses.iter().enumerate() {
        let errors = errors(&bus.lock().unwrap());
        assert!(errors.is_empty(), "camera {k}: {errors:?}");
    }
}
