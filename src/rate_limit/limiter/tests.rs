use super::*;
use crate::config::Config;
use crate::hashing::Seed;
use crate::store::{MemoryStore, Versioned};
use std::num::NonZeroU32;
use std::time::Duration;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const NOW: Instant = Instant::from_nanos(1_700_000_000_000_000_000);

fn limiter(rate_limit: &str) -> (RateLimiter, SharedDataSettings) {
    let json = format!(r#"{{"rate_limit": {rate_limit}}}"#);
    match Config::parse(json.as_bytes()) {
        Ok(Config {
            rate_limit: Some(config),
            shared_data,
            ..
        }) => (
            RateLimiter::new(config, KeyHasher::new(Seed([11, 22]))),
            shared_data,
        ),
        other => panic!("{other:?}"),
    }
}

fn request(headers: &[(&str, &str)]) -> RequestInfo {
    RequestInfo {
        method: "GET".into(),
        path: "/api/orders".into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        peer: "10.0.0.1".parse().ok(),
        cluster: None,
    }
}

fn ns() -> Namespace {
    Namespace::new("t")
}

/// A limiter and the store it decides against, as one worker sees them.
struct Run {
    limiter: RateLimiter,
    settings: SharedDataSettings,
    store: MemoryStore,
}

fn run(rate_limit: &str) -> Run {
    let (limiter, settings) = limiter(rate_limit);
    Run {
        limiter,
        settings,
        store: MemoryStore::default(),
    }
}

impl Run {
    fn decide(&self, request: &RequestInfo, now: Instant) -> Decision {
        self.limiter
            .decide(&self.store, &ns(), request, now, self.settings)
    }

    fn admitted(&self, request: &RequestInfo, n: usize) -> usize {
        (0..n)
            .filter(|_| matches!(self.decide(request, NOW).verdict, Verdict::Allow { .. }))
            .count()
    }
}

const ONE_RULE: &str =
    r#"{"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1h"}}]}"#;

#[test]
fn a_global_bucket_admits_its_capacity() {
    let run = run(ONE_RULE);
    assert_eq!(run.admitted(&request(&[]), 20), 5);
}

#[test]
fn refused_requests_carry_retry_after_and_the_draft_headers() {
    let run = run(
        r#"{"rules": [{"name": "api", "capacity": 2, "refill": {"tokens": 1, "interval": "10s"}}],
            "limited_response": {"status": 503, "body": "slow down", "headers": {"X-Why": "quota"}}}"#,
    );
    let first = run.decide(&request(&[]), NOW);
    let header = |headers: &[(String, String)], name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let Verdict::Allow { headers } = first.verdict else {
        panic!("{first:?}")
    };
    assert_eq!(
        header(&headers, "ratelimit-policy").as_deref(),
        Some("\"api\";q=2;w=20")
    );
    assert_eq!(
        header(&headers, "ratelimit").as_deref(),
        Some("\"api\";r=1;t=10")
    );
    run.decide(&request(&[]), NOW);
    let refused = run.decide(
        &request(&[]),
        NOW.saturating_add(Duration::from_millis(2_500)),
    );
    let Verdict::Limited {
        status,
        body,
        headers,
    } = refused.verdict
    else {
        panic!("{refused:?}")
    };
    assert_eq!((status, body.as_str()), (503, "slow down"));
    assert_eq!(
        header(&headers, "retry-after").as_deref(),
        Some("8"),
        "7.5 s rounded up"
    );
    assert_eq!(
        header(&headers, "ratelimit-policy").as_deref(),
        Some("\"api\";q=2;w=20")
    );
    assert_eq!(
        header(&headers, "ratelimit").as_deref(),
        Some("\"api\";r=0;t=18")
    );
    assert_eq!(header(&headers, "x-why").as_deref(), Some("quota"));
    assert_eq!(refused.outcomes, [RuleOutcome::Limited]);
}

