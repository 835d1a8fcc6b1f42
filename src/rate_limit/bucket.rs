//! A token bucket computed as GCRA (the generic cell rate algorithm, as in the governor
//! crate): the whole state is one timestamp, the theoretical arrival time (TAT).
//!
//! A bucket of `capacity` tokens refilled at one token per `emission` is full when
//! `TAT <= now` and empty when `TAT >= now + capacity * emission`. Admitting a request of
//! cost `n` moves the TAT `n * emission` later. No timers: refill is the clock moving on.
//! Time saturates at `u64::MAX` nanoseconds (the year 2554), where every bucket is full.

use crate::clock::{nanos_saturating, Instant};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    capacity: u64,
    /// Time for one token to come back.
    emission_ns: u64,
    /// Time for the whole bucket to refill from empty: `capacity * emission`.
    tolerance_ns: u64,
}

/// What one check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub admitted: bool,
    /// The TAT to store when admitted. When refused, the TAT as read, but brought back to
    /// `now + capacity` if a clock step left it beyond: worth storing when it changed.
    pub tat: Instant,
    /// Tokens left after this request (if admitted) or now (if not).
    pub remaining: u64,
    /// How long until this request would be admitted; zero when it was.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub full_in: Duration,
}

impl Bucket {
    /// `None` when refilling is faster than one token per nanosecond.
    pub fn new(capacity: u64, refill_tokens: u64, refill_interval: Duration) -> Option<Bucket> {
        let emission_ns = nanos_saturating(refill_interval).checked_div(refill_tokens)?;
        (emission_ns > 0).then(|| Bucket {
            capacity,
            emission_ns,
            tolerance_ns: emission_ns.saturating_mul(capacity),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The time to refill the whole bucket from empty.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.tolerance_ns)
    }

    /// Checks a request of `cost` tokens against the stored TAT (`None`: a full bucket).
    pub fn check(&self, stored: Option<Instant>, now: Instant, cost: u64) -> Check {
        let limit = now.saturating_add(Duration::from_nanos(self.tolerance_ns));
        // Only a clock that stepped back leaves a TAT past `limit`: the bucket is then
        // empty, not emptier than empty for as long as the step.
        let tat = stored.map_or(now, |tat| tat.max(now).min(limit));
        let next = tat.saturating_add(Duration::from_nanos(self.emission_ns.saturating_mul(cost)));
        if next <= limit {
            Check {
                admitted: true,
                tat: next,
                remaining: self.tokens_between(next, limit),
                retry_after: Duration::ZERO,
                full_in: next.saturating_since(now),
            }
        } else {
            Check {
                admitted: false,
                tat,
                remaining: self.tokens_between(tat, limit),
                retry_after: next.saturating_since(limit),
                full_in: tat.saturating_since(now),
            }
        }
    }

    /// Gives back `cost` tokens taken by an admission that did not go ahead.
    pub fn refund(&self, tat: Instant, cost: u64) -> Instant {
        tat.saturating_sub(Duration::from_nanos(self.emission_ns.saturating_mul(cost)))
    }

    fn tokens_between(&self, from: Instant, to: Instant) -> u64 {
        nanos_saturating(to.saturating_since(from)) / self.emission_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SECOND: Duration = Duration::from_secs(1);

    fn at(secs_millis: u64) -> Instant {
        Instant::from_nanos(1_000_000_000_000 + secs_millis * 1_000_000)
    }

    fn bucket(capacity: u64, tokens: u64, interval: Duration) -> Bucket {
        match Bucket::new(capacity, tokens, interval) {
            Some(bucket) => bucket,
            None => panic!("invalid bucket"),
        }
    }

    /// Runs `n` requests of cost 1 at `now`, storing each admitted TAT.
    fn drain(bucket: &Bucket, tat: &mut Option<Instant>, now: Instant, n: u64) -> u64 {
        let mut admitted = 0;
        for _ in 0..n {
            let check = bucket.check(*tat, now, 1);
            *tat = Some(check.tat);
            admitted += u64::from(check.admitted);
        }
        admitted
    }

    #[test]
    fn a_full_bucket_admits_exactly_its_capacity_at_once() {
        let b = bucket(10, 1, SECOND);
        let mut tat = None;
        assert_eq!(drain(&b, &mut tat, at(0), 25), 10);
    }

    #[test]
    fn tokens_come_back_at_the_refill_rate() {
        let b = bucket(10, 5, SECOND); // a token every 200 ms
        let mut tat = None;
        assert_eq!(drain(&b, &mut tat, at(0), 10), 10);
        assert_eq!(drain(&b, &mut tat, at(199), 5), 0);
        assert_eq!(drain(&b, &mut tat, at(200), 5), 1);
        assert_eq!(drain(&b, &mut tat, at(1_200), 10), 5);
        assert_eq!(
            drain(&b, &mut tat, at(100_000), 100),
            10,
            "refill stops at capacity"
        );
    }

    #[test]
    fn sub_second_rates_are_exact() {
        let b = bucket(1, 3, Duration::from_millis(30)); // a token every 10 ms
        let mut tat = None;
        let admitted: u64 = (0..1_000).map(|ms| drain(&b, &mut tat, at(ms), 1)).sum();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn cost_takes_several_tokens_and_a_denial_takes_none() {
        let b = bucket(10, 1, SECOND);
        let first = b.check(None, at(0), 7);
        assert!(first.admitted);
        assert_eq!(first.remaining, 3);
        let denied = b.check(Some(first.tat), at(0), 4);
        assert!(!denied.admitted);
        assert_eq!(denied.tat, first.tat, "nothing taken");
        assert_eq!(denied.remaining, 3);
        assert_eq!(denied.retry_after, SECOND, "one more token is missing");
        assert_eq!(denied.full_in, 7 * SECOND);
        assert!(b.check(Some(first.tat), at(0), 3).admitted);
    }

    #[test]
    fn retry_after_is_when_the_request_would_pass() {
        let b = bucket(2, 1, 10 * SECOND);
        let mut tat = None;
        assert_eq!(drain(&b, &mut tat, at(0), 2), 2);
        let denied = b.check(tat, at(4_000), 1);
        assert_eq!(denied.retry_after, 6 * SECOND);
        assert!(!b.check(tat, at(9_999), 1).admitted);
        assert!(b.check(tat, at(10_000), 1).admitted);
    }

    #[test]
    fn a_standing_clock_refills_nothing() {
        let b = bucket(3, 1000, SECOND);
        let mut tat = None;
        assert_eq!(drain(&b, &mut tat, at(0), 3), 3);
        for _ in 0..1000 {
            assert!(!b.check(tat, at(0), 1).admitted);
        }
    }

    #[test]
    fn a_clock_stepping_back_empties_the_bucket_at_worst() {
        let b = bucket(5, 1, SECOND);
        let mut tat = None;
        assert_eq!(drain(&b, &mut tat, at(100_000), 5), 5);
        // The clock steps back an hour: no underflow, no hour-long lockout.
        let back = at(100_000).saturating_sub(Duration::from_secs(3600));
        let denied = b.check(tat, back, 1);
        assert!(!denied.admitted);
        assert_eq!(denied.retry_after, SECOND, "one token's wait, not an hour");
        assert_eq!(drain(&b, &mut tat, back, 5), 0);
        assert_eq!(drain(&b, &mut tat, back.saturating_add(SECOND), 5), 1);
    }

    #[test]
    fn a_clock_jumping_forward_refills_at_most_the_capacity() {
        let b = bucket(5, 1, SECOND);
        let mut tat = None;
        assert_eq!(drain(&b, &mut tat, at(0), 5), 5);
        let century = at(0).saturating_add(Duration::from_secs(100 * 365 * 86_400));
        assert_eq!(drain(&b, &mut tat, century, 50), 5);
    }

    #[test]
    fn refund_gives_back_exactly_what_was_taken() {
        let b = bucket(4, 1, SECOND);
        let taken = b.check(None, at(0), 3);
        let refunded = b.refund(taken.tat, 3);
        assert_eq!(b.check(Some(refunded), at(0), 4).remaining, 0);
        assert!(b.check(Some(refunded), at(0), 4).admitted);
    }

    #[test]
    fn extreme_parameters_saturate_instead_of_overflowing() {
        assert_eq!(
            Bucket::new(1, 2, Duration::from_nanos(1)),
            None,
            "faster than 1/ns"
        );
        assert_eq!(Bucket::new(1, 0, SECOND), None);
        let huge = bucket(u64::MAX, 1, Duration::from_secs(u64::MAX));
        let check = huge.check(None, at(0), u64::MAX);
        assert!(check.admitted);
        // Foreign state far in the future reads as an empty bucket, nothing worse.
        let b = bucket(10, 10, SECOND);
        let far = b.check(
            Some(Instant::from_nanos(u64::MAX)),
            Instant::from_nanos(0),
            1,
        );
        assert!(!far.admitted);
        assert_eq!(far.retry_after, Duration::from_millis(100));
    }
}
