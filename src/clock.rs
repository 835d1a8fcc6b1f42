//! Time as the core sees it: plain nanoseconds passed in by the caller.
//!
//! Envoy's clock is wall-clock time shared by all workers, and it can step backwards (NTP,
//! a VM migration). Every difference saturates, so a backwards step reads as "no time passed"
//! instead of an underflow or a panic.

use std::time::Duration;

/// A point in time, in nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`; zero when the clock went backwards.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    pub fn saturating_add(self, duration: Duration) -> Instant {
        Instant(self.0.saturating_add(nanos_saturating(duration)))
    }

    pub fn saturating_sub(self, duration: Duration) -> Instant {
        Instant(self.0.saturating_sub(nanos_saturating(duration)))
    }
}

/// A `Duration` in nanoseconds, clamped to `u64::MAX` (about 584 years).
pub fn nanos_saturating(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up: what the draft's `t` and `w` rate-limit parameters carry.
pub fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// `Retry-After` for a wait: whole seconds, rounded up, and at least one.
pub fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn backwards_step_reads_as_no_time_passed() {
        let before = Instant::from_nanos(5_000);
        let after = before.saturating_sub(Duration::from_nanos(3_000));
        assert_eq!(after.saturating_since(before), Duration::ZERO);
        assert_eq!(before.saturating_since(after), Duration::from_nanos(3_000));
    }

    #[test]
    fn seconds_round_up_and_retry_after_is_at_least_one() {
        assert_eq!(ceil_secs(Duration::from_millis(7_500)), 8);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
    }

    #[test]
    fn arithmetic_saturates_at_both_ends() {
        let end = Instant::from_nanos(u64::MAX - 1);
        assert_eq!(
            end.saturating_add(Duration::from_secs(1)).as_nanos(),
            u64::MAX
        );
        assert_eq!(
            Instant::from_nanos(1)
                .saturating_sub(Duration::from_secs(1))
                .as_nanos(),
            0
        );
        assert_eq!(nanos_saturating(Duration::MAX), u64::MAX);
        assert_eq!(end.saturating_add(Duration::MAX).as_nanos(), u64::MAX);
        assert_eq!(end.saturating_sub(Duration::MAX).as_nanos(), 0);
    }
}
