//! Whether the video comes from a live source, for `frame-policy=auto`: a live pipeline must
//! never wait on the model, a file must never lose a frame.
//!
//! The latency query answers it when upstream answers. When it fails (an element upstream that
//! does not handle it, a pipeline still setting up), failure is not an answer: the source
//! element itself is asked, through its `is-live` property (every `GstBaseSrc`, `appsrc`) or
//! else its flags (capture sources provide the clock). Only when nothing upstream tells is the
//! liveness unknown, and asked again at the next sampled frame.

use gst::prelude::*;

/// How liveness was decided, for the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Upstream answered the latency query.
    Latency(bool),
    /// The source element's `is-live` property.
    SourceProperty(bool),
    /// The source element has no `is-live`: live when it provides a clock.
    SourceClock(bool),
    /// Nothing upstream tells.
    Unknown,
}

impl Liveness {
    /// `None` when unknown.
    pub fn is_live(self) -> Option<bool> {
        match self {
            Self::Latency(live) | Self::SourceProperty(live) | Self::SourceClock(live) => {
                Some(live)
            }
            Self::Unknown => None,
        }
    }
}

/// The liveness of the stream arriving at `sinkpad`.
pub fn upstream_liveness(sinkpad: &gst::Pad) -> Liveness {
    let mut query = gst::query::Latency::new();
    if sinkpad.peer_query(&mut query) {
        return Liveness::Latency(query.result().0);
    }
    source_liveness(sinkpad)
}

/// Walks upstream from `sinkpad` to the source element and asks it.
fn source_liveness(sinkpad: &gst::Pad) -> Liveness {
    let mut pad = match sinkpad.peer() {
        Some(peer) => peer,
        None => return Liveness::Unknown,
    };
    // A bounded walk: pipelines are short, and a loop in the graph must not hang us.
    for _ in 0..64 {
        // Into a bin: follow its ghost pad to the element inside.
        if let Some(target) = pad
            .downcast_ref::<gst::GhostPad>()
            .and_then(|ghost| ghost.target())
        {
            pad = target;
            continue;
        }
        let Some(element) = pad.parent_element() else {
            return Liveness::Unknown;
        };
        if let Some(live) = is_live_property(&element) {
            return Liveness::SourceProperty(live);
        }
        let upstream_sink = pad
            .iterate_internal_links()
            .into_iter()
            .flatten()
            .find(|p| p.direction() == gst::PadDirection::Sink)
            .or_else(|| element.sink_pads().into_iter().next());
        match upstream_sink {
            Some(sink) => match sink.peer() {
                Some(peer) => pad = peer,
                None => return Liveness::Unknown,
            },
            None if element.element_flags().contains(gst::ElementFlags::SOURCE)
                || element.sink_pads().is_empty() =>
            {
                let provides_clock = element
                    .element_flags()
                    .contains(gst::ElementFlags::PROVIDE_CLOCK);
                return Liveness::SourceClock(provides_clock);
            }
            None => return Liveness::Unknown,
        }
    }
    Liveness::Unknown
}

/// The element's boolean `is-live` property, if it has one.
fn is_live_property(element: &gst::Element) -> Option<bool> {
    let pspec = element.find_property("is-live")?;
    (pspec.value_type() == bool::static_type()).then(|| element.property::<bool>("is-live"))
}
