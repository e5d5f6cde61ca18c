//! Shared helpers for the `llamavidcaption` integration tests in `tests/`.
//!
//! - [`init`], [`caption_element`], [`configure_caption`]: the element, registered statically,
//!   with the tiny fixture model and settings that caption fast and deterministically;
//!   [`copy_fixture`] for tests that damage a model;
//! - [`CaptionRun`]: the element in a `gst_check::Harness`, with its bus and text recorded;
//!   [`test_pipeline`]: the element behind `videotestsrc` in a real pipeline;
//! - [`video_info`], [`padded_info`], [`video_frame`]: hand-made frames of every accepted format
//!   and memory layout;
//! - [`Caption`]: the fields of a `llamavid-caption` bus message or `LlamaVidCaptionMeta`;
//! - [`TextLog`], [`link_text_sink`], [`record_pad`]: what comes out of `text_src`, in order;
//! - [`BusLog`], [`record_bus`], [`run_to_eos`], [`set_state_within`], [`within`],
//!   [`StopOnDrop`]: nothing may hang a test or leave a pipeline playing;
//! - [`matroska_content`]: the video frames and subtitles of a Matroska file;
//! - [`gst_tool`]: `gst-launch-1.0` and `gst-inspect-1.0` with this build of the plugin, killed
//!   on timeout;
//! - [`fake_llm_server`]: a test double of a vLLM (OpenAI-compatible) server, scripted;
//! - [`hub_mirror`]: `HubMirrorDouble`, a test double of the Hugging Face hub on 127.0.0.1, and
//!   `FixtureHub`, the fixture served through it;
//! - [`hostile`]: hand-made hostile model files (pickles, zips); [`alloc_meter`]: an allocator
//!   for test binaries that refuses huge allocations and measures what a call allocated;
//!   [`process`]: the process's resident memory and threads.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use gst::prelude::*;

pub mod alloc_meter;
pub mod fake_llm_server;
pub mod fuzz;
pub mod hostile;
pub mod hub_mirror;
pub mod process;

pub use gst;
pub use gst_check;
pub use gst_video;

/// One millisecond in nanoseconds, the unit of timestamps in bus messages.
pub const MS: u64 = 1_000_000;

/// How long any single wait in a test may take before the test fails instead of hanging. Far
/// above what the tiny model needs (a caption takes ~0.1 s), so only a hang trips it.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Name of the bus message and of the custom meta the element produces.
pub const CAPTION_MESSAGE: &str = "llamavid-caption";
pub const CAPTION_META: &str = "LlamaVidCaptionMeta";

// ---------------------------------------------------------------------------------------------
// Set-up and fixture
// ---------------------------------------------------------------------------------------------

/// Initialises GStreamer and registers the plugin statically, once per test process.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gstllamavid::plugin_register_static().expect("the llamavid plugin registers");
    });
}

/// The fixture: `LLAMAVID_FIXTURE` (relative paths from the repository root), else
/// `../shared/fixtures/llamavid-tiny-a` beside the repository.
pub fn fixture_dir() -> PathBuf {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = match std::env::var_os("LLAMAVID_FIXTURE") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => repo_root.join(dir),
        None => repo_root.join("../shared/fixtures/llamavid-tiny-a"),
    };
    assert!(
        dir.is_dir(),
        "fixture not found at {} (set LLAMAVID_FIXTURE)",
        dir.display()
    );
    dir
}

/// The model directory inside a fixture tree: the sub-folder with `config.json` and the shard
/// index. Found by listing, so that other fixtures (other folder names) work too.
pub fn model_dir_in(root: &Path) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.join("config.json").is_file() && p.join("pytorch_model.bin.index.json").is_file()
        })
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no model directory in {}", root.display()))
}

/// The fixture's model directory.
pub fn model_dir() -> PathBuf {
    model_dir_in(&fixture_dir())
}

/// The element's default `prompt`.
pub const DEFAULT_PROMPT: &str = "Describe what is happening in the video.";

/// How many frames of video the fixture model's context holds beside `question` and a caption
/// of `max_new_tokens` (asked of the model itself, so that other fixtures work too).
pub fn fixture_frames_that_fit(question: &str, max_new_tokens: usize) -> usize {
    use gstllamavid::model::{LlamaVid, LoadOptions};
    let model = LlamaVid::load(&LoadOptions::new(model_dir())).expect("the fixture loads");
    let prompt = model.prompt(question).expect("the question is usable");
    model.frames_that_fit(&prompt, max_new_tokens)
}

