//! The element subclass: pads, properties, events, queries and state changes. The work itself
//! is in `captioner` (scheduling, model sharing, the context's limits) and `model` (LLaMA-VID);
//! this file is glue. Nothing is posted on the bus while one of the element's locks is held: a
//! synchronous bus handler may call back into the element (set a property, change state).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::frames;
use super::liveness::{upstream_liveness, Liveness};
use super::output::{ElementOutput, Shared};
use super::settings::{
    self, default_caption_settings, Settings, DEFAULT_DEVICE, DEFAULT_PROMPT, MS,
};
use super::text::{push_item, Popped, TextItem, TextTimeline};
use super::{Emit, FramePolicy, CAPTION_META, CAT};
use crate::captioner::backend::CaptionBackend;
use crate::captioner::limits::{check_prompt, check_prompt_text, check_settings};
use crate::captioner::models::{load_shared, LoadError, SharedModel};
use crate::captioner::remote::RemoteCaptions;
use crate::captioner::{
    CaptionSettings, FrameJob, FrameSampler, Job, OwnedFrame, Pushed, QueuePolicy, StreamHandle,
};
use crate::model::remote::RemoteLanguageModel;
use crate::model::LlamaVid;
use crate::sync::lock;

/// Sampled frames that may wait for the model. Copies of frames, not upstream buffers.
const QUEUE_CAPACITY: usize = 4;

/// Per-stream state of the streaming thread.
struct State {
    video_info: Option<gst_video::VideoInfo>,
    segment: gst::FormattedSegment<gst::ClockTime>,
    sampler: FrameSampler,
    /// Whether upstream is live, once known (asked again while unknown).
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

/// A frame the streaming thread picked for the model.
struct Sampled {
    running_time: u64,
    next_sample_due: u64,
    frame: OwnedFrame,
}

pub struct LlamaVidCaption {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    textpad: gst::Pad,
    settings: Mutex<Settings>,
    /// The captioning settings: the one copy, read by the scheduler before each of this
    /// stream's jobs.
    caption: Arc<Mutex<CaptionSettings>>,
    state: Mutex<State>,
    shared: Arc<Shared>,
    model: Mutex<Option<Arc<SharedModel>>>,
    /// This element's stream on the model's scheduler, while PAUSED or PLAYING.
    stream: Mutex<Option<Arc<StreamHandle<LlamaVid>>>>,
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

    /// Whether upstream is live, asked once it is known; unknown counts as live (a live
    /// pipeline must never wait on the model) and is asked again at the next sampled frame.
    fn upstream_is_live(&self) -> bool {
        if let Some(live) = lock(&self.state).live {
            return live;
        }
        // Asked without the state lock: the query travels upstream.
        let liveness = upstream_liveness(&self.sinkpad);
        gst::debug!(CAT, imp = self, "upstream liveness: {liveness:?}");
        match liveness.is_live() {
            Some(live) => {
                lock(&self.state).live = Some(live);
                live
            }
            None => {
                debug_assert_eq!(liveness, Liveness::Unknown);
                true
            }
        }
    }

    fn post_progress(&self, kind: gst::ProgressType, text: &str) {
        let obj = self.obj();
        let _ = obj.post_message(
            gst::message::Progress::builder(kind, "load", text)
                .src(&*obj)
                .build(),
        );
    }

