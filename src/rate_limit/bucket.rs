//! A token bucket computed as GCRA (the generic cell rate algorithm, as in the governor
//! crate): the whole state is one timestamp, the theoretical arrival time (TAT).
//!
//! A bucket of `capacity` tokens refilled at one token per `emission` is full when
//! `TAT <= now` and empty when `TAT >= now + capacity * emission`. Admitting a request of
//! cost `n` moves the TAT `n * emission` later. No timers: refill is the clock moving on.
//!
//! The arithmetic is exact. `tokens` per `interval` is rarely a whole number of nanoseconds
//! per token (7×10^8 per second is 1.43 ns), so time is counted in ticks of `1/tokens` ns,
//! where a token is exactly `interval` ticks; in 128 bits, with the parameters
//! [`Bucket::new`] accepts, no sum or product can overflow, so nothing saturates into a looser
//! limit, whatever the window (10^9 tokens refilled one per 17 s, 1000 one per 200 days).

use crate::clock::Instant;
use std::time::Duration;

/// A theoretical arrival time, in ticks of `1/tokens` nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tat(pub u128);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    capacity: u64,
    /// Ticks per nanosecond: the refill's `tokens`.
    ticks_per_ns: u64,
    /// Ticks for one token to come back: the refill's `interval` in nanoseconds.
    emission: u128,
    /// Ticks to refill the whole bucket from empty: `capacity * emission`.
    tolerance: u128,
}

/// What one check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub admitted: bool,
    /// The TAT to store when admitted. When refused, the TAT as read, but brought back to
    /// `now + capacity` if a clock step left it beyond: worth storing when it changed.
    pub tat: Tat,
    /// Tokens left after this request (if admitted) or now (if not).
    pub remaining: u64,
    /// How long until this request would be admitted; zero when it was.
    pub retry_after: Duration,
    /// How long until one more token is there (the RateLimit draft's `t`); zero when full.
    pub more_in: Duration,
}

/// What a [`Bucket::grant`] gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Tokens granted: none when fewer than `least` were there.
    pub granted: u64,
    /// The TAT to store when tokens were granted.
    pub tat: Tat,
    /// The granted tokens may be spent before this instant, not at or after it.
    pub valid_until: Instant,
    /// How long until `least` tokens are there; zero when granted.
    pub retry_after: Duration,
    /// How long until one more token is there; zero when full.
    pub more_in: Duration,
}

