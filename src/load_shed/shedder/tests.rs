use super::*;
use crate::config::Config;
use crate::load_shed::threshold;
use crate::store::MemoryStore;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const T0: Instant = Instant::from_nanos(1_700_000_000_000_000_000);

fn at(ms: u64) -> Instant {
    T0.saturating_add(Duration::from_millis(ms))
}

fn shedder(json: &str) -> (LoadShedder, SharedDataSettings) {
    match Config::parse(format!(r#"{{"load_shedding": {json}}}"#).as_bytes()) {
        Ok(Config {
            load_shedding: Some(config),
            shared_data,
            ..
        }) => (LoadShedder::new(config), shared_data),
        other => panic!("{other:?}"),
    }
}

struct Bench {
    shedder: LoadShedder,
    settings: SharedDataSettings,
    store: MemoryStore,
}

impl Bench {
    fn new(json: &str) -> Bench {
        let (shedder, settings) = shedder(json);
        Bench {
            shedder,
            settings,
            store: MemoryStore::default(),
        }
    }

    fn admit(&self, request: &RequestInfo, now: Instant) -> Decision {
        self.shedder
            .admit(&self.store, &ns(), request, now, self.settings)
    }

    fn release(&self, held: &[usize], now: Instant, latency: Option<Duration>) -> Vec<Released> {
        self.shedder
            .release(&self.store, &ns(), held, now, latency, self.settings)
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    }

    fn in_flight(&self, pool: &str) -> u32 {
        crate::store::read::<PoolState>(&self.store, &format!("resilience/t/ls/{pool}"))
            .unwrap()
            .map_or(0, |s| s.in_flight)
    }

    fn limit(&self, pool: &str) -> u32 {
        crate::store::read::<PoolState>(&self.store, &format!("resilience/t/ls/{pool}"))
            .unwrap()
            .map_or(0, |s| s.limit)
    }
}

fn ns() -> Namespace {
    Namespace::new("t")
}

fn request(path: &str, headers: &[(&str, &str)], peer: &str) -> RequestInfo {
    RequestInfo {
        method: "GET".into(),
        path: path.into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        peer: peer.parse().ok(),
        cluster: None,
    }
}

fn plain() -> RequestInfo {
    request("/", &[], "192.0.2.1")
}

#[test]
fn a_pool_admits_up_to_its_cap_and_a_release_makes_room() {
    let b = Bench::new(
        r#"{"pools": [{"name": "all", "max_in_flight": 3}], "shed_at": {"high": 1, "normal": 1}}"#,
    );
    let decisions: Vec<Decision> = (0..5).map(|_| b.admit(&plain(), T0)).collect();
    let verdicts: Vec<Verdict> = decisions.iter().map(|d| d.verdict).collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Admit,
            Verdict::Admit,
            Verdict::Admit,
            Verdict::Shed { pool: 0 },
            Verdict::Shed { pool: 0 }
        ]
    );
    assert!(decisions[3].held.is_empty(), "a shed request holds nothing");
    assert_eq!(b.in_flight("all"), 3);
    assert_eq!(
        b.release(&decisions[0].held, T0, None),
        [Released {
            pool: 0,
            in_flight: 2,
            change: None
        }]
    );
    assert_eq!(b.admit(&plain(), T0).verdict, Verdict::Admit);
}

#[test]
fn low_priority_work_is_shed_first_and_critical_last() {
    let b = Bench::new(
        r#"{"pools": [{"name": "all", "max_in_flight": 10}],
            "priority": {"rules": [{"match": {"path_prefix": "/batch/"}, "class": "low"},
                                   {"match": {"path_prefix": "/health"}, "class": "critical"}]}}"#,
    );
    let low = request("/batch/x", &[], "192.0.2.1");
    let critical = request("/health", &[], "192.0.2.1");
    let admitted = |r: &RequestInfo, n: usize| {
        (0..n)
            .filter(|_| b.admit(r, T0).verdict == Verdict::Admit)
            .count()
    };
    assert_eq!(admitted(&low, 10), 5, "low is shed from half the limit");
    assert_eq!(admitted(&plain(), 10), 3, "normal from 80%");
    assert_eq!(admitted(&critical, 10), 2, "critical up to the limit");
    assert_eq!(b.in_flight("all"), 10);
}

