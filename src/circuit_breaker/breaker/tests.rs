use super::*;
use crate::circuit_breaker::CircuitBreakerConfig;
use crate::grpc::GrpcStatus;
use crate::pipeline::config::Config;
use crate::store::MemoryStore;
use crate::testing::{at, config, T0};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const OK: Outcome = Outcome::Success { slow: false };
const FAIL: Outcome = Outcome::Failure { slow: false };

fn breaker(fields: &str) -> (BreakerConfig, SharedDataSettings) {
    let json = format!(
        r#"{{"circuit_breaker": {{"breakers": [{{"name": "b", "scope": {{"match": {{}}}}, {fields}}}]}}}}"#
    );
    match config(&json) {
        Config {
            circuit_breaker: Some(CircuitBreakerConfig { mut breakers }),
            shared_data,
            ..
        } => (breakers.remove(0), shared_data),
        other => panic!("{other:?}"),
    }
}

/// One breaker on one store, driven like Envoy drives it.
struct Bench {
    breaker: BreakerConfig,
    settings: SharedDataSettings,
    store: MemoryStore,
    transitions: Vec<(Phase, Phase)>,
    /// The VM's sighting (see [`Bench::on_another_worker`]).
    seen: Cell<Option<Sighting>>,
    /// Reads of the state made through `admit` and `finish`.
    reads: Cell<u32>,
}

/// The bench's store, counting reads of the state.
struct Counting<'a> {
    store: &'a MemoryStore,
    reads: &'a Cell<u32>,
}

impl Store for Counting<'_> {
    fn get(&self, key: &str) -> Result<Option<store::Versioned>, StoreError> {
        if !key.contains("alarm") {
            self.reads.set(self.reads.get() + 1);
        }
        self.store.get(key)
    }

    fn set(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<std::num::NonZeroU32>,
    ) -> Result<(), StoreError> {
        self.store.set(key, value, cas)
    }
}

impl Bench {
    fn new(fields: &str) -> Bench {
        let (breaker, settings) = breaker(fields);
        Bench {
            breaker,
            settings,
            store: MemoryStore::default(),
            transitions: Vec::new(),
            seen: Cell::new(None),
            reads: Cell::new(0),
        }
    }

    fn alarm_up(&self) -> bool {
        self.store
            .get("resilience/t/cb-alarm/b")
            .unwrap()
            .is_some_and(|v| !v.bytes.is_empty())
    }

    fn counting(&self) -> Counting<'_> {
        Counting {
            store: &self.store,
            reads: &self.reads,
        }
    }

    /// Runs `act` as a worker whose VM has its own sighting, `seen`.
    fn on_another_worker<R>(
        &mut self,
        seen: &Cell<Option<Sighting>>,
        act: impl FnOnce(&mut Bench) -> R,
    ) -> R {
        self.seen.swap(seen);
        let result = act(self);
        self.seen.swap(seen);
        result
    }

    fn admit(&mut self, now: Instant) -> Admission {
        let (admission, effects) = admit(
            &self.counting(),
            &ns(),
            &keys(&ns(), &self.breaker),
            &self.breaker,
            now,
            self.settings,
            &self.seen,
        )
        .unwrap();
        self.note(effects);
        admission
    }

    fn finish(&mut self, permit: Permit, outcome: Outcome, now: Instant) {
        let effects = record(
            &self.counting(),
            &ns(),
            &keys(&ns(), &self.breaker),
            &self.breaker,
            permit,
            outcome,
            now,
            &self.seen,
        )
        .unwrap();
        self.note(effects);
    }

    /// A whole request: admitted or not, and if admitted, its outcome recorded.
    fn call(&mut self, outcome: Outcome, now: Instant) -> bool {
        match self.admit(now) {
            Admission::Pass(permit) => {
                self.finish(permit, outcome, now);
                true
            }
            Admission::Reject { .. } => false,
        }
    }

    fn note(&mut self, effects: Effects) {
        if let Some(t) = effects.transition {
            self.transitions.push((t.from, t.to));
        }
    }

    fn phase(&self) -> Phase {
        read::<BreakerState>(&self.store, "resilience/t/cb/b")
            .unwrap()
            .map_or(Phase::Closed, |s| s.phase)
    }
}

fn ns() -> Namespace {
    Namespace::new("t")
}

use crate::store::read;

const CONSECUTIVE: &str = r#""trip": {"consecutive_failures": 3}, "open": {"duration": "10s"}, "half_open": {"max_probes": 2}"#;

