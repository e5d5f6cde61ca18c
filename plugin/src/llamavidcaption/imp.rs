//! The element subclass: pads, properties, events, queries and state changes. The work itself
//! is in `captioner` (scheduling) and `model` (LLaMA-VID); this file is glue.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::frames;
use super::output::{lock, ElementOutput, Shared};
use super::text::{Popped, TextItem, TextTimeline};
use super::{Dtype, FramePolicy, CAPTION_META};
use crate::captioner::registry::Registry;
use crate::captioner::{
    CaptionSettings, FrameJob, FrameSampler, Job, OwnedFrame, Pushed, QueuePolicy, Worker,
};
use crate::model::nn::Precision;
use crate::model::{GenerationParams, LlamaVid, LoadOptions};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "llamavidcaption",
        gst::DebugColorFlags::empty(),
        Some("LLaMA-VID video captioning"),
    )
});

const DEFAULT_PROMPT: &str = "Describe what is happening in the video.";
const DEFAULT_DEVICE: &str = "auto";
const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 1000;
const DEFAULT_WINDOW_DURATION_MS: u64 = 60_000;
const DEFAULT_CAPTION_INTERVAL_MS: u64 = 5000;
const DEFAULT_MAX_NEW_TOKENS: u32 = 64;
const DEFAULT_TEMPERATURE: f64 = 0.0;
const DEFAULT_TOP_P: f64 = 1.0;
const DEFAULT_SEED: u64 = 0;
const DEFAULT_LATENCY_MS: u64 = 10_000;
/// Sampled frames that may wait for the worker. Copies of frames, not upstream buffers.
const QUEUE_CAPACITY: usize = 4;
const MS: u64 = 1_000_000;

/// Models shared by every element in the process, keyed by what was loaded and where.
type ModelKey = (PathBuf, Option<PathBuf>, Option<PathBuf>, String, String);
static MODELS: LazyLock<Registry<ModelKey, LlamaVid>> = LazyLock::new(Registry::default);

#[derive(Debug, Clone)]
struct Settings {
    model: Option<PathBuf>,
    vision_tower: Option<PathBuf>,
    llm_gguf: Option<PathBuf>,
    prompt: String,
    device: String,
    sample_interval_ms: u64,
    window_duration_ms: u64,
    caption_interval_ms: u64,
    max_new_tokens: u32,
    temperature: f64,
    top_p: f64,
    seed: u64,
    latency_ms: u64,
    frame_policy: FramePolicy,
    dtype: Dtype,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: None,
            vision_tower: None,
            llm_gguf: None,
            prompt: DEFAULT_PROMPT.into(),
            device: DEFAULT_DEVICE.into(),
            sample_interval_ms: DEFAULT_SAMPLE_INTERVAL_MS,
            window_duration_ms: DEFAULT_WINDOW_DURATION_MS,
            caption_interval_ms: DEFAULT_CAPTION_INTERVAL_MS,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            temperature: DEFAULT_TEMPERATURE,
            top_p: DEFAULT_TOP_P,
            seed: DEFAULT_SEED,
            latency_ms: DEFAULT_LATENCY_MS,
            frame_policy: FramePolicy::Auto,
            dtype: Dtype::Auto,
        }
    }
}

impl Settings {
    fn caption_settings(&self) -> CaptionSettings {
        CaptionSettings {
            prompt: self.prompt.clone(),
            params: GenerationParams {
                max_new_tokens: self.max_new_tokens as usize,
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
            },
            window_duration: self.window_duration_ms * MS,
            caption_interval: self.caption_interval_ms.max(1) * MS,
        }
    }
}

/// Per-stream state of the streaming thread.
struct State {
    video_info: Option<gst_video::VideoInfo>,
    segment: gst::FormattedSegment<gst::ClockTime>,
    sampler: FrameSampler,
    /// Whether upstream is live, asked once per stream.
    live: Option<bool>,
    /// For buffers without timestamps: the running time given to the previous one.
    last_running_time: Option<u64>,
    warned_missing_pts: bool,
}

impl State {
    fn new(sample_interval_ms: u64) -> Self {
        Self {
            video_info: None,
            segment: gst::FormattedSegment::new(),
            sampler: FrameSampler::new(sample_interval_ms.max(1) * MS),
            live: None,
            last_running_time: None,
            warned_missing_pts: false,
        }
    }
}

pub struct LlamaVidCaption {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    textpad: gst::Pad,
    settings: Mutex<Settings>,
    state: Mutex<State>,
    /// What the worker reads before each job.
    caption_settings: Arc<Mutex<CaptionSettings>>,
    shared: Arc<Shared>,
    model: Mutex<Option<Arc<LlamaVid>>>,
    worker: Mutex<Option<Arc<Worker>>>,
}

