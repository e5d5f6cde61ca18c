//! Which frames are sampled: one per `interval` of running time, on a fixed grid so that frame
//! timing jitter does not make the sampling drift.

/// Decides, frame by frame, whether a frame at a given running time is sampled.
#[derive(Debug, Clone)]
pub struct FrameSampler {
    interval: u64,
    next_due: Option<u64>,
}

impl FrameSampler {
    pub fn new(interval_ns: u64) -> Self {
        Self {
            interval: interval_ns.max(1),
            next_due: None,
        }
    }

    pub fn set_interval(&mut self, interval_ns: u64) {
        self.interval = interval_ns.max(1);
    }

    /// Forget the grid, e.g. after a flush: the next frame is sampled.
    pub fn reset(&mut self) {
        self.next_due = None;
    }

    /// The earliest running time at which the next frame can be sampled.
    pub fn next_due(&self) -> Option<u64> {
        self.next_due
    }

    /// True when the frame at `running_time` is sampled. The first frame always is; then one
    /// frame at or after each grid point. After a jump (a seek, a gap in a live stream) the grid
    /// restarts at the jump rather than sampling every frame to catch up.
    pub fn sample(&mut self, running_time: u64) -> bool {
        match self.next_due {
            Some(due) if running_time < due => {
                // A jump backwards (e.g. a new segment) restarts the grid.
                if due - running_time > 2 * self.interval {
                    self.next_due = Some(running_time + self.interval);
                    return true;
                }
                false
            }
            Some(due) => {
                let next = due + self.interval;
                self.next_due = Some(if running_time >= next {
                    running_time + self.interval
                } else {
                    next
                });
                true
            }
            None => {
                self.next_due = Some(running_time + self.interval);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn sampled(sampler: &mut FrameSampler, times_ms: impl IntoIterator<Item = u64>) -> Vec<u64> {
        times_ms
            .into_iter()
            .filter(|&t| sampler.sample(t * MS))
            .collect()
    }

    #[test]
    fn one_frame_per_interval_without_drift() {
        let mut s = FrameSampler::new(1000 * MS);
        // 30 fps for 3.5 s: frames at multiples of 33.3 ms.
        let frames = (0..105).map(|i| i * 100 / 3);
        assert_eq!(sampled(&mut s, frames), vec![0, 1000, 2000, 3000]);
    }

    #[test]
    fn sampling_is_by_time_not_by_count() {
        let mut s = FrameSampler::new(1000 * MS);
        // A variable frame rate: sparse then dense.
        let frames = [0, 900, 1100, 1150, 1200, 2050, 2060];
        assert_eq!(sampled(&mut s, frames), vec![0, 1100, 2050]);
    }

    #[test]
    fn a_jump_forward_does_not_sample_every_frame() {
        let mut s = FrameSampler::new(1000 * MS);
        assert_eq!(
            sampled(&mut s, [0, 10_000, 10_033, 10_500, 11_000]),
            vec![0, 10_000, 11_000]
        );
    }

    #[test]
    fn reset_samples_the_next_frame() {
        let mut s = FrameSampler::new(1000 * MS);
        assert!(s.sample(0));
        assert!(!s.sample(10 * MS));
        s.reset();
        assert!(s.sample(20 * MS));
    }
}