/// Steady successes through a closed breaker with no failure streak read its state once per
/// 100 ms: each admission and each end reads only the empty alarm.
#[test]
fn a_closed_breaker_without_failures_reads_its_state_once() {
    let mut b = Bench::new(CONSECUTIVE);
    assert!(b.call(FAIL, at(0)) && b.call(OK, at(1)));
    b.reads.set(0);
    for ms in 2..52 {
        assert!(b.call(OK, at(ms)));
    }
    assert_eq!(
        b.reads.get(),
        1,
        "the first admission after the streak ended"
    );
    // A failure is read and written at its end; the success that ends the streak reads at
    // its admission (the alarm is up) and at its end; the next success at its admission.
    assert!(b.call(FAIL, at(52)));
    assert_eq!(b.reads.get(), 2);
    assert!(b.call(OK, at(53)));
    assert_eq!(b.reads.get(), 4);
    assert!(b.call(OK, at(54)) && b.call(OK, at(55)));
    assert_eq!(b.reads.get(), 5);
    // A sighting lasts 100 ms: then one read renews it.
    assert!(b.call(OK, at(155)) && b.call(OK, at(156)));
    assert_eq!(b.reads.get(), 6);
}

/// Another worker trips the breaker: this worker's next admission sees it (the alarm is up),
/// and the outcome it admitted before the trip belongs to the closed generation.
#[test]
fn a_trip_on_another_worker_is_seen_at_the_next_admission() {
    let mut b = Bench::new(
        r#""trip": {"consecutive_failures": 1}, "open": {"duration": "1s"}, "half_open": {"max_probes": 1}"#,
    );
    let Admission::Pass(held) = b.admit(at(0)) else {
        panic!("closed")
    };
    let other = Cell::new(None);
    assert!(b.on_another_worker(&other, |b| b.call(FAIL, at(1))));
    assert!(matches!(b.admit(at(2)), Admission::Reject { .. }));
    b.finish(held, FAIL, at(3));
    assert_eq!(b.transitions, [(Phase::Closed, Phase::Open)]);
    // Refused from the open sighting, without a read, until the breaker may leave open.
    let reads = b.reads.get();
    assert!(matches!(b.admit(at(999)), Admission::Reject { .. }));
    assert_eq!(b.reads.get(), reads);
    assert!(matches!(
        b.admit(at(1_001)),
        Admission::Pass(Permit::Probe { .. })
    ));
    assert!(
        b.on_another_worker(&other, |b| !b.call(OK, at(1_001))),
        "the one probe is out"
    );
}

/// A VM of an older build trips the breaker without raising the alarm (as during an upgrade
/// that keeps the `vm_id`): a worker that saw it clean goes on answering from its sighting,
/// but never past the open duration, so it reads the state by the time the breaker goes
/// half-open and the probes stay within `max_probes`.
#[test]
fn a_trip_without_the_alarm_never_outlasts_the_open_duration() {
    let mut b = Bench::new(
        r#""trip": {"consecutive_failures": 1}, "open": {"duration": "1ms"}, "half_open": {"max_probes": 1}"#,
    );
    assert!(b.call(OK, at(0)));
    let tripped_at = at(0).saturating_add(Duration::from_micros(500));
    let (open, _) = b.breaker.trip(
        &BreakerState::closed(b.breaker.window, 0),
        tripped_at,
        Phase::Closed,
        "an older build".to_owned(),
    );
    assert!(b
        .store
        .set("resilience/t/cb/b", &store::encode(&open), None)
        .is_ok());
    let stale_at = tripped_at.saturating_add(Duration::from_micros(100));
    assert!(matches!(
        b.admit(stale_at),
        Admission::Pass(Permit::Closed { .. })
    ));
    let half_open_at = tripped_at.saturating_add(Duration::from_millis(1));
    assert!(matches!(
        b.admit(half_open_at),
        Admission::Pass(Permit::Probe { .. })
    ));
    assert!(matches!(b.admit(half_open_at), Admission::Reject { .. }));
    let other = Cell::new(None);
    assert!(b.on_another_worker(&other, |b| !b.call(OK, half_open_at)));
}