/// Device, compute dtype and CPU precision for the `device` and `dtype` properties.
fn parse_device(device: &str, dtype: Dtype) -> Result<(Device, DType, Precision), String> {
    let device = device.trim().to_ascii_lowercase();
    let cpu = || {
        let precision = match dtype {
            Dtype::Auto => Precision::Auto,
            Dtype::F32 => Precision::F32,
            Dtype::Bf16 => Precision::Bf16,
            Dtype::Int8 => Precision::Int8,
        };
        Ok((Device::Cpu, DType::F32, precision))
    };
    let cuda_ordinal = match device.as_str() {
        "cpu" => return cpu(),
        "auto" => {
            #[cfg(feature = "cuda")]
            if let Ok(dev) = Device::new_cuda(0) {
                return Ok((dev, cuda_dtype(dtype), Precision::F32));
            }
            return cpu();
        }
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(format!(
                    "unknown device `{other}`: use auto, cpu, cuda or cuda:N"
                ))
            }
        },
    };
    #[cfg(feature = "cuda")]
    {
        Device::new_cuda(cuda_ordinal)
            .map(|dev| (dev, cuda_dtype(dtype), Precision::F32))
            .map_err(|e| {
                format!(
                    "CUDA device {cuda_ordinal} is not available (no NVIDIA GPU or driver?): {e}"
                )
            })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(format!(
            "device cuda:{cuda_ordinal} was asked for, but this build of gst-llamavid has no CUDA \
             support: rebuild with `--features cuda` or set device=cpu"
        ))
    }
}

/// Compute dtype on a GPU: half precision unless f32 is asked for (int8 is a CPU mode).
#[cfg(feature = "cuda")]
fn cuda_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::BF16,
        Dtype::Auto | Dtype::Int8 => DType::F16,
    }
}

impl LlamaVidCaption {
    fn policy(&self, live: bool) -> QueuePolicy {
        match lock(&self.settings).frame_policy {
            FramePolicy::Drop => QueuePolicy::DropOldest,
            FramePolicy::Wait => QueuePolicy::Block,
            FramePolicy::Auto if live => QueuePolicy::DropOldest,
            FramePolicy::Auto => QueuePolicy::Block,
        }
    }

    fn upstream_is_live(&self) -> bool {
        let mut query = gst::query::Latency::new();
        self.sinkpad.peer_query(&mut query) && query.result().0
    }

    /// Loads (or shares) the model named by the properties.
    fn load_model(&self) -> Result<(), gst::ErrorMessage> {
        let settings = lock(&self.settings).clone();
        let Some(model_dir) = settings.model.clone() else {
            return Err(gst::error_msg!(
                gst::LibraryError::Settings,
                ("No model set: set the `model` property to a LLaMA-VID model directory")
            ));
        };
        let (device, dtype, precision) = parse_device(&settings.device, settings.dtype)
            .map_err(|e| gst::error_msg!(gst::LibraryError::Settings, ("{}", e)))?;
        let canonical = model_dir
            .canonicalize()
            .unwrap_or_else(|_| model_dir.clone());
        let key = (
            canonical,
            settings.vision_tower.clone(),
            settings.llm_gguf.clone(),
            format!("{device:?}"),
            format!("{dtype:?}/{}", precision.as_str()),
        );
        let obj = self.obj();
        let _ = obj.post_message(
            gst::message::Progress::builder(
                gst::ProgressType::Start,
                "load",
                "Loading the LLaMA-VID model",
            )
            .src(&*obj)
            .build(),
        );
        gst::info!(
            CAT,
            imp = self,
            "loading {} on {:?} ({:?})",
            model_dir.display(),
            device,
            dtype
        );
        let started = Instant::now();
        let loaded = MODELS.get_or_load(&key, || {
            let mut options = LoadOptions::new(&model_dir);
            options.vision_tower = settings.vision_tower.clone();
            options.llm_gguf = settings.llm_gguf.clone();
            options.device = device.clone();
            options.dtype = dtype;
            options.precision = precision;
            LlamaVid::load(&options)
        });
        match loaded {
            Ok((model, loaded_now)) => {
                for note in model.notes() {
                    gst::warning!(CAT, imp = self, "{note}");
                }
                gst::info!(CAT, imp = self, "model ready after {:?}", started.elapsed());
                let text = if loaded_now {
                    "LLaMA-VID model loaded"
                } else {
                    "LLaMA-VID model shared with another element"
                };
                let _ = obj.post_message(
                    gst::message::Progress::builder(gst::ProgressType::Complete, "load", text)
                        .src(&*obj)
                        .build(),
                );
                *lock(&self.model) = Some(model);
                Ok(())
            }
            Err(e) => {
                let _ = obj.post_message(
                    gst::message::Progress::builder(
                        gst::ProgressType::Error,
                        "load",
                        "Loading the model failed",
                    )
                    .src(&*obj)
                    .build(),
                );
                Err(gst::error_msg!(
                    gst::ResourceError::OpenRead,
                    (
                        "Cannot load the LLaMA-VID model from {}: {}",
                        model_dir.display(),
                        e
                    )
                ))
            }
        }
    }