#[test]
fn every_class_gets_through_an_idle_pool() {
    assert_eq!(threshold(1, 0.5), 1);
    assert_eq!(threshold(3, 0.2), 1);
    assert_eq!(threshold(10, 0.85), 8);
    assert_eq!(threshold(10, 1.0), 10);
}

#[test]
fn the_priority_header_counts_only_from_trusted_sources() {
    let (s, _) = shedder(
        r#"{"pools": [{"name": "all", "max_in_flight": 10}],
            "priority": {"header": "x-priority", "trusted_sources": ["10.0.0.0/8"], "default": "low",
                         "rules": [{"match": {"path_prefix": "/api/"}, "class": "high"}]}}"#,
    );
    assert_eq!(
        s.classify(&request("/", &[("x-priority", "critical")], "10.1.2.3")),
        Class::Critical
    );
    assert_eq!(
        s.classify(&request("/", &[("x-priority", "critical")], "192.0.2.1")),
        Class::Low,
        "self-promotion ignored"
    );
    assert_eq!(
        s.classify(&request(
            "/api/",
            &[("x-priority", "critical")],
            "192.0.2.1"
        )),
        Class::High,
        "the route's class"
    );
    assert_eq!(
        s.classify(&request("/api/", &[("x-priority", "urgent")], "10.1.2.3")),
        Class::High,
        "unknown value ignored"
    );
    assert_eq!(s.classify(&request("/", &[], "10.1.2.3")), Class::Low);
}

#[test]
fn a_saturated_bulkhead_does_not_shed_another_pool() {
    let b = Bench::new(
        r#"{"pools": [{"name": "a", "scope": {"match": {"path_prefix": "/a/"}}, "max_in_flight": 2},
                      {"name": "b", "scope": {"match": {"path_prefix": "/b/"}}, "max_in_flight": 2}],
            "shed_at": {"high": 1, "normal": 1}}"#,
    );
    let a = request("/a/x", &[], "192.0.2.1");
    for _ in 0..2 {
        assert_eq!(b.admit(&a, T0).verdict, Verdict::Admit);
    }
    assert_eq!(b.admit(&a, T0).verdict, Verdict::Shed { pool: 0 });
    assert_eq!(
        b.admit(&request("/b/x", &[], "192.0.2.1"), T0).verdict,
        Verdict::Admit
    );
    assert_eq!(
        b.admit(&request("/c", &[], "192.0.2.1"), T0).held,
        Vec::<usize>::new(),
        "in no pool"
    );
}

#[test]
fn a_request_in_two_pools_holds_both_and_a_later_refusal_keeps_the_earlier_slot_to_release() {
    let b = Bench::new(
        r#"{"pools": [{"name": "global", "max_in_flight": 10}, {"name": "a", "scope": {"match": {"path_prefix": "/a/"}}, "max_in_flight": 1}],
            "shed_at": {"high": 1, "normal": 1}}"#,
    );
    let a = request("/a/x", &[], "192.0.2.1");
    assert_eq!(b.admit(&a, T0).held, [0, 1]);
    let shed = b.admit(&a, T0);
    assert_eq!(
        (shed.verdict, shed.held.clone()),
        (Verdict::Shed { pool: 1 }, vec![0])
    );
    b.release(&shed.held, T0, None);
    assert_eq!((b.in_flight("global"), b.in_flight("a")), (1, 1));
}

#[test]
fn the_adaptive_limit_falls_when_latency_rises_and_recovers_when_it_falls() {
    let b = Bench::new(
        r#"{"pools": [{"name": "api", "max_in_flight": 100,
                       "adaptive": {"min_limit": 4, "sample_interval": "1s", "min_rtt_window": "1h", "tolerance": 1.5}}]}"#,
    );
    let mut now = 0;
    let mut period = |latency_ms: u64, b: &Bench| {
        for _ in 0..10 {
            let held = b.admit(&plain(), at(now)).held;
            b.release(&held, at(now), Some(Duration::from_millis(latency_ms)));
            now += 100;
        }
        b.limit("api")
    };
    assert_eq!(period(10, &b), 100, "healthy: stays at the ceiling");
    assert_eq!(period(10, &b), 100);
    let mut falling = vec![];
    for _ in 0..6 {
        falling.push(period(200, &b));
    }
    assert!(
        falling.windows(2).all(|w| w[1] <= w[0]) && falling[5] < 25,
        "falls: {falling:?}"
    );
    let mut rising = vec![];
    for _ in 0..30 {
        rising.push(period(10, &b));
    }
    assert!(
        rising.windows(2).all(|w| w[1] >= w[0]) && rising[29] == 100,
        "recovers: {rising:?}"
    );
}

