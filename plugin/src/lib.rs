//! gst-llamavid: a GStreamer element that watches video and writes what it sees, with
//! LLaMA-VID (two tokens per frame) running on candle.
//!
//! - [`model`]: the LLaMA-VID network, its files and tokenizers (no GStreamer).
//! - [`hub`]: models from the Hugging Face hub and URLs, fetched into the standard cache (no
//!   GStreamer).
//! - [`captioner`]: sampling, the token window, the shared scheduler and where captions are
//!   generated (no pads).
//! - [`llamavidcaption`]: the element, thin glue between pads and the captioner.

use gst::glib;

pub mod captioner;
pub mod hub;
pub mod llamavidcaption;
pub mod model;
mod sync;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    llamavidcaption::register(plugin)
}

gst::plugin_define!(
    llamavid,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    // The origin URL gst-inspect shows: the project has no public home yet, and a placeholder
    // would be shipped metadata. GStreamer's own wording for an unknown origin.
    "Unknown package origin",
    env!("BUILD_REL_DATE")
);