    fn start_worker(&self) -> Result<(), gst::ErrorMessage> {
        let Some(model) = lock(&self.model).clone() else {
            return Err(gst::error_msg!(
                gst::CoreError::StateChange,
                ("No model loaded")
            ));
        };
        *lock(&self.caption_settings) = lock(&self.settings).caption_settings();
        let output = Arc::new(ElementOutput {
            element: self.obj().downgrade(),
            shared: self.shared.clone(),
        });
        let worker = Worker::spawn(model, self.caption_settings.clone(), output, QUEUE_CAPACITY)
            .map_err(|e| {
                gst::error_msg!(
                    gst::CoreError::Thread,
                    ("Cannot start the worker thread: {}", e)
                )
            })?;
        *lock(&self.worker) = Some(Arc::new(worker));
        Ok(())
    }

    fn stop_worker(&self) {
        let worker = lock(&self.worker).take();
        if let Some(worker) = worker {
            worker.shutdown();
        }
    }

    fn start_text_task(&self) -> Result<(), glib::BoolError> {
        self.shared.text.set_flushing(false);
        let weak = self.obj().downgrade();
        self.textpad.start_task(move || {
            let Some(element) = weak.upgrade() else {
                return;
            };
            let imp = element.imp();
            match imp.shared.text.pop(Duration::from_millis(100)) {
                Popped::Flushing => {
                    let _ = imp.textpad.pause_task();
                }
                Popped::Timeout => {}
                Popped::Item(item) => imp.push_text(item),
            }
        })
    }

    fn stop_text_task(&self) {
        self.shared.text.set_flushing(true);
        let _ = self.textpad.stop_task();
    }

    /// Pushes one text item downstream (text task only).
    fn push_text(&self, item: TextItem) {
        let result = match item {
            TextItem::Start { stream_id } => {
                let started = self.textpad.push_event(
                    gst::event::StreamStart::builder(&stream_id)
                        .flags(gst::StreamFlags::SPARSE)
                        .build(),
                );
                let caps = self.negotiate_text_caps();
                if started && self.textpad.push_event(gst::event::Caps::new(&caps)) {
                    Ok(gst::FlowSuccess::Ok)
                } else {
                    Err(gst::FlowError::NotNegotiated)
                }
            }
            TextItem::Segment(segment) => {
                self.textpad.push_event(gst::event::Segment::new(&segment));
                Ok(gst::FlowSuccess::Ok)
            }
            TextItem::Caption {
                text,
                pts,
                duration,
            } => {
                let markup = self.textpad.current_caps().is_some_and(|caps| {
                    caps.structure(0)
                        .and_then(|s| s.get::<&str>("format").ok())
                        .is_some_and(|f| f == "pango-markup")
                });
                let text = if markup {
                    glib::markup_escape_text(&text).to_string()
                } else {
                    text
                };
                let mut buffer = gst::Buffer::from_mut_slice(text.into_bytes());
                {
                    let buffer = buffer.get_mut().expect("new buffer is writable");
                    buffer.set_pts(pts);
                    buffer.set_duration(duration);
                }
                self.textpad.push(buffer)
            }
            TextItem::Gap { pts, duration } => {
                self.textpad
                    .push_event(gst::event::Gap::builder(pts).duration(duration).build());
                Ok(gst::FlowSuccess::Ok)
            }
            TextItem::Eos => {
                self.textpad.push_event(gst::event::Eos::new());
                Ok(gst::FlowSuccess::Ok)
            }
        };
        match result {
            // Nobody listening to the text is a normal way to use the element.
            Ok(_)
            | Err(gst::FlowError::NotLinked)
            | Err(gst::FlowError::Flushing)
            | Err(gst::FlowError::Eos) => {}
            Err(gst::FlowError::NotNegotiated) if !self.textpad.is_linked() => {}
            Err(e) => {
                gst::warning!(CAT, imp = self, "text push failed: {e:?}");
            }
        }
    }

