//! The sliding window of frame tokens: what the next caption describes. Bounded by `duration`
//! of running time and by the number of frames the language model's context holds, never by
//! the stream's length.

use std::collections::VecDeque;
use std::time::Instant;

use candle_core::{Result, Tensor};

/// The tokens of one sampled frame.
#[derive(Debug, Clone)]
pub struct WindowEntry {
    pub running_time: u64,
    /// When the frame reached the element, to measure caption latency.
    pub arrived: Instant,
    /// (tokens_per_frame, hidden), on the compute device.
    pub tokens: Tensor,
}

#[derive(Debug)]
pub struct TokenWindow {
    entries: VecDeque<WindowEntry>,
    duration: u64,
    /// At most this many frames (at least one is always kept).
    max_frames: usize,
    /// Frames added since the last caption.
    fresh: usize,
    /// Frames that left early because of `max_frames`, not `duration`.
    cut_to_fit: u64,
}

impl TokenWindow {
    pub fn new(duration_ns: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            duration: duration_ns,
            max_frames: usize::MAX,
            fresh: 0,
            cut_to_fit: 0,
        }
    }

    pub fn set_duration(&mut self, duration_ns: u64) {
        self.duration = duration_ns;
        self.evict();
    }

    /// Keeps at most `frames` (at least one), the newest: the bound the language model's
    /// context sets.
    pub fn set_max_frames(&mut self, frames: usize) {
        self.max_frames = frames.max(1);
        self.evict();
    }

    /// How many frames left the window early, because of the frame bound, so far.
    pub fn cut_to_fit(&self) -> u64 {
        self.cut_to_fit
    }

    /// Adds a frame and drops those older than `duration` before it.
    pub fn push(&mut self, entry: WindowEntry) {
        // Out-of-order times (a new segment) would break the eviction order: start over.
        if self
            .entries
            .back()
            .is_some_and(|last| entry.running_time < last.running_time)
        {
            self.entries.clear();
        }
        self.entries.push_back(entry);
        self.fresh += 1;
        self.evict();
    }

    fn evict(&mut self) {
        let Some(newest) = self.entries.back().map(|e| e.running_time) else {
            return;
        };
        while let Some(oldest) = self.entries.front() {
            if self.entries.len() <= 1 {
                break;
            }
            if newest - oldest.running_time > self.duration {
                self.entries.pop_front();
            } else if self.entries.len() > self.max_frames {
                self.entries.pop_front();
                self.cut_to_fit += 1;
            } else {
                break;
            }
        }
        self.fresh = self.fresh.min(self.entries.len());
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.fresh = 0;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frames added since the last call to `mark_captioned`.
    pub fn fresh(&self) -> usize {
        self.fresh
    }

    pub fn mark_captioned(&mut self) {
        self.fresh = 0;
    }

    pub fn first(&self) -> Option<&WindowEntry> {
        self.entries.front()
    }

    pub fn last(&self) -> Option<&WindowEntry> {
        self.entries.back()
    }

    /// All tokens frame by frame: (frames · tokens_per_frame, hidden).
    pub fn tokens(&self) -> Result<Option<Tensor>> {
        if self.entries.is_empty() {
            return Ok(None);
        }
        let parts: Vec<&Tensor> = self.entries.iter().map(|e| &e.tokens).collect();
        Tensor::cat(&parts, 0).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const S: u64 = 1_000_000_000;

    fn entry(seconds: u64) -> WindowEntry {
        WindowEntry {
            running_time: seconds * S,
            arrived: Instant::now(),
            tokens: Tensor::full(seconds as f32, (2, 3), &Device::Cpu).unwrap(),
        }
    }

    #[test]
    fn keeps_only_the_last_duration() {
        let mut w = TokenWindow::new(3 * S);
        for t in 0..10 {
            w.push(entry(t));
        }
        assert_eq!(w.first().unwrap().running_time, 6 * S);
        assert_eq!(
            w.len(),
            4,
            "frames at 6, 7, 8, 9 s are within 3 s of the newest"
        );
    }

    #[test]
    fn tokens_are_laid_out_frame_by_frame() {
        let mut w = TokenWindow::new(10 * S);
        w.push(entry(1));
        w.push(entry(2));
        let tokens = w.tokens().unwrap().unwrap();
        assert_eq!(tokens.dims(), &[4, 3]);
        let rows: Vec<Vec<f32>> = tokens.to_vec2().unwrap();
        assert_eq!(rows[0][0], 1.0);
        assert_eq!(rows[1][0], 1.0);
        assert_eq!(rows[2][0], 2.0);
    }

    #[test]
    fn fresh_counts_frames_since_the_last_caption() {
        let mut w = TokenWindow::new(100 * S);
        w.push(entry(1));
        w.push(entry(2));
        assert_eq!(w.fresh(), 2);
        w.mark_captioned();
        w.push(entry(3));
        assert_eq!(w.fresh(), 1);
    }

    #[test]
    fn the_frame_bound_keeps_the_newest_frames_and_counts_the_cut() {
        let mut w = TokenWindow::new(100 * S);
        w.set_max_frames(3);
        for t in 0..5 {
            w.push(entry(t));
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.first().unwrap().running_time, 2 * S);
        assert_eq!(w.cut_to_fit(), 2);
        // Lowering the bound cuts at once; the duration's evictions are not counted.
        w.set_max_frames(2);
        assert_eq!((w.len(), w.cut_to_fit()), (2, 3));
        w.set_duration(0);
        assert_eq!((w.len(), w.cut_to_fit()), (1, 3));
        w.set_max_frames(0);
        assert_eq!(w.len(), 1, "the newest frame always stays");
    }

    #[test]
    fn time_going_backwards_restarts_the_window() {
        let mut w = TokenWindow::new(100 * S);
        w.push(entry(5));
        w.push(entry(1));
        assert_eq!(w.len(), 1);
        assert_eq!(w.first().unwrap().running_time, S);
    }
}