#[test]
fn the_adaptive_limit_never_leaves_its_bounds() {
    let b = Bench::new(
        r#"{"pools": [{"name": "api", "max_in_flight": 20, "adaptive": {"min_limit": 5, "sample_interval": "1s"}}]}"#,
    );
    for i in 0..100 {
        let held = b.admit(&plain(), at(i * 1_000)).held;
        b.release(
            &held,
            at(i * 1_000 + 999),
            Some(Duration::from_secs(if i < 50 { 1 + i } else { 0 })),
        );
        assert!((5..=20).contains(&b.limit("api")), "{}", b.limit("api"));
    }
}

#[test]
fn a_long_lasting_baseline_shift_is_learned_within_two_min_rtt_windows() {
    let b = Bench::new(
        r#"{"pools": [{"name": "api", "max_in_flight": 50, "adaptive": {"min_limit": 2, "sample_interval": "1s", "min_rtt_window": "5s"}}]}"#,
    );
    for s in 0..40u64 {
        let latency = if s < 5 { 10 } else { 100 };
        let held = b.admit(&plain(), at(s * 1_000)).held;
        b.release(
            &held,
            at(s * 1_000 + 1_000),
            Some(Duration::from_millis(latency)),
        );
    }
    assert_eq!(
        b.limit("api"),
        50,
        "100 ms became the new normal, and the limit grew back"
    );
}

#[test]
fn releases_without_a_sample_leave_the_limit_alone() {
    let b = Bench::new(
        r#"{"pools": [{"name": "api", "max_in_flight": 50, "adaptive": {"sample_interval": "1s"}}]}"#,
    );
    for s in 0..10u64 {
        let held = b.admit(&plain(), at(s * 1_000)).held;
        assert_eq!(
            b.release(&held, at(s * 1_000 + 1_000), None)[0].change,
            None
        );
    }
    assert_eq!(b.limit("api"), 50);
}

/// Eight threads as eight workers: a cap of 50 admits exactly 50 at once, and after every
/// release the count is back to zero.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn eight_workers_share_one_cap_exactly_and_release_everything() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    let (shedder, settings) = shedder(
        r#"{"pools": [{"name": "all", "max_in_flight": 50}], "shed_at": {"high": 1, "normal": 1}}"#,
    );
    let settings = SharedDataSettings {
        max_attempts: 64,
        ..settings
    };
    let shared = Arc::new((
        shedder,
        MemoryStore::default(),
        AtomicUsize::new(0),
        Barrier::new(8),
    ));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                let (shedder, store, admitted, barrier) = &*shared;
                let held: Vec<Vec<usize>> = (0..20)
                    .map(|_| shedder.admit(store, &ns(), &plain(), T0, settings))
                    .filter(|d| d.verdict == Verdict::Admit)
                    .map(|d| d.held)
                    .collect();
                admitted.fetch_add(held.len(), Ordering::SeqCst);
                barrier.wait();
                for h in held {
                    assert!(shedder
                        .release(store, &ns(), &h, T0, None, settings)
                        .iter()
                        .all(Result::is_ok));
                }
            })
        })
        .collect();
    workers.into_iter().for_each(|w| assert!(w.join().is_ok()));
    let (_, store, admitted, _) = &*shared;
    assert_eq!(admitted.load(Ordering::SeqCst), 50, "of 160 at once");
    let state = crate::store::read::<PoolState>(store, "resilience/t/ls/all").unwrap();
    assert_eq!(state.map(|s| s.in_flight), Some(0));
}