    /// utf8 unless downstream only takes pango-markup.
    fn negotiate_text_caps(&self) -> gst::Caps {
        let template = self.textpad.pad_template_caps();
        let peer = self.textpad.peer_query_caps(Some(&template));
        let wants_utf8 = peer.is_empty()
            || peer.iter().any(|s| match s.value("format") {
                Ok(v) => v.get::<&str>().map(|f| f == "utf8").unwrap_or_else(|_| {
                    v.get::<gst::List>()
                        .map(|l| l.iter().any(|x| x.get::<&str>().ok() == Some("utf8")))
                        .unwrap_or(true)
                }),
                Err(_) => true,
            });
        let format = if wants_utf8 { "utf8" } else { "pango-markup" };
        gst::Caps::builder("text/x-raw")
            .field("format", format)
            .build()
    }

    fn running_time(&self, state: &mut State, buffer: &gst::BufferRef) -> Option<u64> {
        match buffer.pts() {
            Some(pts) => {
                let rt = state.segment.to_running_time(pts)?.nseconds();
                state.last_running_time = Some(rt);
                Some(rt)
            }
            None => {
                // No timestamp: continue from the previous frame by its duration (or the frame
                // rate), so sampling still follows the stream's pace.
                if !state.warned_missing_pts {
                    state.warned_missing_pts = true;
                    gst::warning!(
                        CAT,
                        imp = self,
                        "buffers without timestamps: estimating running time from durations"
                    );
                }
                let step = buffer
                    .duration()
                    .or_else(|| {
                        let fps = state.video_info.as_ref()?.fps();
                        (fps.numer() > 0).then(|| {
                            gst::ClockTime::SECOND
                                .mul_div_floor(fps.denom() as u64, fps.numer() as u64)
                                .unwrap_or(gst::ClockTime::ZERO)
                        })
                    })
                    .unwrap_or(gst::ClockTime::from_mseconds(33))
                    .nseconds();
                let rt = state.last_running_time.map_or(0, |t| t + step);
                state.last_running_time = Some(rt);
                Some(rt)
            }
        }
    }

    fn sink_chain(&self, mut buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(gst::FlowError::Error);
        }
        let sampled = {
            let mut state = lock(&self.state);
            let Some(info) = state.video_info.clone() else {
                gst::element_imp_error!(
                    self,
                    gst::CoreError::Negotiation,
                    ("Received a buffer before caps")
                );
                return Err(gst::FlowError::NotNegotiated);
            };
            let running_time = self.running_time(&mut state, &buffer);
            let live = *state.live.get_or_insert_with(|| self.upstream_is_live());
            match running_time {
                Some(rt) if state.sampler.sample(rt) => {
                    let next_due = state.sampler.next_due().unwrap_or(rt);
                    let frame =
                        gst_video::VideoFrameRef::from_buffer_ref_readable(buffer.as_ref(), &info)
                            .ok()
                            .and_then(|mapped| {
                                frames::view(&mapped).map(|v| OwnedFrame::copy_from(&v))
                            });
                    match frame {
                        Some(frame) => Some((rt, next_due, live, frame)),
                        None => {
                            gst::element_imp_error!(
                                self,
                                gst::StreamError::Format,
                                (
                                    "Cannot map a {}x{} {:?} frame",
                                    info.width(),
                                    info.height(),
                                    info.format()
                                )
                            );
                            return Err(gst::FlowError::Error);
                        }
                    }
                }
                _ => None,
            }
        };

        if let Some((running_time, next_sample_due, live, frame)) = sampled {
            self.submit_frame(&buffer, running_time, next_sample_due, live, frame);
        }

