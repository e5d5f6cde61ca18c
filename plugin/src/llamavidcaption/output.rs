//! Where the worker's results meet GStreamer: statistics, the bus message, the pending video
//! meta and the text queue. Everything here is called from the worker thread and never blocks
//! on the pipeline; nothing is posted while a lock is held (a synchronous bus handler may call
//! back into the element).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;

use super::text::{TextItem, TextQueue, TextTimeline};
use super::{CAPTION_MESSAGE, CAT};
use crate::captioner::change::{ChangeFilter, Verdict};
use crate::captioner::{CaptionEvent, CaptionOutput, Problem};
use crate::sync::lock;

/// Counters behind the read-only statistics properties.
#[derive(Default)]
pub struct Stats {
    pub frames_sampled: AtomicU64,
    pub frames_encoded: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub frames_batched: AtomicU64,
    /// Every caption made, emitted or not.
    pub captions: AtomicU64,
    /// Captions `emit=on-change` held back as saying nothing new.
    pub captions_suppressed: AtomicU64,
    pub last_caption: Mutex<(String, Duration)>,
}

impl Stats {
    pub fn reset(&self) {
        for counter in [
            &self.frames_sampled,
            &self.frames_encoded,
            &self.frames_dropped,
            &self.frames_batched,
            &self.captions,
            &self.captions_suppressed,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        *lock(&self.last_caption) = (String::new(), Duration::ZERO);
    }
}

/// The `emit` and `change-threshold` properties with the stream's last emitted caption.
#[derive(Debug, Clone)]
pub struct EventMode {
    pub on_change: bool,
    pub threshold: f64,
    pub filter: ChangeFilter,
}

impl Default for EventMode {
    fn default() -> Self {
        Self {
            on_change: false,
            threshold: super::settings::DEFAULT_CHANGE_THRESHOLD,
            filter: ChangeFilter::default(),
        }
    }
}

impl EventMode {
    pub fn judge(&mut self, text: &str) -> Verdict {
        self.filter.judge(text, self.on_change, self.threshold)
    }
}

/// State shared by the element and its worker.
#[derive(Default)]
pub struct Shared {
    pub stats: Stats,
    /// Incremented on every flush; results of older epochs are dropped.
    pub epoch: AtomicU64,
    pub flushing: AtomicBool,
    /// The worker failed; the stream cannot go on.
    pub failed: AtomicBool,
    /// The caption (and its PTS) to attach to the next video buffer.
    pub pending_meta: Mutex<Option<(CaptionEvent, u64)>>,
    pub text: TextQueue,
    /// Where the text stream stands, and the segment its timestamps are in.
    pub timeline: Mutex<TextTimeline>,
    pub segment: Mutex<gst::FormattedSegment<gst::ClockTime>>,
    /// The last epoch whose EOS the worker finished.
    pub eos_done: Mutex<Option<u64>>,
    pub eos_signal: Condvar,
    /// Declared processing latency, to warn when a caption comes later.
    pub declared_latency: Mutex<Duration>,
    /// PLAYING went to PAUSED, so the text sink has to preroll again: the next frame sends a GAP.
    pub text_needs_preroll: AtomicBool,
    /// Which captions are emitted.
    pub events: Mutex<EventMode>,
    last_late_warning: Mutex<Option<Instant>>,
}

impl Shared {
    /// The timestamp in the current segment of an item that starts at `running_time` and
    /// lasts `duration`. In reverse playback a buffer's running time starts at its end (PTS +
    /// duration), so there the PTS is where the item's running time ends.
    fn to_pts(&self, running_time: u64, duration: u64) -> gst::ClockTime {
        let segment = lock(&self.segment);
        let at = if segment.rate() < 0.0 {
            running_time + duration
        } else {
            running_time
        };
        let at = gst::ClockTime::from_nseconds(at);
        // Past the segment (the final caption at EOS may last beyond its end): its edge, where
        // a sink clips it.
        segment
            .position_from_running_time(at)
            .or(if segment.rate() < 0.0 {
                segment.start()
            } else {
                segment.stop()
            })
            .unwrap_or(at)
    }

    /// Lets a text sink that lost its preroll complete it, without waiting for the model: a GAP
    /// up to the frame at `running_time`, or an empty one where the text stream stands when it
    /// is ahead already. Without it a live pipeline that goes PLAYING → PAUSED → PLAYING can
    /// wait forever: the video sink holds the streaming thread until every sink prerolled, and
    /// the text sink waits for text that needs the frames held there.
    pub fn preroll_text(&self, running_time: u64) {
        if !self.text_needs_preroll.swap(false, Ordering::SeqCst) {
            return;
        }
        let (start, duration) = lock(&self.timeline).preroll_gap(running_time);
        self.text.push(TextItem::Gap {
            pts: self.to_pts(start, duration),
            duration: gst::ClockTime::from_nseconds(duration),
        });
    }

    pub fn current(&self, epoch: u64) -> bool {
        epoch == self.epoch.load(Ordering::SeqCst)
    }

    pub fn signal_eos(&self, epoch: Option<u64>) {
        let mut done = lock(&self.eos_done);
        if epoch.is_some() {
            *done = epoch;
        }
        self.eos_signal.notify_all();
    }

