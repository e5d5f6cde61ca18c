//! The sliding window of frame tokens: what the next caption describes. Memory is bounded by
//! `duration` of running time, never by the stream's length.

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
    /// Frames added since the last caption.
    fresh: usize,
}

impl TokenWindow {
    pub fn new(duration_ns: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            duration: duration_ns,
            fresh: 0,
        }
    }

    pub fn set_duration(&mut self, duration_ns: u64) {
        self.duration = duration_ns;
        self.evict();
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
            if newest - oldest.running_time > self.duration && self.entries.len() > 1 {
                self.entries.pop_front();
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
    fn time_going_backwards_restarts_the_window() {
        let mut w = TokenWindow::new(100 * S);
        w.push(entry(5));
        w.push(entry(1));
        assert_eq!(w.len(), 1);
        assert_eq!(w.first().unwrap().running_time, S);
    }
}