        if let Some((event, pts)) = lock(&self.shared.pending_meta).take() {
            let buffer = buffer.make_mut();
            if let Ok(mut meta) = gst::meta::CustomMeta::add(buffer, CAPTION_META) {
                let s = meta.mut_structure();
                let fields = super::output::caption_structure(CAPTION_META, &event, pts);
                for (name, value) in fields.iter() {
                    s.set_value(name, value.clone());
                }
            }
        }
        self.srcpad.push(buffer)
    }

    fn submit_frame(
        &self,
        buffer: &gst::Buffer,
        running_time: u64,
        next_sample_due: u64,
        live: bool,
        frame: OwnedFrame,
    ) {
        let policy = self.policy(live);
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        let job = Job::Frame {
            epoch,
            job: FrameJob {
                running_time,
                next_sample_due,
                arrived: Instant::now(),
                frame,
            },
        };
        let stats = &self.shared.stats;
        stats.frames_sampled.fetch_add(1, Ordering::Relaxed);
        // Clone the handle out of the lock: `submit` may wait for room (non-live), and a flush
        // or state change must be able to reach the worker meanwhile.
        let worker = lock(&self.worker).clone();
        let pushed = match worker {
            Some(worker) => worker.submit(job, policy),
            None => Pushed::Refused(job),
        };
        if let Pushed::Replaced(_) = pushed {
            let dropped = stats.frames_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let processed = stats.frames_sampled.load(Ordering::Relaxed) - dropped;
            gst::debug!(
                CAT,
                imp = self,
                "worker busy: dropped the oldest waiting frame ({dropped} so far)"
            );
            let obj = self.obj();
            let rt = gst::ClockTime::from_nseconds(running_time);
            let _ = obj.post_message(
                gst::message::Qos::builder(live)
                    .running_time(rt)
                    .stream_time(lock(&self.state).segment.to_stream_time(buffer.pts().unwrap_or(rt)))
                    .timestamp(buffer.pts())
                    .duration(buffer.duration())
                    .stats(gst::format::Buffers::from_u64(processed), gst::format::Buffers::from_u64(dropped))
                    .other_field("reason", "the captioning model is slower than the sampling rate; oldest waiting frame dropped")
                    .src(&*obj)
                    .build(),
            );
        }
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        use gst::EventView;
        gst::log!(CAT, imp = self, "sink event {:?}", event.type_());
        match event.view() {
            EventView::StreamStart(_) => {
                {
                    let mut state = lock(&self.state);
                    state.live = None;
                    state.last_running_time = None;
                }
                let stream_id = self
                    .textpad
                    .create_stream_id(&*self.obj(), Some("text"))
                    .to_string();
                self.shared.text.push(TextItem::Start { stream_id });
                self.srcpad.push_event(event)
            }
            EventView::Caps(caps) => {
                let info = match gst_video::VideoInfo::from_caps(caps.caps()) {
                    Ok(info) if frames::pixel_format(info.format()).is_some() => info,
                    _ => {
                        gst::element_imp_error!(
                            self,
                            gst::CoreError::Negotiation,
                            ("Unsupported caps {}: use raw RGB, RGBx, BGRx, RGBA, BGRA, I420 or NV12 video", caps.caps())
                        );
                        return false;
                    }
                };
                lock(&self.state).video_info = Some(info);
                self.srcpad.push_event(event)
            }
            EventView::Segment(segment) => {
                let segment = match segment.segment().clone().downcast::<gst::ClockTime>() {
                    Ok(segment) => segment,
                    Err(_) => {
                        gst::element_imp_error!(
                            self,
                            gst::StreamError::Format,
                            ("Only TIME segments are supported")
                        );
                        return false;
                    }
                };
                lock(&self.state).segment = segment.clone();
                *lock(&self.shared.segment) = segment.clone();
                self.shared.text.push(TextItem::Segment(segment));
                self.srcpad.push_event(event)
            }
            EventView::FlushStart(_) => {
                self.shared.flushing.store(true, Ordering::SeqCst);
                self.shared.signal_eos(None);
                let worker = lock(&self.worker).clone();
                if let Some(worker) = worker {
                    worker.flush_start();
                }
                self.shared.text.set_flushing(true);
                let _ = self.textpad.push_event(event.clone());
                let _ = self.textpad.pause_task();
                self.srcpad.push_event(event)
            }
            EventView::FlushStop(_) => {
                let epoch = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                let worker = lock(&self.worker).clone();
                if let Some(worker) = worker {
                    worker.flush_stop(epoch);
                }
                {
                    let mut state = lock(&self.state);
                    state.sampler.reset();
                    state.last_running_time = None;
                }
                lock(&self.shared.timeline).reset();
                *lock(&self.shared.pending_meta) = None;
                self.shared.flushing.store(false, Ordering::SeqCst);
                let _ = self.textpad.push_event(event.clone());
                if let Err(e) = self.start_text_task() {
                    gst::warning!(CAT, imp = self, "cannot restart the text task: {e}");
                }
                self.srcpad.push_event(event)
            }
            EventView::Eos(_) => {
                let epoch = self.shared.epoch.load(Ordering::SeqCst);
                let submitted = match lock(&self.worker).as_ref() {
                    Some(worker) => matches!(
                        worker.submit(Job::Eos { epoch }, QueuePolicy::Block),
                        Pushed::Queued
                    ),
                    None => false,
                };
                if submitted {
                    // The final caption goes out before EOS, on both pads.
                    self.shared.wait_eos(epoch);
                }
                if !submitted || self.shared.failed.load(Ordering::SeqCst) {
                    // No worker to finish the text stream: end it here.
                    self.shared.text.push(TextItem::Eos);
                }
                self.srcpad.push_event(event)
            }
            _ => self.srcpad.push_event(event),
        }
    }

    fn text_query(&self, query: &mut gst::QueryRef) -> bool {
        use gst::QueryViewMut;
        match query.view_mut() {
            QueryViewMut::Latency(q) => {
                let mut upstream = gst::query::Latency::new();
                if !self.sinkpad.peer_query(&mut upstream) {
                    return false;
                }
                let (live, min, max) = upstream.result();
                let ours = gst::ClockTime::from_mseconds(lock(&self.settings).latency_ms);
                q.set(live, min + ours, max.map(|m| m + ours));
                true
            }
            QueryViewMut::Caps(q) => {
                let template = self.textpad.pad_template_caps();
                let caps = match q.filter() {
                    Some(filter) => {
                        filter.intersect_with_mode(&template, gst::CapsIntersectMode::First)
                    }
                    None => template,
                };
                q.set_result(&caps);
                true
            }
            _ => gst::Pad::query_default(&self.textpad, Some(&*self.obj()), query),
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for LlamaVidCaption {
    const NAME: &'static str = "GstLlamaVidCaption";
    type Type = super::LlamaVidCaption;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let sinkpad =
            gst::Pad::builder_from_template(&klass.pad_template("sink").expect("sink template"))
                .chain_function(|_pad, parent, buffer| {
                    LlamaVidCaption::catch_panic_pad_function(
                        parent,
                        || Err(gst::FlowError::Error),
                        |imp| imp.sink_chain(buffer),
                    )
                })
                .event_function(|_pad, parent, event| {
                    LlamaVidCaption::catch_panic_pad_function(
                        parent,
                        || false,
                        |imp| imp.sink_event(event),
                    )
                })
                .iterate_internal_links_function(|_pad, parent| {
                    let links = parent
                        .and_then(|p| p.downcast_ref::<super::LlamaVidCaption>())
                        .map(|e| vec![e.imp().srcpad.clone()])
                        .unwrap_or_default();
                    gst::Iterator::from_vec(links)
                })
                .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION)
                .build();
        let srcpad =
            gst::Pad::builder_from_template(&klass.pad_template("src").expect("src template"))
                .iterate_internal_links_function(|_pad, parent| {
                    let links = parent
                        .and_then(|p| p.downcast_ref::<super::LlamaVidCaption>())
                        .map(|e| vec![e.imp().sinkpad.clone()])
                        .unwrap_or_default();
                    gst::Iterator::from_vec(links)
                })
                .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION)
                .build();
        let textpad = gst::Pad::builder_from_template(
            &klass.pad_template("text_src").expect("text template"),
        )
        .query_function(|_pad, parent, query| {
            LlamaVidCaption::catch_panic_pad_function(parent, || false, |imp| imp.text_query(query))
        })
        .iterate_internal_links_function(|_pad, _parent| gst::Iterator::from_vec(Vec::new()))
        .build();
        let settings = Settings::default();
        Self {
            sinkpad,
            srcpad,
            textpad,
            state: Mutex::new(State::new(settings.sample_interval_ms)),
            caption_settings: Arc::new(Mutex::new(settings.caption_settings())),
            settings: Mutex::new(settings),
            shared: Arc::new(Shared::default()),
            model: Mutex::new(None),
            worker: Mutex::new(None),
        }
    }
}

