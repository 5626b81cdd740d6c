//! Simulated durations and how the global time scale shrinks them.

use std::time::Duration;

pub use dishpatch_runtime::time::{parse_duration, parse_scale, scale};

/// Background retries never spin faster than this, whatever the scale.
const MIN_TICK: Duration = Duration::from_millis(100);
/// How often waiting orders and live offers are looked at, before scaling.
const TICK: Duration = Duration::from_millis(500);

/// The simulated courier's timings, already scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// From assignment to pick-up.
    pub pickup: Duration,
    /// From pick-up to drop-off.
    pub travel: Duration,
    /// How long an offer waits for an answer.
    pub offer_timeout: Duration,
    /// How often waiting orders are retried and offers looked at.
    pub tick: Duration,
}

impl Timing {
    pub fn new(pickup: Duration, travel: Duration, offer_timeout: Duration, factor: f64) -> Self {
        Self {
            pickup: scale(pickup, factor),
            travel: scale(travel, factor),
            offer_timeout: scale(offer_timeout, factor),
            tick: scale(TICK, factor).max(MIN_TICK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_scales_everything_but_never_spins() {
        let t = Timing::new(
            Duration::from_secs(60),
            Duration::from_secs(300),
            Duration::from_secs(30),
            0.01,
        );
        assert_eq!(t.pickup, Duration::from_millis(600));
        assert_eq!(t.travel, Duration::from_secs(3));
        assert_eq!(t.offer_timeout, Duration::from_millis(300));
        assert_eq!(t.tick, MIN_TICK);
        let instant = Timing::new(t.pickup, t.travel, t.offer_timeout, 0.0);
        assert_eq!(instant.pickup, Duration::ZERO);
        assert_eq!(instant.tick, MIN_TICK);
        assert_eq!(
            Timing::new(t.pickup, t.travel, t.offer_timeout, 1.0).tick,
            TICK
        );
    }
}