/// Whenever the alarm is down, the state is clean: a failure raises it before its write, and
/// the success that ends the streak lowers it after its own.
#[test]
fn the_alarm_is_up_exactly_while_the_breaker_is_not_clean() {
    let mut b = Bench::new(CONSECUTIVE);
    assert!(b.call(OK, at(0)));
    assert!(!b.alarm_up());
    assert!(b.call(FAIL, at(1)));
    assert!(b.alarm_up());
    assert!(b.call(OK, at(2)));
    assert!(!b.alarm_up());
    assert!(b.call(FAIL, at(3)) && b.call(FAIL, at(4)) && b.call(FAIL, at(5)));
    assert_eq!(b.phase(), Phase::Open);
    assert!(b.alarm_up());
    assert!(b.call(OK, at(10_005)) && b.call(OK, at(10_005)));
    assert_eq!(b.phase(), Phase::Closed);
    assert!(!b.alarm_up(), "closed again, clean");
}

/// An alarm left up over a clean state (its raiser lost a race, or failed) comes down at the
/// next write, or the next recording that writes nothing, so readers stop reading the state.
#[test]
fn an_alarm_left_up_over_a_clean_state_comes_down() {
    let mut b = Bench::new(CONSECUTIVE);
    assert!(b.call(OK, at(0)));
    // State must exist for a write-back: a failure and the success that ends it.
    assert!(b.call(FAIL, at(1)) && b.call(OK, at(2)));
    assert!(b.store.set("resilience/t/cb-alarm/b", &[1], None).is_ok());
    assert!(b.call(OK, at(3)));
    assert!(!b.alarm_up());
    let reads = b.reads.get();
    assert!(b.call(OK, at(4)) && b.call(OK, at(5)));
    assert_eq!(
        b.reads.get(),
        reads + 1,
        "one read to see it down, then none"
    );
    // A windowed breaker's clean write lowers it too.
    let mut w = Bench::new(
        r#""trip": {"failure_rate_percent": 50, "minimum_calls": 10, "window": {"calls": 20}}"#,
    );
    assert!(w.call(OK, at(0)));
    assert!(w.store.set("resilience/t/cb-alarm/b", &[1], None).is_ok());
    assert!(w.call(OK, at(1)));
    assert!(!w.alarm_up());
}

/// A raise another writer made after this writer read the alarm is never lowered by it.
#[test]
fn a_writer_never_lowers_an_alarm_raised_after_it_read_it() {
    let mut b = Bench::new(CONSECUTIVE);
    assert!(b.call(FAIL, at(0)));
    // The streak's end reads the alarm, then the state; meanwhile another failure raises the
    // alarm again (a new version): the compare-and-swap that would lower it fails.
    let store = RaceAfterAlarmRead {
        inner: &b.store,
        raced: Cell::new(false),
    };
    let effects = record(
        &store,
        &ns(),
        &keys(&ns(), &b.breaker),
        &b.breaker,
        Permit::Closed { generation: 0 },
        OK,
        at(1),
        &Cell::new(None),
    );
    assert!(effects.is_ok());
    assert!(store.raced.get());
    assert!(b.alarm_up());
}

/// Raises the alarm once, right after the first read of it.
struct RaceAfterAlarmRead<'a> {
    inner: &'a MemoryStore,
    raced: Cell<bool>,
}

impl Store for RaceAfterAlarmRead<'_> {
    fn get(&self, key: &str) -> Result<Option<store::Versioned>, StoreError> {
        let got = self.inner.get(key);
        if key.contains("alarm") && !self.raced.replace(true) {
            self.inner.set(key, &[1], None)?;
        }
        got
    }

    fn set(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<std::num::NonZeroU32>,
    ) -> Result<(), StoreError> {
        self.inner.set(key, value, cas)
    }
}

/// A clock that went back never extends a sighting: the VM reads the state.
#[test]
fn a_sighting_from_the_future_is_read_again() {
    let mut b = Bench::new(CONSECUTIVE);
    assert!(b.call(OK, at(1_000)));
    let reads = b.reads.get();
    assert!(b.call(OK, at(500)));
    assert_eq!(b.reads.get(), reads + 1);
}

/// A breaker with a window records every outcome, so its ends read and write; its admissions
/// answer from the sighting.
#[test]
fn a_windowed_breaker_reads_at_the_end_only() {
    let mut b = Bench::new(
        r#""trip": {"failure_rate_percent": 50, "minimum_calls": 10, "window": {"calls": 20}}"#,
    );
    assert!(b.call(OK, at(0)));
    b.reads.set(0);
    for ms in 1..=10 {
        assert!(b.call(OK, at(ms)));
    }
    assert_eq!(b.reads.get(), 10);
}

