//! The element's side of fetching a model: the `model` and `vision-tower` values resolved to
//! local files by [`crate::hub`] (downloading from the hub or a URL when need be) while the
//! element goes to READY, with `progress` messages on the bus.
//!
//! Messages: `type` start / continue / complete / error, `code` "download", `text` with the
//! file, the percent and the bytes (`pytorch_model-00001-of-00002.bin: 41% (4.09 GB of
//! 9.98 GB); all files 26% of 17.9 GB`), `percent` (int, of all files), and the extra fields
//! `file` (string), `bytes` and `total` (u64, of all files).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use gst::prelude::*;

use crate::hub::{
    human_bytes, FetchError, FetchEvent, FetchObserver, FetchedModel, Hub, ModelRequest,
};
use crate::sync::lock;

/// Progress messages at most this often (and on every whole percent).
const MIN_INTERVAL: Duration = Duration::from_millis(500);

struct Posted {
    percent: i32,
    at: Instant,
}

struct BusProgress {
    element: gst::Element,
    posted: Mutex<Option<Posted>>,
}

impl BusProgress {
    fn post(&self, type_: gst::ProgressType, text: &str, fields: Option<(&str, i32, u64, u64)>) {
        let mut builder =
            gst::message::Progress::builder(type_, "download", text).src(&self.element);
        if let Some((file, percent, bytes, total)) = fields {
            builder = builder
                .other_field("percent", percent)
                .other_field("file", file)
                .other_field("bytes", bytes)
                .other_field("total", total);
        }
        let _ = self.element.post_message(builder.build());
    }
}

impl FetchObserver for BusProgress {
    fn event(&self, event: &FetchEvent<'_>) {
        match *event {
            FetchEvent::Plan { files, bytes } => {
                self.post(
                    gst::ProgressType::Continue,
                    &format!("Downloading {files} file(s), {}", human_bytes(bytes)),
                    Some(("", 0, 0, bytes)),
                );
            }
            FetchEvent::Bytes {
                file,
                done,
                total,
                overall_done,
                overall_total,
            } => {
                let percent = |done: u64, total: u64| {
                    (done.min(total) * 100).checked_div(total).unwrap_or(0) as i32
                };
                let overall = percent(overall_done, overall_total);
                {
                    let mut posted = lock(&self.posted);
                    let due = posted
                        .as_ref()
                        .is_none_or(|p| p.percent != overall || p.at.elapsed() >= MIN_INTERVAL);
                    if !due {
                        return;
                    }
                    *posted = Some(Posted {
                        percent: overall,
                        at: Instant::now(),
                    });
                }
                let name = file.rsplit([' ', '/']).next().unwrap_or(file);
                let this_file = match total {
                    Some(total) => format!(
                        "{}% ({} of {})",
                        percent(done, total),
                        human_bytes(done),
                        human_bytes(total)
                    ),
                    None => human_bytes(done),
                };
                let text = format!(
                    "{name}: {this_file}; all files {overall}% of {}",
                    human_bytes(overall_total)
                );
                self.post(
                    gst::ProgressType::Continue,
                    &text,
                    Some((file, overall, overall_done, overall_total)),
                );
            }
            FetchEvent::Done { file, bytes } => {
                gst::info!(
                    super::CAT,
                    obj = &self.element,
                    "fetched {file} ({})",
                    human_bytes(bytes)
                );
            }
            FetchEvent::Note(note) => {
                gst::info!(super::CAT, obj = &self.element, "{note}");
                self.post(gst::ProgressType::Continue, note, None);
            }
        }
    }
}

/// The error a user sees when the model cannot be fetched.
fn element_error(model: &str, e: &FetchError) -> gst::ErrorMessage {
    let text = format!("Cannot fetch the LLaMA-VID model {model}: {e}");
    match e {
        FetchError::BadSource(_) => gst::error_msg!(gst::LibraryError::Settings, ("{}", text)),
        FetchError::NotFound { .. } | FetchError::Offline { .. } => {
            gst::error_msg!(gst::ResourceError::NotFound, ("{}", text))
        }
        FetchError::Denied { .. } => {
            gst::error_msg!(gst::ResourceError::NotAuthorized, ("{}", text))
        }
        FetchError::DiskFull { .. } => {
            gst::error_msg!(gst::ResourceError::NoSpaceLeft, ("{}", text))
        }
        _ => gst::error_msg!(gst::ResourceError::Read, ("{}", text)),
    }
}

/// Resolves `model` (a directory or a hub id) and `vision_tower` to local files, fetching what
/// is missing, and posts the progress on `element`'s bus.
pub(super) fn fetch_model(
    element: &gst::Element,
    model: &str,
    vision_tower: Option<&str>,
) -> Result<FetchedModel, gst::ErrorMessage> {
    let progress = BusProgress {
        element: element.clone(),
        posted: Mutex::new(None),
    };
    let request = ModelRequest::parse(model, vision_tower).map_err(|e| element_error(model, &e))?;
    if request.is_local() {
        // Nothing to fetch: no progress to show.
        return Hub::from_env()
            .and_then(|hub| hub.fetch_model(&request, &()))
            .map_err(|e| element_error(model, &e));
    }
    // Every start is closed by a complete or an error: gst-launch-1.0 (and other apps) hold
    // the pipeline in PAUSED while a progress is open.
    progress.post(
        gst::ProgressType::Start,
        &format!("Looking for the files of {model}"),
        None,
    );
    let result = Hub::from_env().and_then(|hub| hub.fetch_model(&request, &progress));
    match &result {
        Ok(_) => progress.post(gst::ProgressType::Complete, "Model files ready", None),
        Err(e) => progress.post(gst::ProgressType::Error, &e.to_string(), None),
    }
    result.map_err(|e| element_error(model, &e))
}