    /// Loads (or shares) the model named by the properties, and checks the settings against
    /// it: a prompt it cannot take fails here, a window longer than its context is a warning.
    fn load_model(&self) -> Result<(), gst::ErrorMessage> {
        let mut request = lock(&self.settings)
            .model_request()
            .map_err(|e| gst::error_msg!(gst::LibraryError::Settings, ("{}", e)))?;
        // A hub id or URL becomes files in the cache (downloaded now if need be).
        let fetched = super::fetch::fetch_model(
            self.obj().upcast_ref(),
            &request.model_dir.to_string_lossy(),
            request
                .vision_tower
                .as_ref()
                .map(|p| p.to_string_lossy())
                .as_deref(),
        )?;
        request.model_dir = fetched.model_dir;
        request.vision_tower = fetched.vision_tower;
        request.bert_dir = fetched.bert_dir;
        self.post_progress(gst::ProgressType::Start, "Loading the LLaMA-VID model");
        gst::info!(CAT, imp = self, "loading {request:?}");
        let started = Instant::now();
        let (shared, loaded_now) = match load_shared(&request) {
            Ok(loaded) => loaded,
            Err(e) => {
                self.post_progress(gst::ProgressType::Error, "Loading the model failed");
                return Err(match e {
                    LoadError::Device(e) => {
                        gst::error_msg!(gst::LibraryError::Settings, ("{}", e))
                    }
                    LoadError::Thread(e) => gst::error_msg!(
                        gst::CoreError::Thread,
                        ("Cannot start the model's scheduler thread: {}", e)
                    ),
                    LoadError::Model(e) => {
                        if let Some(backtrace) = e.backtrace() {
                            gst::error!(CAT, imp = self, "{}\n{backtrace}", e.summary());
                        }
                        gst::error_msg!(
                            gst::ResourceError::OpenRead,
                            (
                                "Cannot load the LLaMA-VID model from {}: {}",
                                request.model_dir.display(),
                                e.summary()
                            )
                        )
                    }
                });
            }
        };
        for note in shared.model.notes() {
            gst::warning!(CAT, imp = self, "{note}");
        }
        for note in shared.sharing_notes(&request) {
            gst::warning!(CAT, imp = self, "{note}");
            gst::element_imp_warning!(self, gst::LibraryError::Settings, ("{}", note));
        }
        gst::info!(CAT, imp = self, "model ready after {:?}", started.elapsed());
        let text = if loaded_now {
            "LLaMA-VID model loaded"
        } else {
            "LLaMA-VID model shared with another element"
        };
        self.post_progress(gst::ProgressType::Complete, text);

        let caption = lock(&self.caption).clone();
        let sample_interval = lock(&self.settings).sample_interval_ms.max(1) * MS;
        let warnings = check_settings(&*shared.model, &caption, sample_interval).map_err(|e| {
            gst::error_msg!(
                gst::LibraryError::Settings,
                ("The settings do not suit this model: {}", e)
            )
        })?;
        for warning in warnings {
            gst::warning!(CAT, imp = self, "{warning}");
            gst::element_imp_warning!(self, gst::LibraryError::Settings, ("{}", warning));
        }
        *lock(&self.model) = Some(shared);
        Ok(())
    }

    /// Attaches this element's stream to the model's scheduler.
    fn attach_stream(&self) -> Result<(), gst::ErrorMessage> {
        let Some(shared) = lock(&self.model).clone() else {
            return Err(gst::error_msg!(
                gst::CoreError::StateChange,
                ("No model loaded")
            ));
        };
        let server = lock(&self.settings).server_config()?;
        let remote = match server {
            Some(config) => {
                gst::info!(
                    CAT,
                    imp = self,
                    "language model `{}` on {}",
                    config.model,
                    config.url
                );
                let model = RemoteLanguageModel::new(config)
                    .map_err(|e| gst::error_msg!(gst::LibraryError::Settings, ("{}", e)))?;
                let captions = RemoteCaptions::new(shared.model.clone(), model).map_err(|e| {
                    gst::error_msg!(gst::LibraryError::Settings, ("{}", e.summary()))
                })?;
                Some(Box::new(captions) as Box<dyn CaptionBackend<_>>)
            }
            None => None,
        };
        let output = Arc::new(ElementOutput {
            element: self.obj().downgrade(),
            shared: self.shared.clone(),
        });
        let stream =
            shared
                .scheduler
                .attach_with(self.caption.clone(), output, QUEUE_CAPACITY, remote);
        *lock(&self.stream) = Some(Arc::new(stream));
        Ok(())
    }

    /// Leaves the scheduler: returns at once, the model's work for this stream is dropped
    /// (other elements sharing the model are not touched).
    fn detach_stream(&self) {
        let stream = lock(&self.stream).take();
        if let Some(stream) = stream {
            stream.detach();
        }
    }

