//! The text stream on `text_src`: a queue drained by the pad's own task, so that neither the
//! worker nor the video streaming thread ever blocks on a downstream text consumer (an overlay
//! holds a text buffer until the video catches up with it), and the running-time timeline that
//! keeps caption timestamps and GAPs monotonic.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;

use super::CAT;
use crate::sync::lock;

#[derive(Debug)]
pub enum TextItem {
    /// Start of a stream: stream-start and caps.
    Start {
        stream_id: String,
    },
    Segment(gst::FormattedSegment<gst::ClockTime>),
    Caption {
        text: String,
        pts: gst::ClockTime,
        duration: gst::ClockTime,
    },
    Gap {
        pts: gst::ClockTime,
        duration: gst::ClockTime,
    },
    Eos,
}

pub enum Popped {
    Item(TextItem),
    Timeout,
    Flushing,
}

struct QueueState {
    items: VecDeque<TextItem>,
    flushing: bool,
}

pub struct TextQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

impl Default for TextQueue {
    fn default() -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                // Nothing flows until the pad is activated.
                flushing: true,
            }),
            changed: Condvar::new(),
        }
    }
}

impl TextQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        lock(&self.state)
    }

    /// Queues an item; dropped while flushing.
    pub fn push(&self, item: TextItem) {
        let mut state = self.lock();
        if !state.flushing {
            state.items.push_back(item);
            self.changed.notify_all();
        }
    }

    pub fn pop(&self, timeout: Duration) -> Popped {
        let mut state = self.lock();
        if state.flushing {
            return Popped::Flushing;
        }
        if state.items.is_empty() {
            state = self
                .changed
                .wait_timeout(state, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if state.flushing {
            return Popped::Flushing;
        }
        match state.items.pop_front() {
            Some(item) => Popped::Item(item),
            None => Popped::Timeout,
        }
    }

    pub fn set_flushing(&self, flushing: bool) {
        let mut state = self.lock();
        state.flushing = flushing;
        if flushing {
            state.items.clear();
        }
        self.changed.notify_all();
    }
}

/// Where the text stream stands, in running time. Captions are stamped with the running time
/// of the newest frame they describe, which can fall before the end of the previous caption or
/// GAP (the final caption at EOS, say): then it starts where the stream stands instead.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeline {
    position: Option<u64>,
}

impl TextTimeline {
    pub fn reset(&mut self) {
        self.position = None;
    }

    /// (start, duration) in running time of a caption for frames up to `newest` that is meant
    /// to last `duration`.
    pub fn caption(&mut self, newest: u64, duration: u64) -> (u64, u64) {
        let start = self.position.map_or(newest, |p| p.max(newest));
        let duration = duration.max(1);
        self.position = Some(start + duration);
        (start, duration)
    }

    /// The GAP (start, duration) that lets a sink preroll at `until`: up to it if the stream is
    /// behind, else an empty one where the stream stands.
    pub fn preroll_gap(&mut self, until: u64) -> (u64, u64) {
        self.gap(until)
            .unwrap_or_else(|| (self.position.unwrap_or(until), 0))
    }

    /// The GAP (start, duration) that advances the stream to `until`, if it is behind.
    pub fn gap(&mut self, until: u64) -> Option<(u64, u64)> {
        let start = self.position.unwrap_or(0);
        if until <= start {
            return None;
        }
        self.position = Some(until);
        Some((start, until - start))
    }
}

/// Pushes one text item out of `textpad` (its task only).
pub fn push_item(textpad: &gst::Pad, item: TextItem) {
    let result = match item {
        TextItem::Start { stream_id } => {
            let started = textpad.push_event(
                gst::event::StreamStart::builder(&stream_id)
                    .flags(gst::StreamFlags::SPARSE)
                    .build(),
            );
            let caps = negotiate_caps(textpad);
            if started && textpad.push_event(gst::event::Caps::new(&caps)) {
                Ok(gst::FlowSuccess::Ok)
            } else {
                Err(gst::FlowError::NotNegotiated)
            }
        }
        TextItem::Segment(segment) => {
            textpad.push_event(gst::event::Segment::new(&segment));
            Ok(gst::FlowSuccess::Ok)
        }
        TextItem::Caption {
            text,
            pts,
            duration,
        } => {
            let markup = textpad.current_caps().is_some_and(|caps| {
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
            textpad.push(buffer)
        }
        TextItem::Gap { pts, duration } => {
            textpad.push_event(gst::event::Gap::builder(pts).duration(duration).build());
            Ok(gst::FlowSuccess::Ok)
        }
        TextItem::Eos => {
            textpad.push_event(gst::event::Eos::new());
            Ok(gst::FlowSuccess::Ok)
        }
    };
    match result {
        // Nobody listening to the text is a normal way to use the element.
        Ok(_)
        | Err(gst::FlowError::NotLinked)
        | Err(gst::FlowError::Flushing)
        | Err(gst::FlowError::Eos) => {}
        Err(gst::FlowError::NotNegotiated) if !textpad.is_linked() => {}
        Err(e) => {
            gst::warning!(CAT, obj = textpad, "text push failed: {e:?}");
        }
    }
}

/// utf8 unless downstream only takes pango-markup.
fn negotiate_caps(textpad: &gst::Pad) -> gst::Caps {
    let template = textpad.pad_template_caps();
    let peer = textpad.peer_query_caps(Some(&template));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preroll_gap_never_goes_backwards() {
        let mut t = TextTimeline::default();
        assert_eq!(t.preroll_gap(500), (0, 500));
        t.caption(600, 1000);
        assert_eq!(
            t.preroll_gap(1200),
            (1600, 0),
            "the caption already covers 1200"
        );
        assert_eq!(t.preroll_gap(2000), (1600, 400));
    }

    #[test]
    fn captions_and_gaps_never_go_backwards() {
        let mut t = TextTimeline::default();
        assert_eq!(t.gap(1000), Some((0, 1000)));
        assert_eq!(t.caption(5000, 5000), (5000, 5000));
        assert_eq!(t.gap(7000), None, "the caption already covers 7000");
        // A final caption for frames up to 8000 starts where the previous one ends.
        assert_eq!(t.caption(8000, 5000), (10_000, 5000));
        assert_eq!(t.gap(16_000), Some((15_000, 1000)));
    }

    #[test]
    fn queue_drops_items_while_flushing() {
        let q = TextQueue::default();
        q.push(TextItem::Eos);
        assert!(matches!(q.pop(Duration::ZERO), Popped::Flushing));
        q.set_flushing(false);
        q.push(TextItem::Eos);
        assert!(matches!(q.pop(Duration::ZERO), Popped::Item(TextItem::Eos)));
        assert!(matches!(q.pop(Duration::from_millis(1)), Popped::Timeout));
    }
}