#[test]
fn opens_after_exactly_the_configured_consecutive_failures() {
    let mut b = Bench::new(CONSECUTIVE);
    assert!(b.call(FAIL, T0) && b.call(FAIL, T0));
    assert!(b.call(OK, T0), "a success resets the count");
    assert!(b.call(FAIL, T0) && b.call(FAIL, T0));
    assert_eq!(b.phase(), Phase::Closed);
    assert!(b.call(FAIL, T0));
    assert_eq!(b.phase(), Phase::Open);
    assert_eq!(b.transitions, [(Phase::Closed, Phase::Open)]);
    assert_eq!(
        b.admit(at(4_000)),
        Admission::Reject {
            retry_after: Duration::from_secs(6)
        }
    );
}

#[test]
fn a_closed_breaker_is_checked_without_writing() {
    let mut b = Bench::new(CONSECUTIVE);
    assert!(b.call(OK, T0), "successes on a fresh breaker write nothing");
    assert!(b.store.is_empty());
    assert!(b.call(FAIL, T0));
    let version = b.store.get("resilience/t/cb/b").unwrap().map(|v| v.version);
    for _ in 0..5 {
        assert!(matches!(
            b.admit(T0),
            Admission::Pass(Permit::Closed { .. })
        ));
    }
    assert_eq!(
        b.store.get("resilience/t/cb/b").unwrap().map(|v| v.version),
        version
    );
}

#[test]
fn half_open_admits_at_most_the_probe_budget_and_closes_on_successes() {
    let mut b = Bench::new(CONSECUTIVE);
    (0..3).for_each(|_| assert!(b.call(FAIL, T0)));
    let probes: Vec<Admission> = (0..5).map(|_| b.admit(at(10_000))).collect();
    let permits: Vec<Permit> = probes
        .iter()
        .filter_map(|a| match a {
            Admission::Pass(p) => Some(*p),
            Admission::Reject { .. } => None,
        })
        .collect();
    assert_eq!(permits.len(), 2, "{probes:?}");
    assert!(permits.iter().all(|p| matches!(p, Permit::Probe { .. })));
    assert_eq!(b.phase(), Phase::HalfOpen);
    b.finish(permits[0], OK, at(10_100));
    assert_eq!(b.phase(), Phase::HalfOpen, "two successes needed");
    b.finish(permits[1], OK, at(10_200));
    assert_eq!(b.phase(), Phase::Closed);
    assert_eq!(
        b.transitions,
        [
            (Phase::Closed, Phase::Open),
            (Phase::Open, Phase::HalfOpen),
            (Phase::HalfOpen, Phase::Closed)
        ]
    );
    assert!(
        b.call(FAIL, at(10_300)) && b.call(FAIL, at(10_300)),
        "closed again, count restarted"
    );
    assert_eq!(b.phase(), Phase::Closed);
}

#[test]
fn a_failed_probe_reopens_with_a_longer_open_duration() {
    let mut b = Bench::new(
        r#""trip": {"consecutive_failures": 1}, "open": {"duration": "10s", "backoff_multiplier": 2, "max_duration": "25s"}"#,
    );
    assert!(b.call(FAIL, T0));
    assert!(b.call(FAIL, at(10_000)), "the probe goes through");
    assert_eq!(b.phase(), Phase::Open);
    assert_eq!(
        b.admit(at(10_000)),
        Admission::Reject {
            retry_after: Duration::from_secs(20)
        }
    );
    assert!(b.call(FAIL, at(30_000)));
    assert_eq!(
        b.admit(at(30_000)),
        Admission::Reject {
            retry_after: Duration::from_secs(25)
        },
        "capped"
    );
    assert!(b.call(OK, at(55_000)));
    assert_eq!(b.phase(), Phase::Closed);
    assert!(b.call(FAIL, at(56_000)));
    assert_eq!(
        b.admit(at(56_000)),
        Admission::Reject {
            retry_after: Duration::from_secs(10)
        },
        "backoff reset on close"
    );
}