    /// This element's stream, cloned out of its lock (a submit may wait for room, and a flush
    /// or state change must reach the stream meanwhile).
    fn stream(&self) -> Option<Arc<StreamHandle<LlamaVid>>> {
        lock(&self.stream).clone()
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
                Popped::Item(item) => push_item(&imp.textpad, item),
            }
        })
    }

    fn stop_text_task(&self) {
        self.shared.text.set_flushing(true);
        let _ = self.textpad.stop_task();
    }

    /// Whether `question` can become the prompt: against the model when one is loaded, else
    /// as text (the model checks it again at READY).
    fn usable_prompt(&self, question: &str) -> Result<(), String> {
        let model = lock(&self.model).clone();
        match model {
            Some(shared) => check_prompt(&*shared.model, question).map(drop),
            None => check_prompt_text(question),
        }
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

    /// Decides whether `buffer` is sampled and copies the frame out if so; an `Err` is an
    /// error to post (after the state lock is released).
    fn sample(&self, buffer: &gst::Buffer) -> Result<Option<Sampled>, (gst::FlowError, String)> {
        let mut state = lock(&self.state);
        let Some(info) = state.video_info.clone() else {
            return Err((
                gst::FlowError::NotNegotiated,
                "Received a buffer before caps".into(),
            ));
        };
        let Some(rt) = self.running_time(&mut state, buffer) else {
            return Ok(None);
        };
        self.shared.preroll_text(rt);
        if !state.sampler.sample(rt) {
            return Ok(None);
        }
        let next_sample_due = state.sampler.next_due().unwrap_or(rt);
        drop(state);
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer.as_ref(), &info)
            .ok()
            .and_then(|mapped| frames::view(&mapped).map(|v| OwnedFrame::copy_from(&v)));
        match frame {
            Some(frame) => Ok(Some(Sampled {
                running_time: rt,
                next_sample_due,
                frame,
            })),
            None => Err((
                gst::FlowError::Error,
                format!(
                    "Cannot map a {}x{} {:?} frame",
                    info.width(),
                    info.height(),
                    info.format()
                ),
            )),
        }
    }

    fn sink_chain(&self, mut buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(gst::FlowError::Error);
        }
        match self.sample(&buffer) {
            Ok(Some(sampled)) => self.submit_frame(&buffer, sampled),
            Ok(None) => {}
            Err((flow, message)) => {
                let domain = if flow == gst::FlowError::NotNegotiated {
                    gst::CoreError::Negotiation
                } else {
                    gst::CoreError::Failed
                };
                gst::element_imp_error!(self, domain, ("{}", message));
                return Err(flow);
            }
        }

        let pending = lock(&self.shared.pending_meta).take();
        if let Some((event, pts)) = pending {
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

    fn submit_frame(&self, buffer: &gst::Buffer, sampled: Sampled) {
        let live = self.upstream_is_live();
        let policy = self.policy(live);
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        let running_time = sampled.running_time;
        let job = Job::Frame {
            epoch,
            job: FrameJob {
                running_time,
                next_sample_due: sampled.next_sample_due,
                arrived: Instant::now(),
                frame: sampled.frame,
            },
        };
        let stats = &self.shared.stats;
        stats.frames_sampled.fetch_add(1, Ordering::Relaxed);
        let pushed = match self.stream() {
            Some(stream) => stream.submit(job, policy),
            None => Pushed::Refused(job),
        };
        if let Pushed::Replaced(_) = pushed {
            let dropped = stats.frames_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let processed = stats.frames_sampled.load(Ordering::Relaxed) - dropped;
            gst::debug!(
                CAT,
                imp = self,
                "model busy: dropped the oldest waiting frame ({dropped} so far)"
            );
            let rt = gst::ClockTime::from_nseconds(running_time);
            let stream_time = lock(&self.state)
                .segment
                .to_stream_time(buffer.pts().unwrap_or(rt));
            let obj = self.obj();
            let qos = gst::message::Qos::builder(live)
                .running_time(rt)
                .stream_time(stream_time)
                .timestamp(buffer.pts())
                .duration(buffer.duration())
                .stats(
                    gst::format::Buffers::from_u64(processed),
                    gst::format::Buffers::from_u64(dropped),
                )
                .other_field(
                    "reason",
                    "the captioning model is slower than the sampling rate; oldest waiting \
                     frame dropped",
                )
                .src(&*obj)
                .build();
            let _ = obj.post_message(qos);
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
                if let Some(stream) = self.stream() {
                    stream.flush_start();
                }
                self.shared.text.set_flushing(true);
                let _ = self.textpad.push_event(event.clone());
                let _ = self.textpad.pause_task();
                self.srcpad.push_event(event)
            }
            EventView::FlushStop(_) => {
                let epoch = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(stream) = self.stream() {
                    stream.flush_stop(epoch);
                }
                {
                    let mut state = lock(&self.state);
                    state.sampler.reset();
                    state.last_running_time = None;
                }
                lock(&self.shared.timeline).reset();
                // After a seek the first caption is news again.
                lock(&self.shared.events).filter.reset();
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
                // The handle is cloned out of the lock: the submit may wait for room.
                let submitted = match self.stream() {
                    Some(stream) => matches!(
                        stream.submit(Job::Eos { epoch }, QueuePolicy::Block),
                        Pushed::Queued
                    ),
                    None => false,
                };
                if submitted {
                    // The final caption goes out before EOS, on both pads.
                    self.shared.wait_eos(epoch);
                }
                if !submitted || self.shared.failed.load(Ordering::SeqCst) {
                    // Nothing on the model's side to finish the text stream: end it here.
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
            caption: Arc::new(Mutex::new(default_caption_settings())),
            settings: Mutex::new(settings),
            shared: Arc::new(Shared::default()),
            model: Mutex::new(None),
            stream: Mutex::new(None),
        }
    }
}

impl ObjectImpl for LlamaVidCaption {
    fn properties() -> &'static [glib::ParamSpec] {
        settings::properties()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let string = |v: &glib::Value| v.get::<Option<String>>().ok().flatten();
        let non_empty = |v: &glib::Value| string(v).filter(|s| !s.trim().is_empty());
        let path = |v: &glib::Value| string(v).filter(|s| !s.is_empty()).map(PathBuf::from);
        let number = |v: &glib::Value| v.get::<u64>().expect("type checked");
        match pspec.name() {
            "model" => lock(&self.settings).model = path(value),
            "vision-tower" => lock(&self.settings).vision_tower = path(value),
            "llm-gguf" => lock(&self.settings).llm_gguf = path(value),
            "device" => {
                lock(&self.settings).device = string(value).unwrap_or_else(|| DEFAULT_DEVICE.into())
            }
            "threads" => lock(&self.settings).threads = value.get().expect("type checked"),
            "encode-batch" => {
                lock(&self.settings).encode_batch = value.get().expect("type checked")
            }
            "caption-batch" => {
                lock(&self.settings).caption_batch = value.get().expect("type checked")
            }
            "dtype" => lock(&self.settings).dtype = value.get().expect("type checked"),
            "lower-thread-priority" => {
                lock(&self.settings).lower_thread_priority = value.get().expect("type checked")
            }
            "tune-allocator" => {
                lock(&self.settings).tune_allocator = value.get().expect("type checked")
            }
            "cpu-isa" => lock(&self.settings).cpu_isa = value.get().expect("type checked"),
            "llm-server" => lock(&self.settings).llm_server = non_empty(value),
            "llm-server-model" => lock(&self.settings).llm_server_model = non_empty(value),
            "llm-server-timeout" => {
                lock(&self.settings).llm_server_timeout_ms = value.get().expect("type checked")
            }
            "frame-policy" => {
                lock(&self.settings).frame_policy = value.get().expect("type checked")
            }
            "emit" => {
                lock(&self.shared.events).on_change =
                    value.get::<Emit>().expect("type checked") == Emit::OnChange
            }
            "change-threshold" => {
                lock(&self.shared.events).threshold = value.get().expect("type checked")
            }
            "sample-interval" => {
                let ms = number(value);
                lock(&self.settings).sample_interval_ms = ms;
                lock(&self.state).sampler.set_interval(ms.max(1) * MS);
            }
            "latency" => {
                let ms = number(value);
                lock(&self.settings).latency_ms = ms;
                *lock(&self.shared.declared_latency) = Duration::from_millis(ms);
                let obj = self.obj();
                let _ = obj.post_message(gst::message::Latency::builder().src(&*obj).build());
            }
            "prompt" => {
                let question = string(value).unwrap_or_else(|| DEFAULT_PROMPT.into());
                match self.usable_prompt(&question) {
                    Ok(()) => lock(&self.caption).prompt = question,
                    Err(reason) => {
                        let kept = lock(&self.caption).prompt.clone();
                        gst::warning!(CAT, imp = self, "prompt {question:?} refused: {reason}");
                        let question: String = question.chars().take(200).collect();
                        gst::element_imp_warning!(
                            self,
                            gst::LibraryError::Settings,
                            (
                                "The new prompt cannot be used, the previous one stays: {}",
                                reason
                            ),
                            ["refused: {:?}; kept: {:?}", question, kept]
                        );
                    }
                }
            }
            name => {
                let mut caption = lock(&self.caption);
                match name {
                    "window-duration" => caption.window_duration = number(value) * MS,
                    "caption-interval" => caption.caption_interval = number(value).max(1) * MS,
                    "max-new-tokens" => {
                        caption.params.max_new_tokens =
                            value.get::<u32>().expect("type checked") as usize
                    }
                    "temperature" => {
                        caption.params.temperature = value.get().expect("type checked")
                    }
                    "top-p" => caption.params.top_p = value.get().expect("type checked"),
                    "seed" => caption.params.seed = value.get().expect("type checked"),
                    other => unreachable!("unknown property {other}"),
                }
            }
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let stats = &self.shared.stats;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let counter = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed).to_value();
        match pspec.name() {
            "model" => path(&lock(&self.settings).model).to_value(),
            "vision-tower" => path(&lock(&self.settings).vision_tower).to_value(),
            "llm-gguf" => path(&lock(&self.settings).llm_gguf).to_value(),
            "device" => lock(&self.settings).device.to_value(),
            "threads" => lock(&self.settings).threads.to_value(),
            "encode-batch" => lock(&self.settings).encode_batch.to_value(),
            "caption-batch" => lock(&self.settings).caption_batch.to_value(),
            "dtype" => lock(&self.settings).dtype.to_value(),
            "lower-thread-priority" => lock(&self.settings).lower_thread_priority.to_value(),
            "tune-allocator" => lock(&self.settings).tune_allocator.to_value(),
            "cpu-isa" => lock(&self.settings).cpu_isa.to_value(),
            "llm-server" => lock(&self.settings).llm_server.to_value(),
            "llm-server-model" => lock(&self.settings).llm_server_model.to_value(),
            "llm-server-timeout" => lock(&self.settings).llm_server_timeout_ms.to_value(),
            "frame-policy" => lock(&self.settings).frame_policy.to_value(),
            "emit" => if lock(&self.shared.events).on_change {
                Emit::OnChange
            } else {
                Emit::Always
            }
            .to_value(),
            "change-threshold" => lock(&self.shared.events).threshold.to_value(),
            "sample-interval" => lock(&self.settings).sample_interval_ms.to_value(),
            "latency" => lock(&self.settings).latency_ms.to_value(),
            "prompt" => lock(&self.caption).prompt.to_value(),
            "window-duration" => (lock(&self.caption).window_duration / MS).to_value(),
            "caption-interval" => (lock(&self.caption).caption_interval / MS).to_value(),
            "max-new-tokens" => (lock(&self.caption).params.max_new_tokens as u32).to_value(),
            "temperature" => lock(&self.caption).params.temperature.to_value(),
            "top-p" => lock(&self.caption).params.top_p.to_value(),
            "seed" => lock(&self.caption).params.seed.to_value(),
            "frames-sampled" => counter(&stats.frames_sampled),
            "frames-encoded" => counter(&stats.frames_encoded),
            "frames-dropped" => counter(&stats.frames_dropped),
            "frames-batched" => counter(&stats.frames_batched),
            "captions" => counter(&stats.captions),
            "captions-suppressed" => counter(&stats.captions_suppressed),
            "last-caption" => lock(&stats.last_caption).0.to_value(),
            "last-caption-latency" => (lock(&stats.last_caption).1.as_millis() as u64).to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        *lock(&self.shared.declared_latency) = Duration::from_millis(settings::DEFAULT_LATENCY_MS);
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
                self.shared
                    .text_needs_preroll
                    .store(false, Ordering::SeqCst);
                lock(&self.shared.events).filter.reset();
                *lock(&self.state) = State::new(lock(&self.settings).sample_interval_ms);
                // Text queued while the pads activate (stream-start, segment) must not be lost.
                self.shared.text.set_flushing(false);
                if let Err(e) = self.attach_stream() {
                    self.post_error_message(e);
                    return Err(gst::StateChangeError);
                }
            }
            // The text sink loses its preroll; the next frame lets it preroll again. (At the
            // start and after a flush the sampler takes the first frame, whose encode advances
            // the text stream.)
            gst::StateChange::PlayingToPaused => {
                self.shared.text_needs_preroll.store(true, Ordering::SeqCst);
            }
            gst::StateChange::PausedToReady => {
                self.shared.flushing.store(true, Ordering::SeqCst);
                self.shared.signal_eos(None);
                self.detach_stream();
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