/// A writable copy of the whole fixture tree (the model finds its EVA file and bert folder
/// beside itself, so the tree is copied, not only the model directory). Returns the temporary
/// directory (removed on drop) and the model directory inside it.
pub fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("create directory");
        for entry in std::fs::read_dir(from).expect("list fixture") {
            let entry = entry.expect("fixture entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy fixture file");
                // The fixture is read-only; copies must be writable so tests can damage them.
                let mut perms = std::fs::metadata(&target).expect("metadata").permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                perms.set_readonly(false);
                std::fs::set_permissions(&target, perms).expect("make writable");
            }
        }
    }
    let tmp = tempfile::tempdir().expect("temporary directory");
    copy_dir(&fixture_dir(), tmp.path());
    let model = model_dir_in(tmp.path());
    (tmp, model)
}

/// A `llamavidcaption` configured by [`configure_caption`].
pub fn caption_element() -> gst::Element {
    init();
    let element = gst::ElementFactory::make("llamavidcaption")
        .build()
        .expect("llamavidcaption is registered");
    configure_caption(&element);
    element
}

/// Sets the fixture model, the CPU, and settings that caption fast: one frame sampled every
/// 100 ms, a caption every 500 ms of at most 4 tokens, greedy decoding (the default), and
/// `frame-policy=wait` so that no sampled frame is ever dropped (test sources may say they are
/// live). Tests change what they need with `set_property`.
pub fn configure_caption(element: &gst::Element) {
    element.set_property("model", model_dir().to_str().expect("UTF-8 path"));
    element.set_property("device", "cpu");
    element.set_property("sample-interval", 100u64);
    element.set_property("caption-interval", 500u64);
    element.set_property("max-new-tokens", 4u32);
    element.set_property_from_str("frame-policy", "wait");
}

/// `videotestsrc {source_props} ! {format} 64x48 at 10 fps ! llamavidcaption name=c ! fakesink`
/// with `c.text_src` to another fakesink, recorded; the element set up by
/// [`configure_caption`]. Sinks do not sync: the model sets the pace.
pub fn test_pipeline(source_props: &str, format: &str) -> (gst::Pipeline, gst::Element, TextLog) {
    init();
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc {source_props} \
         ! video/x-raw,format={format},width=64,height=48,framerate=10/1 \
         ! llamavidcaption name=c ! fakesink sync=false  c.text_src ! fakesink sync=false"
    ))
    .expect("pipeline")
    .downcast::<gst::Pipeline>()
    .expect("a pipeline");
    let caption = pipeline.by_name("c").expect("caption element");
    configure_caption(&caption);
    let text = record_pad(&caption.static_pad("text_src").expect("text_src"));
    (pipeline, caption, text)
}

// ---------------------------------------------------------------------------------------------
// Video frames
// ---------------------------------------------------------------------------------------------

/// Raw video caps at 10 frames per second.
pub fn video_info(format: gst_video::VideoFormat, width: u32, height: u32) -> gst_video::VideoInfo {
    init();
    gst_video::VideoInfo::builder(format, width, height)
        .fps(gst::Fraction::new(10, 1))
        .build()
        .expect("valid video info")
}

/// The same format and size with every plane moved to `extra_offset` bytes further into the
/// buffer and every line `extra_stride` bytes longer than GStreamer's default layout: what a
/// hardware decoder or a padded pool hands out, described by a `VideoMeta`.
pub fn padded_info(
    info: &gst_video::VideoInfo,
    extra_offset: usize,
    extra_stride: i32,
) -> gst_video::VideoInfo {
    let strides: Vec<i32> = info.stride().iter().map(|s| s + extra_stride).collect();
    let fmt = info.format_info();
    let mut offsets = Vec::with_capacity(strides.len());
    let mut next = extra_offset;
    for (plane, stride) in strides.iter().enumerate() {
        offsets.push(next);
        let rows = fmt.scale_height(plane as u8, info.height()) as usize;
        next += *stride as usize * rows + extra_offset;
    }
    gst_video::VideoInfo::builder(info.format(), info.width(), info.height())
        .fps(info.fps())
        .stride(&strides)
        .offset(&offsets)
        .build()
        .expect("valid padded video info")
}