fn ms_property(name: &str, nick: &str, blurb: &str, default: u64, min: u64) -> glib::ParamSpec {
    glib::ParamSpecUInt64::builder(name)
        .nick(nick)
        .blurb(blurb)
        .minimum(min)
        .default_value(default)
        .mutable_playing()
        .build()
}

impl ObjectImpl for LlamaVidCaption {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("LLaMA-VID model directory (config.json, weights, tokenizer); the EVA weights and bert-base-uncased are looked up beside it")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("vision-tower")
                    .nick("Vision tower")
                    .blurb("EVA-ViT-G weights file (eva_vit_g.pth); default: mm_vision_tower of config.json, resolved beside the model")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("llm-gguf")
                    .nick("Language model GGUF")
                    .blurb("llama.cpp GGUF file (llama architecture, e.g. Q4_K_M) to take the language model from instead of the checkpoint; the vision side still comes from the model directory")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("prompt")
                    .nick("Prompt")
                    .blurb("Question asked about the video; a change applies to the next caption and to frames encoded after it")
                    .default_value(Some(DEFAULT_PROMPT))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("Where the model runs: auto (CUDA if built with it and a GPU is present, else CPU), cpu, cuda or cuda:N")
                    .default_value(Some(DEFAULT_DEVICE))
                    .mutable_ready()
                    .build(),
                ms_property("sample-interval", "Sample interval", "Running time between sampled frames, in ms (the fps-1 checkpoints were trained on one frame per second)", DEFAULT_SAMPLE_INTERVAL_MS, 1),
                ms_property("window-duration", "Window duration", "Running time of video the caption describes, in ms: older frames leave the window", DEFAULT_WINDOW_DURATION_MS, 0),
                ms_property("caption-interval", "Caption interval", "Running time between captions, in ms", DEFAULT_CAPTION_INTERVAL_MS, 1),
                glib::ParamSpecUInt::builder("max-new-tokens")
                    .nick("Max new tokens")
                    .blurb("Longest caption, in tokens")
                    .minimum(1)
                    .maximum(4096)
                    .default_value(DEFAULT_MAX_NEW_TOKENS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("temperature")
                    .nick("Temperature")
                    .blurb("Sampling temperature; 0 is greedy (deterministic) decoding")
                    .minimum(0.0)
                    .maximum(10.0)
                    .default_value(DEFAULT_TEMPERATURE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("top-p")
                    .nick("Top p")
                    .blurb("Nucleus sampling: probability mass kept when temperature > 0")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_TOP_P)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("seed")
                    .nick("Seed")
                    .blurb("Random seed of sampling (each caption starts from it)")
                    .default_value(DEFAULT_SEED)
                    .mutable_playing()
                    .build(),
                ms_property("latency", "Latency", "Processing latency declared to live pipelines for text_src, in ms; a warning is posted when a caption comes later", DEFAULT_LATENCY_MS, 0),
                glib::ParamSpecEnum::builder_with_default("dtype", Dtype::Auto)
                    .nick("Data type")
                    .blurb("Arithmetic of the model: f32 is exact; bf16 and int8 are faster reduced-precision CPU modes (int8 keeps up with a camera on 2 cores; see the README's performance section); auto is bf16 on AMX CPUs in an mkl build, f16 on CUDA, else f32")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("frame-policy", FramePolicy::Auto)
                    .nick("Frame policy")
                    .blurb("When the model falls behind: drop sampled frames (never stalls video) or wait (every frame encoded)")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("frames-sampled").nick("Frames sampled").blurb("Frames picked for encoding").read_only().build(),
                glib::ParamSpecUInt64::builder("frames-encoded").nick("Frames encoded").blurb("Frames turned into tokens").read_only().build(),
                glib::ParamSpecUInt64::builder("frames-dropped").nick("Frames dropped").blurb("Sampled frames dropped because the model was behind").read_only().build(),
                glib::ParamSpecUInt64::builder("captions").nick("Captions").blurb("Captions produced").read_only().build(),
                glib::ParamSpecString::builder("last-caption").nick("Last caption").blurb("Text of the latest caption").read_only().build(),
                glib::ParamSpecUInt64::builder("last-caption-latency")
                    .nick("Last caption latency")
                    .blurb("Time from the arrival of the latest caption's last frame to the caption, in ms")
                    .read_only()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = lock(&self.settings);
        let path = |v: &glib::Value| {
            v.get::<Option<String>>()
                .ok()
                .flatten()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        match pspec.name() {
            "model" => settings.model = path(value),
            "vision-tower" => settings.vision_tower = path(value),
            "llm-gguf" => settings.llm_gguf = path(value),
            "prompt" => {
                settings.prompt = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| DEFAULT_PROMPT.into())
            }
            "device" => {
                settings.device = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| DEFAULT_DEVICE.into())
            }
            "sample-interval" => {
                settings.sample_interval_ms = value.get().expect("type checked");
                lock(&self.state)
                    .sampler
                    .set_interval(settings.sample_interval_ms.max(1) * MS);
            }
            "window-duration" => settings.window_duration_ms = value.get().expect("type checked"),
            "caption-interval" => settings.caption_interval_ms = value.get().expect("type checked"),
            "max-new-tokens" => settings.max_new_tokens = value.get().expect("type checked"),
            "temperature" => settings.temperature = value.get().expect("type checked"),
            "top-p" => settings.top_p = value.get().expect("type checked"),
            "seed" => settings.seed = value.get().expect("type checked"),
            "latency" => {
                settings.latency_ms = value.get().expect("type checked");
                *lock(&self.shared.declared_latency) = Duration::from_millis(settings.latency_ms);
                drop(settings);
                let obj = self.obj();
                let _ = obj.post_message(gst::message::Latency::builder().src(&*obj).build());
                return;
            }
            "frame-policy" => settings.frame_policy = value.get().expect("type checked"),
            "dtype" => settings.dtype = value.get().expect("type checked"),
            other => unreachable!("unknown property {other}"),
        }
        *lock(&self.caption_settings) = settings.caption_settings();
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let stats = &self.shared.stats;
        let settings = lock(&self.settings);
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        match pspec.name() {
            "model" => path(&settings.model).to_value(),
            "vision-tower" => path(&settings.vision_tower).to_value(),
            "llm-gguf" => path(&settings.llm_gguf).to_value(),
            "prompt" => settings.prompt.to_value(),
            "device" => settings.device.to_value(),
            "sample-interval" => settings.sample_interval_ms.to_value(),
            "window-duration" => settings.window_duration_ms.to_value(),
            "caption-interval" => settings.caption_interval_ms.to_value(),
            "max-new-tokens" => settings.max_new_tokens.to_value(),
            "temperature" => settings.temperature.to_value(),
            "top-p" => settings.top_p.to_value(),
            "seed" => settings.seed.to_value(),
            "latency" => settings.latency_ms.to_value(),
            "frame-policy" => settings.frame_policy.to_value(),
            "dtype" => settings.dtype.to_value(),
            "frames-sampled" => stats.frames_sampled.load(Ordering::Relaxed).to_value(),
            "frames-encoded" => stats.frames_encoded.load(Ordering::Relaxed).to_value(),
            "frames-dropped" => stats.frames_dropped.load(Ordering::Relaxed).to_value(),
            "captions" => stats.captions.load(Ordering::Relaxed).to_value(),
            "last-caption" => lock(&stats.last_caption).0.to_value(),
            "last-caption-latency" => (lock(&stats.last_caption).1.as_millis() as u64).to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        *lock(&self.shared.declared_latency) = Duration::from_millis(DEFAULT_LATENCY_MS);
        let obj = self.obj();
        obj.add_pad(&self.sinkpad).expect("add sink pad");
        obj.add_pad(&self.srcpad).expect("add src pad");
        obj.add_pad(&self.textpad).expect("add text pad");
    }
}

