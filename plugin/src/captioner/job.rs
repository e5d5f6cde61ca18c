//! Work queued for a stream's model side: sampled frames, EOS and resets after a flush, each
//! tagged with the element's flush epoch. The scheduler and the single-stream worker take them.

use std::time::Instant;

use super::frame::OwnedFrame;
use super::queue::Droppable;
use super::stream::FrameTiming;

#[derive(Debug)]
pub struct FrameJob {
    pub running_time: u64,
    /// The running time before which no other frame will be sampled: the text stream may
    /// advance to it when this frame brings no caption.
    pub next_sample_due: u64,
    pub arrived: Instant,
    pub frame: OwnedFrame,
}

impl FrameJob {
    pub fn timing(&self) -> FrameTiming {
        FrameTiming {
            running_time: self.running_time,
            next_sample_due: self.next_sample_due,
            arrived: self.arrived,
        }
    }
}

/// Work for a stream, tagged with the element's flush epoch so that results of work started
/// before a flush are recognised and discarded.
#[derive(Debug)]
pub enum Job {
    Frame {
        epoch: u64,
        job: FrameJob,
    },
    /// Caption what is new, then report EOS.
    Eos {
        epoch: u64,
    },
    /// Forget the window and the caption schedule (after a flush).
    Reset {
        epoch: u64,
    },
}

impl Job {
    /// What the model was doing when this job failed, for error messages.
    pub fn what(&self) -> &'static str {
        match self {
            Job::Frame { .. } => "encoding a frame",
            Job::Eos { .. } => "captioning at the end of the stream",
            Job::Reset { .. } => "starting over after a flush",
        }
    }
}

impl Droppable for Job {
    fn droppable(&self) -> bool {
        matches!(self, Job::Frame { .. })
    }
}