/// The value of component `c` (R, G, B for RGB formats; Y, U, V for YUV) at pixel (x, y) of
/// picture number `picture`: smooth gradients that move with `picture`, so that the model sees
/// something different in different pictures.
fn pattern(c: usize, x: u32, y: u32, picture: u32) -> u8 {
    let v = match c {
        0 => x * 255 / 63 + picture * 37,
        1 => y * 255 / 47 + picture * 59,
        2 => (x + y) * 4 + picture * 83,
        _ => 255, // alpha: opaque
    };
    (v % 256) as u8
}

/// A frame laid out as `info` says (strides, offsets), showing picture number `picture`.
/// Padding bytes hold 0xAB, so an element that reads them sees garbage. A `VideoMeta` is
/// attached when the layout is not GStreamer's default for the caps.
pub fn video_frame(info: &gst_video::VideoInfo, picture: u32) -> gst::Buffer {
    let fmt = info.format_info();
    // `info.size()` is that of the default layout; a custom one may need more.
    let size = (0..fmt.n_planes() as usize)
        .map(|p| {
            info.offset()[p]
                + info.stride()[p] as usize * fmt.scale_height(p as u8, info.height()) as usize
        })
        .max()
        .unwrap_or(0)
        .max(info.size());
    let mut data = vec![0xABu8; size];
    for c in 0..fmt.n_components() as usize {
        let plane = fmt.plane()[c] as usize;
        let offset = info.offset()[plane] + fmt.poffset()[c] as usize;
        let stride = info.stride()[plane] as usize;
        let pstride = fmt.pixel_stride()[c] as usize;
        let (wsub, hsub) = (fmt.w_sub()[c], fmt.h_sub()[c]);
        let cw = fmt.scale_width(c as u8, info.width());
        let ch = fmt.scale_height(c as u8, info.height());
        for cy in 0..ch {
            for cx in 0..cw {
                data[offset + cy as usize * stride + cx as usize * pstride] =
                    pattern(c, cx << wsub, cy << hsub, picture);
            }
        }
    }
    let default = gst_video::VideoInfo::builder(info.format(), info.width(), info.height())
        .build()
        .expect("default layout");
    let custom_layout = default.stride() != info.stride() || default.offset() != info.offset();
    let mut buffer = gst::Buffer::from_mut_slice(data);
    if custom_layout {
        gst_video::VideoMeta::add_full(
            buffer.get_mut().expect("new buffer"),
            gst_video::VideoFrameFlags::empty(),
            info.format(),
            info.width(),
            info.height(),
            info.offset(),
            info.stride(),
        )
        .expect("video meta");
    }
    buffer
}

/// Sets PTS and duration (in ms) of a buffer.
pub fn timed(mut buffer: gst::Buffer, pts_ms: u64, duration_ms: u64) -> gst::Buffer {
    {
        let b = buffer.get_mut().expect("writable buffer");
        b.set_pts(gst::ClockTime::from_mseconds(pts_ms));
        b.set_duration(gst::ClockTime::from_mseconds(duration_ms));
    }
    buffer
}

// ---------------------------------------------------------------------------------------------
// Captions: bus messages and meta
// ---------------------------------------------------------------------------------------------

/// The fields of a caption, as the bus message and the meta carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    pub text: String,
    pub start: u64,
    pub end: u64,
    pub pts: u64,
    pub frames: u32,
    pub latency: u64,
    pub prompt: String,
    /// Captions decoded together when this one finished.
    pub batch: u32,
}

impl Caption {
    /// Reads the fields, failing the test when one is missing or of another type.
    pub fn from_structure(s: &gst::StructureRef) -> Self {
        fn field<'a, T: gst::glib::value::FromValue<'a>>(
            s: &'a gst::StructureRef,
            name: &str,
        ) -> T {
            s.get::<T>(name).unwrap_or_else(|e| {
                panic!(
                    "field `{name}` of {s} is not a {}: {e}",
                    std::any::type_name::<T>()
                )
            })
        }
        Caption {
            text: field::<String>(s, "text"),
            start: field::<u64>(s, "start"),
            end: field::<u64>(s, "end"),
            pts: field::<u64>(s, "pts"),
            frames: field::<u32>(s, "frames"),
            latency: field::<u64>(s, "latency"),
            prompt: field::<String>(s, "prompt"),
            batch: field::<u32>(s, "batch"),
        }
    }

    /// The caption of a `llamavid-caption` element message, `None` for any other message.
    pub fn from_message(msg: &gst::Message) -> Option<Self> {
        match msg.view() {
            gst::MessageView::Element(e) => e
                .structure()
                .filter(|s| s.name() == CAPTION_MESSAGE)
                .map(Self::from_structure),
            _ => None,
        }
    }