    /// Waits until the worker finished EOS for `epoch`, or a flush or failure makes that moot.
    pub fn wait_eos(&self, epoch: u64) {
        let mut done = lock(&self.eos_done);
        while *done != Some(epoch)
            && !self.flushing.load(Ordering::SeqCst)
            && !self.failed.load(Ordering::SeqCst)
        {
            done = self
                .eos_signal
                .wait_timeout(done, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The fields of the bus message and the meta.
pub fn caption_structure(name: &str, event: &CaptionEvent, pts: u64) -> gst::Structure {
    gst::Structure::builder(name)
        .field("text", &event.text)
        .field("start", event.start)
        .field("end", event.end)
        .field("pts", pts)
        .field("frames", event.frames)
        .field("latency", event.latency.as_nanos() as u64)
        .field("prompt", &event.prompt)
        .field("batch", event.batch)
        .build()
}

/// `text` without NUL and other C0/C1 control characters (tabs and newlines are kept).
pub fn printable(text: &str) -> String {
    text.chars()
        .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
        .collect()
}

pub struct ElementOutput {
    pub element: glib::WeakRef<super::LlamaVidCaption>,
    pub shared: Arc<Shared>,
}

impl ElementOutput {
    fn warn_if_late(&self, element: &super::LlamaVidCaption, event: &CaptionEvent) {
        let declared = *lock(&self.shared.declared_latency);
        if event.latency <= declared || event.is_final {
            return;
        }
        // At most one warning every 10 s: a slow machine would otherwise flood the bus.
        let due = {
            let mut last = lock(&self.shared.last_late_warning);
            let due = last.is_none_or(|t| t.elapsed() > Duration::from_secs(10));
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            gst::element_warning!(
                element,
                gst::CoreError::Clock,
                (
                    "Caption came {} ms after its last frame, later than the declared latency of {} ms",
                    event.latency.as_millis(),
                    declared.as_millis()
                ),
                ["raise the `latency` property, lower `max-new-tokens`, or use a faster device"]
            );
        }
    }
}

impl CaptionOutput for ElementOutput {
    fn frame_encoded(&self, epoch: u64, batch: usize) {
        if self.shared.current(epoch) {
            let stats = &self.shared.stats;
            stats.frames_encoded.fetch_add(1, Ordering::Relaxed);
            if batch > 1 {
                stats.frames_batched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn caption(&self, mut event: CaptionEvent) {
        if !self.shared.current(event.epoch) {
            return;
        }
        // The model may emit any byte; GStreamer strings cannot hold NUL, and control
        // characters are noise in subtitles. Every output gets the same cleaned text.
        event.text = printable(&event.text);
        let (start, duration) = lock(&self.shared.timeline).caption(event.end, event.duration);
        let pts = self.shared.to_pts(start, duration);
        let duration = gst::ClockTime::from_nseconds(duration);
        let stats = &self.shared.stats;
        stats.captions.fetch_add(1, Ordering::Relaxed);
        *lock(&stats.last_caption) = (event.text.clone(), event.latency);
        let verdict = lock(&self.shared.events).judge(&event.text);
        if let Verdict::Suppress { distance } = verdict {
            // Nothing new: the text stream still moves on over the caption's time.
            stats.captions_suppressed.fetch_add(1, Ordering::Relaxed);
            self.shared.text.push(TextItem::Gap { pts, duration });
            if let Some(element) = self.element.upgrade() {
                gst::debug!(
                    CAT,
                    obj = &element,
                    "caption suppressed ({distance:.2} from the last emitted): {:?}",
                    event.text
                );
                self.warn_if_late(&element, &event);
            }
            return;
        }
        // The meta is pending before the message is posted: an application reacting to the
        // message finds it on the next video buffer.
        *lock(&self.shared.pending_meta) = Some((event.clone(), pts.nseconds()));
        self.shared.text.push(TextItem::Caption {
            text: event.text.clone(),
            pts,
            duration,
        });
        if let Some(element) = self.element.upgrade() {
            post_caption_message(&element, &event, pts.nseconds());
            self.warn_if_late(&element, &event);
        }
    }

    fn idle_until(&self, epoch: u64, until: u64) {
        if !self.shared.current(epoch) {
            return;
        }
        if let Some((start, duration)) = lock(&self.shared.timeline).gap(until) {
            self.shared.text.push(TextItem::Gap {
                pts: self.shared.to_pts(start, duration),
                duration: gst::ClockTime::from_nseconds(duration),
            });
        }
    }

    fn eos(&self, epoch: u64) {
        if self.shared.current(epoch) {
            self.shared.text.push(TextItem::Eos);
        }
        self.shared.signal_eos(Some(epoch));
    }

    fn warning(&self, problem: Problem) {
        if let Some(element) = self.element.upgrade() {
            if let Some(log) = &problem.log {
                gst::warning!(CAT, obj = &element, "{log}");
            }
            gst::element_warning!(
                element,
                gst::LibraryError::Settings,
                ("{}", problem.message),
                ["{}", problem.debug]
            );
        }
    }

    fn error(&self, problem: Problem) {
        self.shared.failed.store(true, Ordering::SeqCst);
        if let Some(element) = self.element.upgrade() {
            // The backtrace goes to the debug log only: the message is for people.
            if let Some(log) = &problem.log {
                gst::error!(CAT, obj = &element, "{log}");
            }
            gst::element_error!(
                element,
                gst::LibraryError::Failed,
                ("{}", problem.message),
                ["{}", problem.debug]
            );
        }
        self.shared.signal_eos(None);
    }

    fn info(&self, message: String) {
        if let Some(element) = self.element.upgrade() {
            gst::element_info!(element, gst::ResourceError::Read, ("{}", message));
        }
    }
}

/// Posts the caption on the bus.
pub fn post_caption_message(element: &super::LlamaVidCaption, event: &CaptionEvent, pts: u64) {
    let structure = caption_structure(CAPTION_MESSAGE, event, pts);
    let _ = element.post_message(
        gst::message::Element::builder(structure)
            .src(element)
            .build(),
    );
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_removed_but_layout_is_kept() {
        assert_eq!(printable("a\0b\u{17}c\td\ne\u{85}"), "abc\td\ne");
        assert_eq!(printable("héllo ✓"), "héllo ✓");
    }
}