impl GstObjectImpl for LlamaVidCaption {}

impl ElementImpl for LlamaVidCaption {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "LLaMA-VID video captioner",
                "Filter/Analyzer/Video",
                "Passes video through and describes it in text with LLaMA-VID (two tokens per sampled frame)",
                "gst-llamavid developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let video = gst_video::VideoCapsBuilder::new()
                .format_list(frames::FORMATS)
                .build();
            let text = gst::Caps::builder("text/x-raw")
                .field("format", gst::List::new(["utf8", "pango-markup"]))
                .build();
            vec![
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &video,
                )
                .expect("sink"),
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &video,
                )
                .expect("src"),
                gst::PadTemplate::new(
                    "text_src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &text,
                )
                .expect("text_src"),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        gst::debug!(CAT, imp = self, "state change {transition:?}");
        match transition {
            gst::StateChange::NullToReady => {
                if let Err(e) = self.load_model() {
                    self.post_error_message(e);
                    return Err(gst::StateChangeError);
                }
            }
            gst::StateChange::ReadyToPaused => {
                self.shared.stats.reset();
                self.shared.failed.store(false, Ordering::SeqCst);
                self.shared.flushing.store(false, Ordering::SeqCst);
                *lock(&self.shared.timeline) = TextTimeline::default();
                *lock(&self.state) = State::new(lock(&self.settings).sample_interval_ms);
                // Text queued while the pads activate (stream-start, segment) must not be lost.
                self.shared.text.set_flushing(false);
                if let Err(e) = self.start_worker() {
                    self.post_error_message(e);
                    return Err(gst::StateChangeError);
                }
            }
            gst::StateChange::PausedToReady => {
                self.shared.flushing.store(true, Ordering::SeqCst);
                self.shared.signal_eos(None);
                self.stop_worker();
                self.stop_text_task();
            }
            _ => {}
        }

        let success = self.parent_change_state(transition)?;

        match transition {
            gst::StateChange::ReadyToPaused => {
                if let Err(e) = self.start_text_task() {
                    gst::element_imp_error!(
                        self,
                        gst::CoreError::Thread,
                        ("Cannot start the text task: {}", e)
                    );
                    return Err(gst::StateChangeError);
                }
            }
            gst::StateChange::PausedToReady => {
                *lock(&self.shared.pending_meta) = None;
            }
            gst::StateChange::ReadyToNull => {
                // The registry frees the model when the last element using it lets go.
                *lock(&self.model) = None;
            }
            _ => {}
        }
        Ok(success)
    }
}