    /// The caption attached to a video buffer as `LlamaVidCaptionMeta`, if any.
    pub fn from_meta(buffer: &gst::BufferRef) -> Option<Self> {
        gst::meta::CustomMeta::from_buffer(buffer, CAPTION_META)
            .ok()
            .map(|meta| Self::from_structure(meta.structure()))
    }
}

/// The captions among `messages`, in order.
pub fn captions(messages: &[gst::Message]) -> Vec<Caption> {
    messages.iter().filter_map(Caption::from_message).collect()
}

/// Error messages as "message (debug)" strings.
pub fn errors(messages: &[gst::Message]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m.view() {
            gst::MessageView::Error(e) => Some(format!(
                "{} ({})",
                e.error().message(),
                e.debug().map(|d| d.to_string()).unwrap_or_default()
            )),
            _ => None,
        })
        .collect()
}

/// Warning messages as "message (debug)" strings.
pub fn warnings(messages: &[gst::Message]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m.view() {
            gst::MessageView::Warning(w) => Some(format!(
                "{} ({})",
                w.error().message(),
                w.debug().map(|d| d.to_string()).unwrap_or_default()
            )),
            _ => None,
        })
        .collect()
}

/// A bus given to a lone element (no pipeline), recording everything it posts.
pub struct BusLog {
    pub bus: gst::Bus,
    seen: Vec<gst::Message>,
}

impl BusLog {
    /// Gives `element` a new bus.
    pub fn attach(element: &gst::Element) -> Self {
        let bus = gst::Bus::new();
        element.set_bus(Some(&bus));
        Self {
            bus,
            seen: Vec::new(),
        }
    }

    /// Waits for the next caption message; fails on an error message or after [`TIMEOUT`].
    pub fn next_caption(&mut self) -> Caption {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self
                .bus
                .timed_pop(gst::ClockTime::from_nseconds(left.as_nanos() as u64))
            else {
                panic!(
                    "no caption within {TIMEOUT:?}; messages so far: {:?}",
                    self.seen
                );
            };
            self.seen.push(msg.clone());
            if let Some(error) = errors(std::slice::from_ref(&msg)).pop() {
                panic!("error instead of a caption: {error}");
            }
            if let Some(caption) = Caption::from_message(&msg) {
                return caption;
            }
        }
    }

    /// Everything posted so far (including what `next_caption` consumed).
    pub fn drain(&mut self) -> &[gst::Message] {
        while let Some(msg) = self.bus.pop() {
            self.seen.push(msg);
        }
        &self.seen
    }

    pub fn captions(&mut self) -> Vec<Caption> {
        captions(self.drain())
    }

    pub fn errors(&mut self) -> Vec<String> {
        errors(self.drain())
    }

    pub fn warnings(&mut self) -> Vec<String> {
        warnings(self.drain())
    }
}

/// Every message posted on `bus`, recorded as it is posted (a sync handler): unlike popping,
/// nothing is lost when a pipeline going to NULL flushes its bus.
pub fn record_bus(bus: &gst::Bus) -> Arc<Mutex<Vec<gst::Message>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let recorder = log.clone();
    bus.set_sync_handler(move |_bus, msg| {
        recorder.lock().unwrap().push(msg.clone());
        gst::BusSyncReply::Pass
    });
    log
}

// ---------------------------------------------------------------------------------------------
// The text stream
// ---------------------------------------------------------------------------------------------

/// One thing that came out of `text_src`.
#[derive(Debug, Clone)]
pub enum TextItem {
    Buffer {
        pts: Option<gst::ClockTime>,
        duration: Option<gst::ClockTime>,
        text: String,
    },
    Event(gst::Event),
}

impl TextItem {
    pub fn event(&self) -> Option<&gst::Event> {
        match self {
            TextItem::Event(e) => Some(e),
            TextItem::Buffer { .. } => None,
        }
    }
}

/// The events among `items`, in order.
pub fn text_events(items: &[TextItem]) -> Vec<&gst::Event> {
    items.iter().filter_map(TextItem::event).collect()
}

/// The first caps event's caps among `items`.
pub fn text_caps(items: &[TextItem]) -> Option<gst::Caps> {
    text_events(items).into_iter().find_map(|e| match e.view() {
        gst::EventView::Caps(c) => Some(c.caps_owned()),
        _ => None,
    })
}