impl Bucket {
    /// `None` when refilling is faster than one token per nanosecond, or when the parameters
    /// are too large for exact arithmetic (far beyond what the configuration accepts).
    pub fn new(capacity: u64, refill_tokens: u64, refill_interval: Duration) -> Option<Bucket> {
        let interval_ns = u64::try_from(refill_interval.as_nanos()).ok()?;
        if refill_tokens == 0 || refill_tokens > interval_ns {
            return None;
        }
        let emission = u128::from(interval_ns);
        let tolerance = emission * u128::from(capacity);
        // The largest sum the checks form: the latest time the clock can read, in ticks, plus
        // the tolerance and one more request's worth.
        u128::from(u64::MAX)
            .checked_mul(u128::from(refill_tokens))?
            .checked_add(tolerance.checked_mul(2)?)?;
        Some(Bucket {
            capacity,
            ticks_per_ns: refill_tokens,
            emission,
            tolerance,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Ticks per nanosecond, stored beside a TAT so that a changed refill can read it.
    pub fn ticks_per_ns(&self) -> u64 {
        self.ticks_per_ns
    }

    /// The time to refill the whole bucket from empty.
    pub fn window(&self) -> Duration {
        self.duration(self.tolerance)
    }

    /// `now` in ticks.
    pub fn ticks(&self, now: Instant) -> Tat {
        Tat(u128::from(now.as_nanos()) * u128::from(self.ticks_per_ns))
    }

    /// A TAT stored at another tick rate (the refill changed), in this bucket's ticks.
    pub fn rescale(&self, tat: Tat, ticks_per_ns: u64) -> Tat {
        if ticks_per_ns == self.ticks_per_ns || ticks_per_ns == 0 {
            return tat;
        }
        let ns = tat.0.div_ceil(u128::from(ticks_per_ns));
        Tat(ns.saturating_mul(u128::from(self.ticks_per_ns)))
    }

    /// Checks a request of `cost` tokens against the stored TAT (`None`: a full bucket).
    pub fn check(&self, stored: Option<Tat>, now: Instant, cost: u64) -> Check {
        let now = self.ticks(now).0;
        let limit = now + self.tolerance;
        // Only a clock that stepped back leaves a TAT past `limit`: the bucket is then
        // empty, not emptier than empty for as long as the step.
        let tat = stored.map_or(now, |tat| tat.0.clamp(now, limit));
        let next = tat + self.emission * u128::from(cost);
        if next <= limit {
            Check {
                admitted: true,
                tat: Tat(next),
                remaining: self.tokens_in(limit - next),
                retry_after: Duration::ZERO,
                more_in: self.more_in(limit - next),
            }
        } else {
            Check {
                admitted: false,
                tat: Tat(tat),
                remaining: self.tokens_in(limit - tat),
                retry_after: self.duration(next - limit),
                more_in: self.more_in(limit - tat),
            }
        }
    }

    /// Takes up to `ask` tokens, and at least `least`, out of a bucket whose last `reserve`
    /// tokens are never handed out: the grant of a global rule, whose tokens an Envoy spends
    /// later, until [`Grant::valid_until`].
    ///
    /// Why that bounds the fleet: a lease's tokens stay valid until `max(TAT before it, now)`
    /// plus `reserve` tokens' time. At any instant the leases still valid are the latest
    /// ones, and what they hold sums to at most the TAT moves since the oldest of them, so
    /// what the bucket shows plus what valid leases hold never exceeds the capacity: the
    /// tokens spent, wherever and whenever, conform to the bucket as if spent from it.
    pub fn grant(
        &self,
        stored: Option<Tat>,
        now: Instant,
        least: u64,
        ask: u64,
        reserve: u64,
    ) -> Grant {
        let now_ticks = self.ticks(now).0;
        let tat = stored.map_or(now_ticks, |tat| {
            tat.0.clamp(now_ticks, now_ticks + self.tolerance)
        });
        let held_back = self.emission * u128::from(reserve);
        let limit = (now_ticks + self.tolerance).saturating_sub(held_back);
        let available = self.tokens_in(limit.saturating_sub(tat));
        let valid_until = Instant::from_nanos(
            u64::try_from((tat + held_back) / u128::from(self.ticks_per_ns)).unwrap_or(u64::MAX),
        );
        if available < least {
            return Grant {
                granted: 0,
                tat: Tat(tat),
                valid_until,
                retry_after: self
                    .duration((tat + self.emission * u128::from(least)).saturating_sub(limit)),
                more_in: self.more_in(now_ticks + self.tolerance - tat),
            };
        }
        let granted = ask.max(least).min(available);
        let next = tat + self.emission * u128::from(granted);
        Grant {
            granted,
            tat: Tat(next),
            valid_until,
            retry_after: Duration::ZERO,
            more_in: self.more_in(now_ticks + self.tolerance - next),
        }
    }

    /// Gives back `cost` tokens taken by an admission that did not go ahead.
    pub fn refund(&self, tat: Tat, cost: u64) -> Tat {
        Tat(tat.0.saturating_sub(self.emission * u128::from(cost)))
    }

    /// With `free` ticks of room in the bucket, how long until the next whole token.
    fn more_in(&self, free: u128) -> Duration {
        if free >= self.tolerance {
            return Duration::ZERO;
        }
        let next_token = (free / self.emission + 1) * self.emission;
        self.duration(next_token - free)
    }

    /// Whole tokens in a span of ticks.
    fn tokens_in(&self, ticks: u128) -> u64 {
        u64::try_from(ticks / self.emission).unwrap_or(u64::MAX)
    }

    /// A span of ticks as a duration, rounded up to the nanosecond so a wait is never short.
    fn duration(&self, ticks: u128) -> Duration {
        let ns = ticks.div_ceil(u128::from(self.ticks_per_ns));
        let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
        Duration::new(secs, (ns % 1_000_000_000) as u32)
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
    fn drain(bucket: &Bucket, tat: &mut Option<Tat>, now: Instant, n: u64) -> u64 {
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

    /// Issue 16: the RateLimit draft's `t` is the time until more quota, which the header
    /// once gave as the time until the bucket was full (10 s here instead of 2).
    #[test]
    fn more_in_is_the_time_until_the_next_token() {
        let b = bucket(5, 1, 2 * SECOND);
        let mut tat = None;
        assert_eq!(b.check(tat, at(0), 1).more_in, 2 * SECOND);
        drain(&b, &mut tat, at(0), 5);
        let refused = b.check(tat, at(500), 1);
        assert!(!refused.admitted);
        assert_eq!(refused.more_in, Duration::from_millis(1_500));
        assert_eq!(refused.retry_after, Duration::from_millis(1_500));
        let costly = b.check(tat, at(500), 3);
        assert_eq!(costly.more_in, Duration::from_millis(1_500));
        assert_eq!(costly.retry_after, Duration::from_millis(5_500));
        assert_eq!(
            b.check(tat, at(2_100), 1).more_in,
            Duration::from_millis(1_900)
        );
        assert_eq!(b.check(tat, at(60_000), 0).more_in, Duration::ZERO, "full");
        assert_eq!(
            b.grant(tat, at(500), 1, 1, 0).more_in,
            Duration::from_millis(1_500)
        );
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
        assert_eq!(denied.more_in, SECOND, "the next token, not a full bucket");
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
    fn parameters_beyond_exact_arithmetic_are_refused() {
        assert_eq!(
            Bucket::new(1, 2, Duration::from_nanos(1)),
            None,
            "faster than 1/ns"
        );
        assert_eq!(Bucket::new(1, 0, SECOND), None);
        assert_eq!(
            Bucket::new(u64::MAX, 1, Duration::from_secs(u64::MAX)),
            None
        );
        assert_eq!(
            Bucket::new(u64::MAX, u64::MAX, Duration::from_nanos(u64::MAX)),
            None
        );
        // The configuration's extremes are all exact.
        let largest = Duration::from_secs(366 * 86_400);
        let ns = u64::try_from(largest.as_nanos()).unwrap_or(0);
        assert!(Bucket::new(1_000_000_000, ns, largest).is_some());
        assert!(Bucket::new(1_000_000_000, 1, largest).is_some());
    }

    #[test]
    fn foreign_state_far_in_the_future_reads_as_an_empty_bucket() {
        let b = bucket(10, 10, SECOND);
        let far = b.check(Some(Tat(u128::MAX)), Instant::from_nanos(0), 1);
        assert!(!far.admitted);
        assert_eq!(far.retry_after, Duration::from_millis(100));
        let end_of_time = b.check(None, Instant::from_nanos(u64::MAX), 10);
        assert!(end_of_time.admitted, "no overflow at the clock's end");
    }

    /// Issue 15, defect 6: `now + window` saturated for windows of centuries, and the
    /// bucket then admitted everything.
    #[test]
    fn a_window_of_centuries_still_admits_exactly_the_capacity() {
        let b = bucket(1000, 1, Duration::from_secs(200 * 86_400));
        let mut tat = None;
        assert_eq!(drain(&b, &mut tat, at(0), 1_500), 1_000);
        assert_eq!(drain(&b, &mut tat, at(86_400_000), 10), 0, "a day later");
        let later = at(0).saturating_add(Duration::from_secs(200 * 86_400));
        assert_eq!(
            drain(&b, &mut tat, later, 10),
            1,
            "200 days later: one token"
        );

        let b = bucket(1_000_000_000, 1, Duration::from_secs(17));
        let all = b.check(None, at(0), 1_000_000_000);
        assert!(all.admitted);
        assert!(!b.check(Some(all.tat), at(0), 1).admitted);
        assert!(!b.check(Some(all.tat), at(16_999), 1).admitted);
        assert!(b.check(Some(all.tat), at(17_000), 1).admitted);
        assert_eq!(b.window(), Duration::from_secs(17_000_000_000));
    }

    /// Issue 15, defect 6: `interval / tokens` rounded down, so 7×10^8 tokens per second
    /// refilled at one per ns, 43% more than configured.
    #[test]
    fn refill_rates_that_are_not_whole_nanoseconds_are_exact() {
        let b = bucket(1_000_000_000, 700_000_000, SECOND);
        let empty = b.check(None, at(0), 1_000_000_000);
        assert!(empty.admitted);
        let second = b.check(Some(empty.tat), at(1_000), 1);
        assert_eq!(
            second.remaining,
            700_000_000 - 1,
            "exactly 7×10^8 back in 1 s"
        );
        assert!(b.check(Some(empty.tat), at(1_000), 700_000_000).admitted);
        assert!(!b.check(Some(empty.tat), at(1_000), 700_000_001).admitted);

        let b = bucket(3, 3, Duration::from_nanos(10)); // a token every 3⅓ ns
        let drained = b.check(None, at(0), 3);
        let now = |ns| at(0).saturating_add(Duration::from_nanos(ns));
        assert!(!b.check(Some(drained.tat), now(3), 1).admitted);
        assert!(b.check(Some(drained.tat), now(4), 1).admitted);
        assert!(!b.check(Some(drained.tat), now(6), 2).admitted);
        assert!(b.check(Some(drained.tat), now(7), 2).admitted);
        assert_eq!(
            b.check(Some(drained.tat), now(3), 1).retry_after,
            Duration::from_nanos(1),
            "3⅓ ns rounds up"
        );
    }

    #[test]
    fn a_tat_stored_at_another_rate_reads_at_the_same_time() {
        let before = bucket(10, 5, SECOND);
        let taken = before.check(None, at(0), 10);
        let after = bucket(10, 7, SECOND);
        let rescaled = after.rescale(taken.tat, before.ticks_per_ns());
        assert_eq!(after.check(Some(rescaled), at(0), 1).remaining, 0);
        assert_eq!(
            after.check(Some(rescaled), at(1_000), 1).remaining,
            2,
            "the TAT still lies 2 s ahead: a second later 3 tokens are back at 7/s, one taken"
        );
    }

    /// Every rule the configuration accepts, over the whole range of its numbers (capacity,
    /// refill tokens and interval, cost), is enforced as written: from a full bucket, what
    /// requests at any times get admitted never exceeds the capacity plus what the refill
    /// gave back meanwhile, and a refused request passes once its Retry-After has passed.
    /// What the configuration refuses is exactly what cannot be enforced so.
    #[test]
    fn every_accepted_rule_admits_at_most_its_capacity_plus_its_refill() {
        use crate::testing::{parsed_exactly_when, Cases, T0};
        const YEAR_NS: u64 = 366 * 86_400 * 1_000_000_000;
        let mut cases = Cases::new(0x00b0_cce7);
        for case in 0..2_000 {
            let capacity = cases.in_range(1, 1_000_000_001);
            let interval_ns = cases.in_range(999_999, YEAR_NS + 1);
            let tokens = cases.in_range(1, interval_ns.saturating_mul(2));
            let cost = cases.in_range(1, capacity + 1);
            let json = format!(
                r#"{{"rate_limit": {{"rules": [{{"name": "r", "capacity": {capacity}, "cost": {cost},
                    "refill": {{"tokens": {tokens}, "interval": "{interval_ns}ns"}}}}]}}}}"#
            );
            let enforceable = (1..=1_000_000_000).contains(&capacity)
                && (1_000_000..=YEAR_NS).contains(&interval_ns)
                && tokens <= interval_ns
                && cost <= capacity;
            let rule = match parsed_exactly_when(enforceable, &json, case) {
                Ok(config) => config.rate_limit.and_then(|r| r.rules.into_iter().next()),
                Err(err) => {
                    assert!(err.path.starts_with("rate_limit.rules[0]."), "{err}");
                    continue;
                }
            };
            let Some(rule) = rule else {
                panic!("case {case}: no rule")
            };
            let (bucket, cost) = (rule.bucket, rule.cost);
            let (mut tat, mut now, mut admitted) = (None, T0, 0u128);
            for _ in 0..64 {
                // Mostly bursts, sometimes waits of up to three refills of the whole bucket.
                let gap = match cases.next() % 4 {
                    0 | 1 => 0,
                    2 => cases.in_range(0, interval_ns),
                    _ => cases.in_range(
                        0,
                        u64::try_from(bucket.window().as_nanos())
                            .unwrap_or(u64::MAX)
                            .saturating_mul(3)
                            .min(1 << 56),
                    ),
                };
                now = now.saturating_add(Duration::from_nanos(gap));
                let check = bucket.check(tat, now, cost);
                if check.admitted {
                    tat = Some(check.tat);
                    admitted += u128::from(cost);
                    let elapsed = u128::from(now.as_nanos() - T0.as_nanos());
                    let allowed = u128::from(capacity) * u128::from(interval_ns)
                        + u128::from(tokens) * elapsed;
                    assert!(
                        admitted * u128::from(interval_ns) <= allowed,
                        "case {case}: {json}: {admitted} admitted in {elapsed} ns"
                    );
                } else if u128::from(now.as_nanos()) + check.retry_after.as_nanos()
                    <= u128::from(u64::MAX)
                {
                    // (A wait past the year 2554, the clock's end, is exact too: the request
                    // is refused until then.)
                    let later = now.saturating_add(check.retry_after);
                    assert!(
                        bucket.check(tat, later, cost).admitted,
                        "case {case}: {json}: refused again after its Retry-After"
                    );
                }
            }
        }
    }
}