#[test]
fn a_request_refused_by_one_rule_takes_nothing_from_the_others() {
    let run = run(r#"{"rules": [
            {"name": "wide", "capacity": 5, "refill": {"tokens": 1, "interval": "1h"}},
            {"name": "narrow", "match": {"headers": [{"name": "x-narrow", "present": true}]},
             "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}"#);
    let narrow = request(&[("x-narrow", "1")]);
    assert_eq!(run.admitted(&narrow, 10), 1, "narrow admits one");
    // The nine refusals took and gave back a "wide" token each: four are left, not zero.
    assert_eq!(run.admitted(&request(&[]), 10), 4);
}

#[test]
fn shadow_rules_count_but_never_refuse() {
    let run = run(
        r#"{"rules": [{"name": "s", "shadow": true, "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let outcomes: Vec<RuleOutcome> = (0..5)
        .flat_map(|_| run.decide(&request(&[]), NOW).outcomes)
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == RuleOutcome::Allowed)
            .count(),
        2
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == RuleOutcome::ShadowLimited)
            .count(),
        3
    );
    assert_eq!(run.admitted(&request(&[]), 5), 5);
}

#[test]
fn keys_do_not_share_tokens() {
    let run = run(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    assert_eq!(run.admitted(&request(&[("x-api-key", "alice")]), 5), 3);
    assert_eq!(run.admitted(&request(&[("x-api-key", "bob")]), 5), 3);
    assert_eq!(
        run.admitted(&request(&[]), 5),
        5,
        "no key: the rule is skipped by default"
    );
}

#[test]
fn requests_without_a_key_can_share_one_bucket() {
    let run = run(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "on_missing_key": "shared", "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    assert_eq!(run.admitted(&request(&[]), 5), 3);
    assert_eq!(
        run.admitted(&request(&[("x-api-key", "")]), 5),
        3,
        "an empty key is a key"
    );
}

#[test]
fn method_and_path_parts_split_buckets() {
    let run = run(
        r#"{"rules": [{"name": "k", "key": ["method", "path"], "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let mut post = request(&[]);
    post.method = "POST".into();
    let mut other_path = request(&[]);
    other_path.path = "/api/users".into();
    assert_eq!(
        run.admitted(&request(&[]), 3) + run.admitted(&post, 3) + run.admitted(&other_path, 3),
        3
    );
}

/// Envoy (with `use_remote_address: true`) appends the peer, 10.0.0.1, to what arrived.
#[test]
fn forwarded_for_counts_only_through_trusted_hops() {
    let arrived = |xff: &str| request(&[("x-forwarded-for", &format!("{xff}, 10.0.0.1"))]);
    let ip = |s: &str| s.parse::<IpAddr>().ok();
    assert_eq!(
        client_address(&arrived("6.6.6.6"), 0),
        ip("10.0.0.1"),
        "untrusted: the peer"
    );
    assert_eq!(client_address(&arrived("1.1.1.1"), 1), ip("1.1.1.1"));
    assert_eq!(
        client_address(&arrived("6.6.6.6, 1.1.1.1"), 1),
        ip("1.1.1.1"),
        "forged entries are skipped"
    );
    assert_eq!(
        client_address(&arrived("6.6.6.6,1.1.1.1, 2.2.2.2"), 2),
        ip("1.1.1.1")
    );
    assert_eq!(
        client_address(&arrived("1.1.1.1"), 2),
        ip("10.0.0.1"),
        "too few hops: the peer"
    );
    assert_eq!(
        client_address(&request(&[("x-forwarded-for", "10.0.0.1")]), 1),
        ip("10.0.0.1")
    );
    assert_eq!(client_address(&request(&[]), 1), ip("10.0.0.1"));
    assert_eq!(client_address(&arrived("not-an-ip"), 1), None);
    assert_eq!(
        client_address(&arrived("2001:db8::1"), 1),
        ip("2001:db8::1")
    );
}

#[test]
fn client_address_keys_follow_trusted_hops() {
    let run = run(
        r#"{"trusted_hops": 1, "rules": [{"name": "c", "key": ["client_address"], "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let arrived = |xff: &str| request(&[("x-forwarded-for", &format!("{xff}, 10.0.0.1"))]);
    assert_eq!(run.admitted(&arrived("1.1.1.1"), 3), 2);
    assert_eq!(
        run.admitted(&arrived("9.9.9.9, 1.1.1.1"), 3),
        0,
        "a forged prefix does not buy a new bucket"
    );
    assert_eq!(run.admitted(&arrived("2.2.2.2"), 3), 2);
}

#[test]
fn memory_is_bounded_by_the_table_size() {
    let run = run(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "table_size": 64, "capacity": 3, "refill": {"tokens": 1, "interval": "1s"}}]}"#,
    );
    for i in 0..10_000 {
        let now = NOW.saturating_add(Duration::from_millis(i));
        run.decide(&request(&[("x-api-key", &i.to_string())]), now);
    }
    assert!(
        run.store.len() <= 64 + 1,
        "{} keys: 64 slots and the witness",
        run.store.len()
    );
}

#[test]
fn colliding_keys_never_exceed_the_limit() {
    // A one-slot table: every key collides. Busy keys share, so together they get one limit.
    let run = run(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "table_size": 1, "capacity": 4, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let total: usize = (0..10)
        .map(|i| run.admitted(&request(&[("x-api-key", &i.to_string())]), 3))
        .sum();
    assert_eq!(total, 4);
}

struct BrokenStore;

impl Store for BrokenStore {
    fn get(&self, _: &str) -> Result<Option<Versioned>, StoreError> {
        Err(StoreError::Host(10))
    }

    fn set(&self, _: &str, _: &[u8], _: Option<NonZeroU32>) -> Result<(), StoreError> {
        Err(StoreError::Host(10))
    }
}

#[test]
fn store_failures_follow_the_failure_mode() {
    let (open, settings) = limiter(ONE_RULE);
    let decision = open.decide(&BrokenStore, &ns(), &request(&[]), NOW, settings);
    assert!(matches!(decision.verdict, Verdict::Allow { .. }));
    assert_eq!(
        decision.outcomes,
        [RuleOutcome::Failed(StoreError::Host(10))]
    );
    let closed = SharedDataSettings {
        on_error: FailureMode::Deny,
        ..settings
    };
    assert_eq!(
        open.decide(&BrokenStore, &ns(), &request(&[]), NOW, closed)
            .verdict,
        Verdict::Unavailable
    );
}

#[test]
fn corrupt_slots_are_replaced_not_trusted() {
    let run = run(ONE_RULE);
    assert_eq!(run.admitted(&request(&[]), 1), 1);
    assert_eq!(
        run.store.set("resilience/t/rl/r/0", b"\x11garbage", None),
        Ok(())
    );
    assert_eq!(run.admitted(&request(&[]), 10), 5, "read as a fresh bucket");
}

/// Eight OS threads as eight Envoy workers on one store: exactly the capacity passes.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn eight_workers_admit_exactly_the_capacity() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (limiter, settings) = limiter(
        r#"{"rules": [{"name": "r", "capacity": 100, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let settings = SharedDataSettings {
        max_attempts: 64,
        ..settings
    };
    let limiter = Arc::new(limiter);
    let store = Arc::new(MemoryStore::default());
    let admitted = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (limiter, store, admitted) = (
                Arc::clone(&limiter),
                Arc::clone(&store),
                Arc::clone(&admitted),
            );
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let decision = limiter.decide(&*store, &ns(), &request(&[]), NOW, settings);
                    if matches!(decision.verdict, Verdict::Allow { .. }) {
                        assert_eq!(decision.outcomes, [RuleOutcome::Allowed]);
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        assert!(worker.join().is_ok());
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 100, "of 800 requests");
}