/// The TIME segments among `items`, in order.
pub fn text_segments(items: &[TextItem]) -> Vec<gst::FormattedSegment<gst::ClockTime>> {
    text_events(items)
        .into_iter()
        .filter_map(|e| match e.view() {
            gst::EventView::Segment(s) => s.segment().downcast_ref::<gst::ClockTime>().cloned(),
            _ => None,
        })
        .collect()
}

/// Everything `text_src` pushed, in order, shared with the thread that pushes it.
#[derive(Clone, Default)]
pub struct TextLog(Arc<(Mutex<Vec<TextItem>>, Condvar)>);

impl TextLog {
    fn record(&self, item: TextItem) {
        let (items, changed) = &*self.0;
        items.lock().unwrap().push(item);
        changed.notify_all();
    }

    pub fn items(&self) -> Vec<TextItem> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the items, failing the test after [`TIMEOUT`].
    pub fn wait_for(&self, what: &str, done: impl Fn(&[TextItem]) -> bool) -> Vec<TextItem> {
        let (items, changed) = &*self.0;
        let deadline = Instant::now() + TIMEOUT;
        let mut guard = items.lock().unwrap();
        while !done(&guard) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "text_src: no {what} within {TIMEOUT:?}; got {:?}",
                *guard
            );
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
        guard.clone()
    }

    /// Waits for EOS on the text stream.
    pub fn wait_eos(&self) -> Vec<TextItem> {
        self.wait_for("EOS", |items| {
            items
                .iter()
                .any(|i| matches!(i, TextItem::Event(e) if e.type_() == gst::EventType::Eos))
        })
    }

    /// The caption buffers: (PTS, duration, text).
    pub fn captions(&self) -> Vec<(gst::ClockTime, gst::ClockTime, String)> {
        text_captions(&self.items())
    }
}

/// The caption buffers among `items`: (PTS, duration, text); fails on a buffer without them.
pub fn text_captions(items: &[TextItem]) -> Vec<(gst::ClockTime, gst::ClockTime, String)> {
    items
        .iter()
        .filter_map(|i| match i {
            TextItem::Buffer {
                pts,
                duration,
                text,
            } => Some((
                pts.expect("caption buffer has a PTS"),
                duration.expect("caption buffer has a duration"),
                text.clone(),
            )),
            TextItem::Event(_) => None,
        })
        .collect()
}

fn buffer_item(buffer: &gst::BufferRef) -> TextItem {
    let map = buffer.map_readable().expect("readable text buffer");
    TextItem::Buffer {
        pts: buffer.pts(),
        duration: buffer.duration(),
        text: String::from_utf8(map.to_vec()).expect("caption buffers are UTF-8"),
    }
}

/// Records every buffer and downstream event `pad` pushes, in order (a probe: the pad may be
/// linked to anything).
pub fn record_pad(pad: &gst::Pad) -> TextLog {
    let log = TextLog::default();
    let recorder = log.clone();
    pad.add_probe(
        gst::PadProbeType::BUFFER
            | gst::PadProbeType::EVENT_DOWNSTREAM
            | gst::PadProbeType::EVENT_FLUSH,
        move |_pad, info| {
            match &info.data {
                Some(gst::PadProbeData::Buffer(b)) => recorder.record(buffer_item(b)),
                Some(gst::PadProbeData::Event(e)) => recorder.record(TextItem::Event(e.clone())),
                _ => {}
            }
            gst::PadProbeReturn::Ok
        },
    )
    .expect("probe added");
    log
}

/// A sink pad linked to `element`'s `text_src`, accepting only `accept` (as a downstream text
/// consumer would), recording everything it receives. Keep the pad alive for the test.
pub fn link_text_sink(element: &gst::Element, accept: gst::Caps) -> (gst::Pad, TextLog) {
    let log = TextLog::default();
    let (on_buffer, on_event) = (log.clone(), log.clone());
    let pad = gst::Pad::builder(gst::PadDirection::Sink)
        .name("test_text_sink")
        .chain_function(move |_pad, _parent, buffer| {
            on_buffer.record(buffer_item(&buffer));
            Ok(gst::FlowSuccess::Ok)
        })
        .event_function(move |_pad, _parent, event| {
            on_event.record(TextItem::Event(event));
            true
        })
        .query_function(move |_pad, _parent, query| match query.view_mut() {
            gst::QueryViewMut::Caps(q) => {
                let caps = match q.filter() {
                    Some(filter) => {
                        filter.intersect_with_mode(&accept, gst::CapsIntersectMode::First)
                    }
                    None => accept.clone(),
                };
                q.set_result(&caps);
                true
            }
            gst::QueryViewMut::AcceptCaps(q) => {
                let ok = q.caps().is_subset(&accept);
                q.set_result(ok);
                true
            }
            _ => false,
        })
        .build();
    pad.set_active(true).expect("activate the test text pad");
    element
        .static_pad("text_src")
        .expect("text_src pad")
        .link(&pad)
        .expect("link text_src");
    (pad, log)
}