#[test]
fn backoff_without_a_cap_grows_up_to_a_day() {
    let (b, _) = breaker(
        r#""trip": {"consecutive_failures": 1}, "open": {"duration": "1s", "backoff_multiplier": 3}"#,
    );
    assert_eq!(b.open_for(1), Duration::from_secs(1));
    assert_eq!(b.open_for(3), Duration::from_secs(9));
    assert_eq!(b.open_for(100), Duration::from_secs(86_400));
    let (flat, _) = breaker(r#""trip": {"consecutive_failures": 1}, "open": {"duration": "5s"}"#);
    assert_eq!(
        flat.open_for(7),
        Duration::from_secs(5),
        "no multiplier, no growth"
    );
}

#[test]
fn a_probe_that_never_answers_gives_its_slot_back() {
    let mut b = Bench::new(r#""trip": {"consecutive_failures": 1}, "open": {"duration": "1s"}"#);
    assert!(b.call(FAIL, T0));
    let Admission::Pass(probe) = b.admit(at(1_000)) else {
        panic!()
    };
    assert!(
        matches!(b.admit(at(1_000)), Admission::Reject { .. }),
        "one probe at a time"
    );
    b.finish(probe, Outcome::Ignored, at(1_100));
    assert_eq!(b.phase(), Phase::HalfOpen);
    assert!(b.call(OK, at(1_200)), "the slot came back");
    assert_eq!(b.phase(), Phase::Closed);
}

#[test]
fn probe_slots_lost_without_a_report_come_back_after_the_probe_timeout() {
    let mut b = Bench::new(
        r#""trip": {"consecutive_failures": 1}, "open": {"duration": "1s"}, "half_open": {"probe_timeout": "5s"}"#,
    );
    assert!(b.call(FAIL, T0));
    let Admission::Pass(lost) = b.admit(at(1_000)) else {
        panic!()
    };
    assert!(
        matches!(b.admit(at(5_999)), Admission::Reject { .. }),
        "the slot is taken"
    );
    let Admission::Pass(fresh) = b.admit(at(6_000)) else {
        panic!("the lost slot came back")
    };
    b.finish(lost, FAIL, at(6_100));
    assert_eq!(
        b.phase(),
        Phase::HalfOpen,
        "the lost probe's late report is dropped"
    );
    b.finish(fresh, OK, at(6_200));
    assert_eq!(b.phase(), Phase::Closed);
}

#[test]
fn outcomes_from_an_earlier_phase_are_dropped() {
    let mut b = Bench::new(
        r#""trip": {"consecutive_failures": 1}, "open": {"duration": "1s"}, "half_open": {"max_probes": 2, "successes_to_close": 1}"#,
    );
    let Admission::Pass(early) = b.admit(T0) else {
        panic!()
    };
    assert!(b.call(FAIL, T0));
    let Admission::Pass(first_probe) = b.admit(at(1_000)) else {
        panic!()
    };
    let Admission::Pass(late_probe) = b.admit(at(1_000)) else {
        panic!()
    };
    b.finish(early, FAIL, at(1_000));
    assert_eq!(
        b.phase(),
        Phase::HalfOpen,
        "a closed-phase failure does not touch half-open"
    );
    b.finish(first_probe, OK, at(1_100));
    assert_eq!(b.phase(), Phase::Closed);
    b.finish(late_probe, FAIL, at(1_200));
    assert_eq!(
        b.phase(),
        Phase::Closed,
        "a probe of the finished half-open phase is dropped"
    );
}

#[test]
fn failure_rate_over_the_last_calls_trips_once_enough_calls_were_seen() {
    let mut b = Bench::new(
        r#""trip": {"failure_rate_percent": 50, "minimum_calls": 6, "window": {"calls": 10}}"#,
    );
    for outcome in [FAIL, FAIL, FAIL, OK, FAIL] {
        assert!(b.call(outcome, T0));
    }
    assert_eq!(
        b.phase(),
        Phase::Closed,
        "4 of 5, below the minimum of 6 calls"
    );
    assert!(b.call(OK, T0));
    assert_eq!(b.phase(), Phase::Open, "4 of 6 is over 50%");
}

#[test]
fn the_call_window_forgets_calls_older_than_its_size() {
    let mut b = Bench::new(
        r#""trip": {"failure_rate_percent": 50, "minimum_calls": 4, "window": {"calls": 4}}"#,
    );
    for outcome in [FAIL, OK, OK, OK, FAIL, OK, OK, OK, FAIL, OK, OK] {
        assert!(b.call(outcome, T0));
    }
    assert_eq!(
        b.phase(),
        Phase::Closed,
        "never more than 1 failure in the last 4"
    );
    assert!(b.call(FAIL, T0));
    assert_eq!(b.phase(), Phase::Open, "2 of the last 4");
}

#[test]
fn the_time_window_counts_only_the_last_span() {
    let mut b = Bench::new(
        r#""trip": {"failure_rate_percent": 60, "minimum_calls": 3, "window": {"duration": "10s"}}"#,
    );
    assert!(b.call(FAIL, at(0)) && b.call(FAIL, at(1_000)));
    assert!(b.call(OK, at(20_000)), "the two failures slid out");
    assert!(b.call(FAIL, at(20_500)));
    assert_eq!(b.phase(), Phase::Closed, "1 of 2 calls in the window");
    assert!(b.call(FAIL, at(21_000)));
    assert_eq!(b.phase(), Phase::Open, "2 of 3");
}

#[test]
fn slow_calls_trip_the_slow_call_rate() {
    let mut b = Bench::new(
        r#""failure": {"slow_call": "500ms"}, "trip": {"slow_call_rate_percent": 50, "minimum_calls": 4, "window": {"calls": 10}}"#,
    );
    let slow = Outcome::Success { slow: true };
    for outcome in [OK, slow, OK] {
        assert!(b.call(outcome, T0));
    }
    assert_eq!(b.phase(), Phase::Closed);
    assert!(b.call(slow, T0));
    assert_eq!(b.phase(), Phase::Open, "2 slow of 4");
    assert!(b.call(slow, at(30_000)), "probe");
    assert_eq!(
        b.phase(),
        Phase::Open,
        "a slow probe counts as failed when slow calls trip"
    );
}

#[test]
fn completions_are_classified_by_flags_then_status() {
    let (b, _) = breaker(
        r#""failure": {"statuses": ["5xx", 429], "slow_call": "1s"}, "trip": {"consecutive_failures": 1}"#,
    );
    let done = |status: Option<u16>, flags: u64, ms: u64| Completion {
        status,
        flags,
        via_upstream: flags == 0,
        upstream_host: true,
        duration: Duration::from_millis(ms),
        ..Completion::default()
    };
    assert_eq!(b.classify(&done(Some(200), 0, 10)), OK);
    assert_eq!(
        b.classify(&done(Some(200), 0, 1_500)),
        Outcome::Success { slow: true }
    );
    assert_eq!(b.classify(&done(Some(503), 0, 10)), FAIL);
    assert_eq!(b.classify(&done(Some(429), 0, 10)), FAIL);
    assert_eq!(b.classify(&done(Some(404), 0, 10)), OK);
    assert_eq!(b.classify(&done(Some(599), 0, 10)), FAIL);
    assert_eq!(
        b.classify(&done(Some(u16::MAX), 0, 10)),
        OK,
        "out-of-range statuses never index past the set"
    );
    assert_eq!(
        b.classify(&done(Some(503), 0x20, 10)),
        FAIL,
        "connect failure"
    );
    assert_eq!(
        b.classify(&done(Some(504), 0x4, 10)),
        FAIL,
        "upstream timeout"
    );
    assert_eq!(b.classify(&done(Some(0), 0x10, 10)), FAIL, "upstream reset");
    assert_eq!(
        b.classify(&done(None, 0x4000, 10)),
        Outcome::Ignored,
        "client went away"
    );
    assert_eq!(b.classify(&done(None, 0, 10)), Outcome::Ignored);
    let (quiet, _) =
        breaker(r#""failure": {"local_failures": false}, "trip": {"consecutive_failures": 1}"#);
    assert_eq!(quiet.classify(&done(Some(503), 0x20, 10)), Outcome::Ignored);
    let reset_by_client = Completion {
        flags: 0x1000_0000,
        ..done(Some(200), 0, 10)
    };
    assert_eq!(
        b.classify(&reset_by_client),
        Outcome::Ignored,
        "an HTTP/2 client reset its stream (DR)"
    );
}

/// A gRPC call's `:status` is 200 whether it failed or not: its `grpc-status` decides, by the
/// breaker's gRPC set (by default the codes that say the server failed), and HTTP statuses
/// decide only for calls that are not gRPC.
#[test]
fn grpc_calls_are_classified_by_their_grpc_status() {
    let (b, _) = breaker(r#""trip": {"consecutive_failures": 1}"#);
    let call = |code: i64| Completion {
        status: Some(200),
        via_upstream: true,
        upstream_host: true,
        grpc_status: GrpcStatus::from_code(code),
        ..Completion::default()
    };
    for code in 0..=16 {
        let expected = if [2, 4, 13, 14, 15].contains(&code) {
            FAIL
        } else {
            OK
        };
        assert_eq!(b.classify(&call(code)), expected, "{code}");
    }
    let (own, _) = breaker(
        r#""failure": {"grpc_statuses": ["RESOURCE_EXHAUSTED"], "statuses": [200]}, "trip": {"consecutive_failures": 1}"#,
    );
    assert_eq!(own.classify(&call(8)), FAIL);
    assert_eq!(own.classify(&call(14)), OK, "the set replaces the default");
    assert_eq!(own.classify(&call(0)), OK, "the HTTP 200 does not count");
    let local = Completion {
        via_upstream: false,
        ..call(14)
    };
    assert_eq!(
        b.classify(&local),
        Outcome::Ignored,
        "another filter's answer"
    );
}

/// Issue 15, defect 4: a 503 that another filter answered locally (a chained instance
/// shedding load, a rate limit, an auth filter) said nothing about the upstream, yet opened
/// the breaker.
#[test]
fn local_replies_say_nothing_about_the_upstream() {
    let (b, _) = breaker(r#""trip": {"consecutive_failures": 1}"#);
    let local = |status| Completion {
        status: Some(status),
        flags: 0,
        via_upstream: false,
        upstream_host: false,
        duration: Duration::from_millis(1),
        ..Completion::default()
    };
    for status in [503, 429, 500, 401, 200] {
        assert_eq!(b.classify(&local(status)), Outcome::Ignored, "{status}");
    }
    let from_upstream = Completion {
        via_upstream: true,
        ..local(503)
    };
    assert_eq!(b.classify(&from_upstream), FAIL);
}

#[test]
fn a_clock_stepping_back_keeps_the_breaker_open_no_longer_than_configured() {
    let mut b = Bench::new(r#""trip": {"consecutive_failures": 1}, "open": {"duration": "10s"}"#);
    assert!(b.call(FAIL, at(60_000)));
    match b.admit(T0) {
        Admission::Reject { retry_after } => assert_eq!(retry_after, Duration::from_secs(70)),
        other => panic!("{other:?}"),
    }
    assert!(b.call(OK, at(70_000)));
    assert_eq!(b.phase(), Phase::Closed);
}

#[test]
fn corrupt_state_reads_as_closed() {
    let mut b = Bench::new(CONSECUTIVE);
    assert_eq!(
        b.store.set("resilience/t/cb/b", b"\x21\x07junk", None),
        Ok(())
    );
    assert!(matches!(
        b.admit(T0),
        Admission::Pass(Permit::Closed { .. })
    ));
    assert!(b.call(FAIL, T0));
    assert_eq!(b.phase(), Phase::Closed);
}

/// Eight threads as eight workers: failures race to trip the breaker, and probes race for
/// the half-open slots. The trip happens once; exactly the budget of probes gets through.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn eight_workers_trip_once_and_share_the_probe_budget() {
    use std::sync::{Arc, Mutex};
    let (breaker, settings) = breaker(
        r#""trip": {"consecutive_failures": 5}, "open": {"duration": "1s"}, "half_open": {"max_probes": 3}"#,
    );
    let shared = Arc::new((breaker, MemoryStore::default(), Mutex::new(Vec::new())));
    let run = |phase_ms: u64| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let (breaker, store, log) = &*shared;
                    let seen = Cell::new(None);
                    for _ in 0..20 {
                        let (admission, effects) = admit(
                            store,
                            &ns(),
                            &keys(&ns(), breaker),
                            breaker,
                            at(phase_ms),
                            settings,
                            &seen,
                        )
                        .unwrap();
                        log.lock()
                            .unwrap()
                            .push((admission, effects.transition.map(|t| t.to)));
                        if let (Admission::Pass(permit @ Permit::Closed { .. }), 0) =
                            (admission, phase_ms)
                        {
                            let effects = record(
                                store,
                                &ns(),
                                &keys(&ns(), breaker),
                                breaker,
                                permit,
                                FAIL,
                                at(0),
                                &seen,
                            )
                            .unwrap();
                            log.lock()
                                .unwrap()
                                .push((admission, effects.transition.map(|t| t.to)));
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().for_each(|w| assert!(w.join().is_ok()));
    };
    run(0);
    let opened = shared
        .2
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, to)| *to == Some(Phase::Open))
        .count();
    assert_eq!(opened, 1, "one transition to open, logged once");
    shared.2.lock().unwrap().clear();
    run(1_000);
    let log = shared.2.lock().unwrap();
    let probes = log
        .iter()
        .filter(|(a, _)| matches!(a, Admission::Pass(Permit::Probe { .. })))
        .count();
    let half_opened = log
        .iter()
        .filter(|(_, to)| *to == Some(Phase::HalfOpen))
        .count();
    assert_eq!((probes, half_opened), (3, 1), "of 160 requests");
}

/// Every open duration, backoff multiplier and cap the configuration accepts is honoured:
/// the first trip opens for exactly the configured duration, each trip in a row for no less
/// than the one before, never beyond the cap, and never less than the duration times the
/// multiplier to the trips before it, when that is under the cap.
#[test]
fn every_accepted_open_duration_and_backoff_is_honoured() {
    use crate::testing::{parsed_exactly_when, Cases};
    const DAY_NS: u64 = 86_400 * 1_000_000_000;
    let mut cases = Cases::new(0x00b4_c0ff);
    for case in 0..2_000 {
        let duration_ns = cases.in_range(999_999, DAY_NS + 1);
        let millionths = cases.in_range(999_999, 10_000_001);
        let multiplier = format!("{}.{:06}", millionths / 1_000_000, millionths % 1_000_000);
        let max_ns = cases.in_range(duration_ns - 1, DAY_NS + 1);
        let json = format!(
            r#"{{"circuit_breaker": {{"breakers": [{{"name": "b", "scope": {{"match": {{}}}},
                "trip": {{"consecutive_failures": 1}},
                "open": {{"duration": "{duration_ns}ns", "backoff_multiplier": {multiplier},
                          "max_duration": "{max_ns}ns"}}}}]}}}}"#
        );
        let enforceable = (1_000_000..=DAY_NS).contains(&duration_ns)
            && (1_000_000..=10_000_000).contains(&millionths)
            && (duration_ns..=DAY_NS).contains(&max_ns);
        let Ok(config) = parsed_exactly_when(enforceable, &json, case) else {
            continue;
        };
        let breaker = config
            .circuit_breaker
            .and_then(|c| c.breakers.into_iter().next());
        let Some(breaker) = breaker else {
            panic!("case {case}: no breaker")
        };
        let (duration, max) = (
            Duration::from_nanos(duration_ns),
            Duration::from_nanos(max_ns),
        );
        assert_eq!(breaker.open_for(1), duration, "case {case}: {json}");
        let mut before = duration;
        let mut trips: Vec<u32> = (1..=40).collect();
        trips.extend([1_000, 65_536, u32::MAX - 1, u32::MAX]);
        for trips in trips {
            let open = breaker.open_for(trips);
            assert!(
                open >= before && open <= max,
                "case {case}: {json}: trip {trips} opens for {open:?} after {before:?}"
            );
            // The exact growth, in nanoseconds: duration × multiplier^(trips − 1), capped.
            let exact = (1..trips.min(64)).try_fold(u128::from(duration_ns), |ns, _| {
                let grown = ns * u128::from(millionths) / 1_000_000;
                (grown <= u128::from(max_ns)).then_some(grown)
            });
            if let Some(exact) = exact.filter(|_| trips < 64) {
                assert!(
                    open.as_nanos() + 1 >= exact,
                    "case {case}: {json}: trip {trips} opens for {open:?}, not {exact} ns"
                );
            }
            before = open;
        }
    }
}

