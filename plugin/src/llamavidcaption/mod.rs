//! `llamavidcaption`: passes video through untouched and captions it with LLaMA-VID.
//!
//! Outputs, all timed in running time of the video:
//! - `text_src`: `text/x-raw` captions (utf8 or escaped pango-markup), GAPs in between;
//! - bus: element messages named `llamavid-caption` (see [`CAPTION_MESSAGE`]);
//! - video: a `LlamaVidCaptionMeta` custom meta (see [`CAPTION_META`]) on the first video
//!   buffer that leaves `src` after a caption is ready.
//!
//! With `emit=on-change` only captions that differ from the last emitted one (see
//! [`crate::captioner::change`]) reach these outputs; the others count in the statistics and
//! leave a GAP on `text_src` over their time.
//!
//! Both the message and the meta carry the fields `text` (string), `start` and `end` (u64,
//! running time in ns of the first and last frame of the captioned window), `pts` (u64, the
//! caption buffer's PTS), `frames` (u32), `latency` (u64, ns from the arrival of the window's
//! last frame to the caption) and `prompt` (string).

use std::sync::LazyLock;

use gst::glib;
use gst::prelude::*;

mod fetch;
mod frames;
mod imp;
mod liveness;
mod output;
mod settings;
mod text;

/// The element's debug category (`GST_DEBUG=llamavidcaption:5`).
pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "llamavidcaption",
        gst::DebugColorFlags::empty(),
        Some("LLaMA-VID video captioning"),
    )
});

/// Name of the bus message structure posted for every caption.
pub const CAPTION_MESSAGE: &str = "llamavid-caption";
/// Name of the custom meta attached to a video buffer for every caption.
pub const CAPTION_META: &str = "LlamaVidCaptionMeta";

/// What happens to a sampled frame when the worker is still busy with earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum, Default)]
#[repr(u32)]
#[enum_type(name = "GstLlamaVidFramePolicy")]
pub enum FramePolicy {
    /// Live sources drop (newest frames kept), others wait.
    #[default]
    #[enum_value(name = "Auto: drop for live sources, wait otherwise", nick = "auto")]
    Auto = 0,
    #[enum_value(
        name = "Drop the oldest waiting frame, never block the video",
        nick = "drop"
    )]
    Drop = 1,
    #[enum_value(
        name = "Wait for the worker: every sampled frame is encoded",
        nick = "wait"
    )]
    Wait = 2,
}

/// Which captions leave the element (`emit` property).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum, Default)]
#[repr(u32)]
#[enum_type(name = "GstLlamaVidEmit")]
pub enum Emit {
    #[default]
    #[enum_value(name = "Every caption", nick = "always")]
    Always = 0,
    #[enum_value(
        name = "Only captions that differ from the last emitted one by change-threshold or more",
        nick = "on-change"
    )]
    OnChange = 1,
}

/// Arithmetic of the model (`dtype` property).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum, Default)]
#[repr(u32)]
#[enum_type(name = "GstLlamaVidDtype")]
pub enum Dtype {
    /// bf16 on CPUs with AMX (when built with `mkl`), f16 on CUDA, else f32.
    #[default]
    #[enum_value(
        name = "Auto: bf16 on AMX CPUs in an mkl build, f16 on CUDA, else f32",
        nick = "auto"
    )]
    Auto = 0,
    #[enum_value(name = "f32: exact (matches the reference)", nick = "f32")]
    F32 = 1,
    #[enum_value(name = "bf16: reduced precision (AMX on CPU)", nick = "bf16")]
    Bf16 = 2,
    #[enum_value(
        name = "int8: 8-bit weights and activations (CPU; fastest, least exact)",
        nick = "int8"
    )]
    Int8 = 3,
}

/// The most the model's CPU kernels may use (`cpu-isa` property).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum, Default)]
#[repr(u32)]
#[enum_type(name = "GstLlamaVidCpuIsa")]
pub enum CpuIsa {
    #[default]
    #[enum_value(
        name = "Best: everything the CPU has, AMX included (AMX permission asked for the process in bf16/int8/auto mkl builds)",
        nick = "best"
    )]
    Best = 0,
    #[enum_value(
        name = "AVX-512 (with BF16/VNNI where present), never AMX",
        nick = "avx512"
    )]
    Avx512 = 1,
    #[enum_value(name = "AVX2 and FMA, no AVX-512", nick = "avx2")]
    Avx2 = 2,
    #[enum_value(name = "Portable kernels, no vector extension", nick = "portable")]
    Portable = 3,
}

glib::wrapper! {
    pub struct LlamaVidCaption(ObjectSubclass<imp::LlamaVidCaption>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    if !gst::meta::CustomMeta::is_registered(CAPTION_META) {
        gst::meta::CustomMeta::register(CAPTION_META, &[]);
    }
    #[cfg(feature = "doc")]
    {
        FramePolicy::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
        Emit::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
        Dtype::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
        CpuIsa::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    }
    gst::Element::register(
        Some(plugin),
        "llamavidcaption",
        gst::Rank::NONE,
        LlamaVidCaption::static_type(),
    )
}