/// `text/x-raw,format=utf8`.
pub fn utf8_caps() -> gst::Caps {
    gst::Caps::builder("text/x-raw")
        .field("format", "utf8")
        .build()
}

// ---------------------------------------------------------------------------------------------
// The element in a harness
// ---------------------------------------------------------------------------------------------

/// The element between a `gst_check::Harness` (video in on `sink`, out of `src`), a recording
/// text consumer on `text_src` and its own bus. Video frames are pushed by running time in ms.
pub struct CaptionRun {
    pub element: gst::Element,
    /// Shared so that a push can run on a watchdog thread (see [`within`]).
    harness: Arc<Mutex<gst_check::Harness>>,
    pub bus: BusLog,
    pub text: TextLog,
    pub info: gst_video::VideoInfo,
    _text_pad: gst::Pad,
}

impl CaptionRun {
    /// Starts `element` (the harness sets it to PLAYING) with `info` as the video caps and a
    /// text consumer that takes utf8.
    pub fn new(element: gst::Element, info: gst_video::VideoInfo) -> Self {
        Self::with_text_caps(element, info, utf8_caps())
    }

    /// Like [`CaptionRun::new`] with a text consumer that takes only `accept`.
    pub fn with_text_caps(
        element: gst::Element,
        info: gst_video::VideoInfo,
        accept: gst::Caps,
    ) -> Self {
        // Bus and text consumer first: the harness starts the element at once.
        let bus = BusLog::attach(&element);
        let (text_pad, text) = link_text_sink(&element, accept);
        let mut harness = gst_check::Harness::with_element(&element, Some("sink"), Some("src"));
        harness.set_src_caps(info.to_caps().expect("caps from video info"));
        Self {
            element,
            harness: Arc::new(Mutex::new(harness)),
            bus,
            text,
            info,
            _text_pad: text_pad,
        }
    }

