//! Cooperative cancellation of long forward passes. A frame encode or a prefill runs dozens of
//! layers (about 2 s on a CPU in f32); checking between layers bounds how long a flush or a
//! state change waits for the model to one layer instead of the whole pass.

use std::sync::atomic::{AtomicBool, Ordering};

/// Where the answer to "stop now?" comes from. Copy, so it is passed down by value.
#[derive(Clone, Copy, Default)]
pub struct Cancel<'a> {
    source: Source<'a>,
}

#[derive(Clone, Copy, Default)]
enum Source<'a> {
    #[default]
    Never,
    Flag(&'a AtomicBool),
    Probe(&'a (dyn Fn() -> bool + Sync)),
}

/// The message of the error a cancelled forward pass returns (it travels through candle's
/// error type between the layers; `LlamaVid` turns it into `ModelError::Cancelled`).
pub const CANCELLED: &str = "cancelled";

impl<'a> Cancel<'a> {
    /// Runs to the end.
    pub const NEVER: Cancel<'static> = Cancel {
        source: Source::Never,
    };

    /// Stops once `flag` is set.
    pub fn on_flag(flag: &'a AtomicBool) -> Self {
        Self {
            source: Source::Flag(flag),
        }
    }

    /// Stops once `probe` returns true (asked at every check: e.g. a deadline).
    pub fn on_probe(probe: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Self {
            source: Source::Probe(probe),
        }
    }

    /// `Some(flag)` becomes `on_flag`, `None` never cancels.
    pub fn from_option(flag: Option<&'a AtomicBool>) -> Self {
        flag.map_or(Self::default(), Self::on_flag)
    }

    pub fn is_cancelled(&self) -> bool {
        match self.source {
            Source::Never => false,
            Source::Flag(flag) => flag.load(Ordering::Relaxed),
            Source::Probe(probe) => probe(),
        }
    }

    /// Between two layers: an error once cancelled.
    pub fn check(&self) -> candle_core::Result<()> {
        if self.is_cancelled() {
            Err(candle_core::Error::Msg(CANCELLED.into()))
        } else {
            Ok(())
        }
    }
}

impl std::fmt::Debug for Cancel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match self.source {
            Source::Never => "never",
            Source::Flag(_) => "flag",
            Source::Probe(_) => "probe",
        };
        write!(f, "Cancel({source}, cancelled: {})", self.is_cancelled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn check_fails_once_cancelled() {
        let flag = AtomicBool::new(false);
        let cancel = Cancel::on_flag(&flag);
        assert!(cancel.check().is_ok());
        flag.store(true, Ordering::Relaxed);
        assert_eq!(cancel.check().unwrap_err().to_string(), CANCELLED);
        assert!(Cancel::NEVER.check().is_ok());
        assert!(Cancel::from_option(None).check().is_ok());
    }

    #[test]
    fn a_probe_is_asked_at_every_check() {
        let asked = AtomicUsize::new(0);
        let probe = || asked.fetch_add(1, Ordering::Relaxed) >= 2;
        let cancel = Cancel::on_probe(&probe);
        assert!(cancel.check().is_ok());
        assert!(cancel.check().is_ok());
        assert!(cancel.check().is_err());
        assert_eq!(asked.load(Ordering::Relaxed), 3);
    }
}