/// Every count window, failure rate and minimum the configuration accepts trips exactly as
/// written: the breaker opens at the first call after which the last `calls` calls hold at
/// least `minimum_calls` calls and at least `percent`% failures, and not one call before.
#[test]
fn every_accepted_failure_rate_trips_exactly_where_written() {
    use crate::testing::Cases;
    let mut cases = Cases::new(0x00fa_11ed);
    for case in 0..300 {
        let calls = cases.in_range(1, 1_000);
        let percent = cases.in_range(1, 100);
        let minimum = cases.in_range(1, calls);
        let failing_in_1000 = cases.in_range(0, 1_000);
        let mut b = Bench::new(&format!(
            r#""trip": {{"failure_rate_percent": {percent}, "minimum_calls": {minimum},
                "window": {{"calls": {calls}}}}}, "open": {{"duration": "1h"}}"#
        ));
        let mut last: std::collections::VecDeque<bool> = std::collections::VecDeque::new();
        for call in 0..(calls * 2).min(600) {
            let failed = cases.next() % 1_000 < failing_in_1000;
            assert!(
                b.call(if failed { FAIL } else { OK }, T0),
                "case {case}: closed, yet refused"
            );
            last.push_back(failed);
            if last.len() > calls as usize {
                last.pop_front();
            }
            let failures = last.iter().filter(|f| **f).count() as u64;
            let due = last.len() as u64 >= minimum && failures * 100 >= percent * last.len() as u64;
            assert_eq!(
                b.phase() == Phase::Open,
                due,
                "case {case}: calls {calls}, {percent}%, minimum {minimum}: call {call} with {failures} failures in {}",
                last.len()
            );
            if due {
                break;
            }
        }
    }
}