    /// The harness, for what the helpers below do not cover.
    pub fn harness(&self) -> std::sync::MutexGuard<'_, gst_check::Harness> {
        self.harness.lock().expect("harness lock")
    }

    /// Pushes the frame at `pts_ms` (100 ms long, showing picture `pts_ms / 100`).
    pub fn push_frame(&mut self, pts_ms: u64) {
        let frame = timed(video_frame(&self.info, (pts_ms / 100) as u32), pts_ms, 100);
        self.push(frame);
    }

    /// Pushes frames at 0, 100, ... up to and including `last_ms`.
    pub fn push_frames_until(&mut self, last_ms: u64) {
        for pts in (0..=last_ms).step_by(100) {
            self.push_frame(pts);
        }
    }

    /// Pushes a buffer; fails the test if the element refuses it or blocks for [`TIMEOUT`]
    /// (with `frame-policy=wait` a push waits while the worker is behind).
    pub fn push(&mut self, buffer: gst::Buffer) {
        let harness = self.harness.clone();
        let result = within("pushing a video buffer", TIMEOUT, move || {
            harness.lock().expect("harness lock").push(buffer)
        });
        if let Err(e) = result {
            panic!("push refused: {e:?}; errors: {:?}", self.bus.errors());
        }
    }

    /// Pushes an event into `sink`, failing the test if that blocks for [`TIMEOUT`].
    pub fn push_event(&mut self, event: gst::Event) -> bool {
        let harness = self.harness.clone();
        within("pushing an event", TIMEOUT, move || {
            harness.lock().expect("harness lock").push_event(event)
        })
    }

    /// Sends EOS (the element lets it through once the final caption went out) and waits for
    /// it on `text_src`; returns everything the text stream carried.
    pub fn finish(&mut self) -> Vec<TextItem> {
        assert!(self.push_event(gst::event::Eos::new()), "EOS refused");
        self.text.wait_eos()
    }

    /// The video buffers that left `src` since the last call.
    pub fn pull_all(&mut self) -> Vec<gst::Buffer> {
        let mut harness = self.harness();
        std::iter::from_fn(|| harness.try_pull()).collect()
    }

    /// The downstream events that left `src` since the last call.
    pub fn pull_events(&mut self) -> Vec<gst::Event> {
        let mut harness = self.harness();
        std::iter::from_fn(|| harness.try_pull_event()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Never hang
// ---------------------------------------------------------------------------------------------

/// Runs `f` on its own thread and fails the test if it takes longer than `timeout` (the thread
/// is left behind; the test process ends anyway).
pub fn within<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: hung for {timeout:?}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// `set_state`, failing the test if it does not return within [`TIMEOUT`].
pub fn set_state_within(
    element: &impl IsA<gst::Element>,
    state: gst::State,
) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
    let element = element.as_ref().clone();
    within(&format!("set_state({state:?})"), TIMEOUT, move || {
        element.set_state(state)
    })
}

/// Plays `pipeline` to EOS and returns every bus message; fails on an error message or after
/// `timeout`, and always sets the pipeline back to NULL.
pub fn run_to_eos(pipeline: &gst::Pipeline, timeout: Duration) -> Vec<gst::Message> {
    let bus = pipeline.bus().expect("pipeline bus");
    let stop = StopOnDrop(pipeline.clone());
    set_state_within(pipeline, gst::State::Playing).expect("pipeline plays");
    let messages = wait_for_message(&bus, timeout, |m| m.type_() == gst::MessageType::Eos);
    drop(stop);
    messages
}

/// What a Matroska file holds, read back by [`matroska_content`]: the video stream's frames,
/// and the subtitle stream's buffers as text with that stream's caps.
#[derive(Debug, Default)]
pub struct MatroskaContent {
    pub video_frames: usize,
    pub subtitles: Vec<String>,
    pub subtitle_caps: Option<gst::Caps>,
}

/// Demuxes the Matroska file at `path` to the end (`matroskademux`, every stream into a
/// fakesink): a stream whose pad is named `subtitle_*` is the subtitle track, any other counts
/// as video.
pub fn matroska_content(path: &Path) -> MatroskaContent {
    init();
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("filesrc")
        .property("location", path.to_str().expect("UTF-8 path"))
        .build()
        .expect("filesrc");
    let demux = gst::ElementFactory::make("matroskademux")
        .build()
        .expect("matroskademux");
    pipeline
        .add_many([&src, &demux])
        .expect("add to the pipeline");
    src.link(&demux).expect("filesrc links to matroskademux");
    let content = Arc::new(Mutex::new(MatroskaContent::default()));
    let (bin, shared) = (pipeline.clone(), content.clone());
    demux.connect_pad_added(move |_, pad| {
        let sink = gst::ElementFactory::make("fakesink")
            .property("sync", false)
            .build()
            .expect("fakesink");
        bin.add(&sink).expect("add a fakesink");
        sink.sync_state_with_parent()
            .expect("fakesink follows the pipeline");
        pad.link(&sink.static_pad("sink").expect("fakesink pad"))
            .expect("demuxer pad links to a fakesink");
        let subtitle = pad.name().starts_with("subtitle");
        let shared = shared.clone();
        pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            let mut content = shared.lock().expect("content lock");
            if subtitle {
                if let Some(buffer) = info.buffer() {
                    let text = buffer.map_readable().expect("readable subtitle buffer");
                    content
                        .subtitles
                        .push(String::from_utf8_lossy(&text).into_owned());
                }
                content.subtitle_caps = pad.current_caps();
            } else {
                content.video_frames += 1;
            }
            gst::PadProbeReturn::Ok
        });
    });
    run_to_eos(&pipeline, TIMEOUT);
    let read = std::mem::take(&mut *content.lock().expect("content lock"));
    read
}

/// Sets the pipeline to NULL when dropped, also when a test fails (GStreamer complains about
/// pipelines disposed while playing); gives up after [`TIMEOUT`] rather than hang.
pub struct StopOnDrop(pub gst::Pipeline);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let pipeline = self.0.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(pipeline.set_state(gst::State::Null));
        });
        match rx.recv_timeout(TIMEOUT) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                if !std::thread::panicking() {
                    panic!("pipeline did not stop: {e}");
                }
            }
            Err(_) => {
                if !std::thread::panicking() {
                    panic!("pipeline hung going to NULL");
                }
            }
        }
    }
}

/// Pops messages from `bus` until `done` says so; fails on an error message or after `timeout`.
/// Returns every message popped, the last one included.
pub fn wait_for_message(
    bus: &gst::Bus,
    timeout: Duration,
    done: impl Fn(&gst::Message) -> bool,
) -> Vec<gst::Message> {
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_nseconds(left.as_nanos() as u64)) else {
            panic!(
                "timed out after {timeout:?}; captions so far: {:?}",
                captions(&messages)
            );
        };
        messages.push(msg.clone());
        if let gst::MessageView::Error(e) = msg.view() {
            panic!(
                "error from {:?}: {} ({:?})",
                e.src().map(|s| s.path_string()),
                e.error(),
                e.debug()
            );
        }
        if done(&msg) {
            return messages;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Command-line tools
// ---------------------------------------------------------------------------------------------

/// This build's plugin library, built once per test process.
fn plugin_library() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(build_plugin_library)
}

/// Cargo's scratch directory beside the library, `<target-dir>/tmp`.
fn scratch_dir() -> PathBuf {
    let dir = plugin_library()
        .ancestors()
        .nth(2)
        .map(|target| target.join("tmp"))
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Builds the plugin's cdylib with the profile and target directory of this test binary
/// (`cargo test` builds the cdylib of a path dependency only into `deps/`, under a name other
/// builds overwrite; `cargo build` is a no-op when it is fresh) and returns its path.
fn build_plugin_library() -> PathBuf {
    // This binary is <target-dir>/<profile-dir>/deps/<test>.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("<profile>/deps");
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(other) => other.to_owned(),
        None => panic!("unexpected test binary location {}", exe.display()),
    };
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "-p",
        "gst-plugin-llamavid",
        "--lib",
        "--message-format=json",
    ])
    .arg("--profile")
    .arg(&profile)
    .arg("--target-dir")
    .arg(target_dir)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    let output = run_with_timeout(cmd, Duration::from_secs(1800));
    assert!(
        output.success,
        "cargo build of the plugin failed:\n{}",
        output.stderr
    );
    // The artifact message lists the files written; pick the shared library.
    let suffix = std::env::consts::DLL_SUFFIX;
    output
        .stdout
        .lines()
        .filter(|l| l.contains("\"compiler-artifact\"") && l.contains("\"gstllamavid\""))
        .flat_map(|l| l.split('"'))
        .find(|s| s.ends_with(suffix) && s.contains("gstllamavid"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no {suffix} in cargo's output:\n{}", output.stdout))
}

/// What a command-line tool did.
#[derive(Debug)]
pub struct ToolOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    /// stdout and stderr, for failure messages and searches.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> ToolOutput {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Read both pipes while waiting, or a chatty child blocks on a full pipe.
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} hung for {timeout:?}, killed.\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ToolOutput {
        success: status.success(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Runs a GStreamer command-line tool (`gst-launch-1.0`, `gst-inspect-1.0`) that sees this
/// build of the plugin, killed after `timeout`.
///
/// `GST_PLUGIN_PATH` is a temporary directory holding only a hard link to the library
/// (pointing it at `target/debug` would make GStreamer load every library there; a link is a
/// snapshot that a concurrent build cannot replace mid-run), and `GST_REGISTRY` a registry of
/// the tests' own in the target directory, so that the user's registry is never touched.
pub fn gst_tool(tool: &str, args: &[&str], timeout: Duration) -> ToolOutput {
    gst_tool_with_env::<&str, &str>(tool, args, &[], timeout)
}

/// [`gst_tool`] with extra environment variables for the child (the tests' own environment is
/// never changed: tests run in parallel threads).
pub fn gst_tool_with_env<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    tool: &str,
    args: &[&str],
    env: &[(K, V)],
    timeout: Duration,
) -> ToolOutput {
    let library = plugin_library();
    let scratch = scratch_dir();
    let plugins = tempfile::Builder::new()
        .prefix("llamavid-gst-plugin")
        .tempdir_in(&scratch)
        .expect("temporary plugin directory");
    let linked = plugins
        .path()
        .join(library.file_name().expect("library file name"));
    if std::fs::hard_link(library, &linked).is_err() {
        std::fs::copy(library, &linked).expect("copy the plugin library");
    }
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .env("GST_PLUGIN_PATH", plugins.path())
        .env(
            "GST_REGISTRY",
            scratch.join("llamavid-gst-tests-registry.bin"),
        )
        // Debug logs would mix with the output the tests read.
        .env_remove("GST_DEBUG")
        .envs(env.iter().map(|(k, v)| (k, v)));
    run_with_timeout(cmd, timeout)
}

/// Runs any command, killed after `timeout`, with its output captured.
pub fn run_tool(cmd: Command, timeout: Duration) -> ToolOutput {
    run_with_timeout(cmd, timeout)
}
