use super::*;
use crate::clock::Instant;
use crate::hashing::Seed;
use crate::store::{FailureMode, SharedDataSettings};
use crate::testing::{Bench, BrokenStore, T0};
use std::time::Duration;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const NOW: Instant = T0;

fn bench(rate_limit: &str) -> Bench<RateLimit> {
    Bench::new(
        &format!(r#"{{"rate_limit": {rate_limit}}}"#),
        |config, catalog, namespace| {
            let Some(config) = config.rate_limit else {
                panic!("no rate_limit section")
            };
            RateLimit::new(config, KeyHasher::new(Seed([11, 22])), catalog, namespace)
        },
    )
}

fn request(headers: &[(&str, &str)]) -> RequestInfo {
    RequestInfo {
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        peer: "10.0.0.1".parse().ok(),
        ..RequestInfo::new(b"GET", b"/api/orders")
    }
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// A decision no rule had to wait for.
fn decided((admission, step): (Admission, RateStep)) -> Result<ResponseHeaders, Reply> {
    match step {
        RateStep::Done(Ok(())) => Ok(admission.headers().to_vec()),
        RateStep::Done(Err(reply)) => Err(reply),
        other => panic!("a local rule waited: {other:?}"),
    }
}

impl Bench<RateLimit> {
    fn decide(&self, request: &RequestInfo, now: Instant) -> Result<ResponseHeaders, Reply> {
        self.run(now, |policy, env| decided(policy.start(env, request)))
    }

    fn admitted(&self, request: &RequestInfo, n: usize) -> usize {
        (0..n).filter(|_| self.decide(request, NOW).is_ok()).count()
    }
}

const ONE_RULE: &str =
    r#"{"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1h"}}]}"#;

#[test]
fn a_global_bucket_admits_its_capacity() {
    let bench = bench(ONE_RULE);
    assert_eq!(bench.admitted(&request(&[]), 20), 5);
    assert_eq!(bench.metric("rate_limit.r.allowed"), 5);
    assert_eq!(bench.metric("rate_limit.r.limited"), 15);
}

#[test]
fn refused_requests_carry_retry_after_and_the_draft_headers() {
    let bench = bench(
        r#"{"rules": [{"name": "api", "capacity": 2, "refill": {"tokens": 1, "interval": "10s"}}],
            "limited_response": {"status": 503, "body": "slow down", "headers": {"X-Why": "quota"}}}"#,
    );
    let Ok(headers) = bench.decide(&request(&[]), NOW) else {
        panic!("first request refused")
    };
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(find("ratelimit-policy"), Some("\"api\";q=2;w=20"));
    assert_eq!(find("ratelimit"), Some("\"api\";r=1;t=10"));
    assert!(bench.decide(&request(&[]), NOW).is_ok());
    let Err(refused) = bench.decide(
        &request(&[]),
        NOW.saturating_add(Duration::from_millis(2_500)),
    ) else {
        panic!("third request admitted")
    };
    assert_eq!(
        (refused.status, refused.body.as_slice()),
        (503, &b"slow down"[..])
    );
    assert_eq!(refused.details, "resilience_rate_limited");
    assert_eq!(
        header(&refused.headers, "retry-after"),
        Some("8"),
        "7.5 s rounded up"
    );
    assert_eq!(
        header(&refused.headers, "ratelimit-policy"),
        Some("\"api\";q=2;w=20")
    );
    assert_eq!(
        header(&refused.headers, "ratelimit"),
        Some("\"api\";r=0;t=8"),
        "t: until the next token (draft-10), not until the bucket is full (18 s)"
    );
    assert_eq!(header(&refused.headers, "x-why"), Some("quota"));
    assert_eq!(header(&refused.headers, "content-type"), Some("text/plain"));
    assert_eq!(bench.metric("rate_limit.api.limited"), 1);
}

#[test]
fn a_request_refused_by_one_rule_takes_nothing_from_the_others() {
    let bench = bench(
        r#"{"rules": [
            {"name": "wide", "capacity": 5, "refill": {"tokens": 1, "interval": "1h"}},
            {"name": "narrow", "match": {"headers": [{"name": "x-narrow", "present": true}]},
             "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let narrow = request(&[("x-narrow", "1")]);
    assert_eq!(bench.admitted(&narrow, 10), 1, "narrow admits one");
    // The nine refusals took and gave back a "wide" token each: four are left, not zero.
    assert_eq!(bench.admitted(&request(&[]), 10), 4);
    assert_eq!(
        bench.metric("rate_limit.wide.allowed"),
        5,
        "refunded tokens are not admissions"
    );
}

#[test]
fn shadow_rules_count_but_never_refuse() {
    let bench = bench(
        r#"{"rules": [{"name": "s", "shadow": true, "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    assert_eq!(bench.admitted(&request(&[]), 5), 5);
    assert_eq!(bench.metric("rate_limit.s.allowed"), 2);
    assert_eq!(bench.metric("rate_limit.s.shadow_limited"), 3);
    assert_eq!(bench.metric("rate_limit.s.limited"), 0);
    assert_eq!(
        bench.logs().last().map(|(_, line)| line.clone()).as_deref(),
        Some("shadow rule \"s\" would refuse GET /api/orders")
    );
}

/// A shadow rule never shows in the headers a client acts on (issue 16: a client following
/// the RateLimit draft stopped for 200 s because of a trial rule).
#[test]
fn shadow_rules_never_show_in_the_ratelimit_headers() {
    let both = bench(
        r#"{"rules": [
            {"name": "trial", "shadow": true, "capacity": 1, "refill": {"tokens": 1, "interval": "200s"}},
            {"name": "real", "capacity": 100, "refill": {"tokens": 1, "interval": "1s"}}]}"#,
    );
    for _ in 0..3 {
        let Ok(headers) = both.decide(&request(&[]), NOW) else {
            panic!("a shadow rule refused")
        };
        assert_eq!(
            header_of(&headers, "ratelimit-policy"),
            Some("\"real\";q=100;w=100")
        );
        assert!(
            header_of(&headers, "ratelimit").is_some_and(|v| v.starts_with("\"real\";")),
            "{headers:?}"
        );
    }
    let alone = bench(
        r#"{"rules": [{"name": "trial", "shadow": true, "capacity": 1, "refill": {"tokens": 1, "interval": "200s"}}]}"#,
    );
    assert_eq!(alone.decide(&request(&[]), NOW), Ok(Vec::new()));
}

fn header_of<'a>(headers: &'a ResponseHeaders, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn keys_do_not_share_tokens() {
    let bench = bench(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    assert_eq!(bench.admitted(&request(&[("x-api-key", "alice")]), 5), 3);
    assert_eq!(bench.admitted(&request(&[("x-api-key", "bob")]), 5), 3);
    assert_eq!(
        bench.admitted(&request(&[]), 5),
        5,
        "no key: the rule is skipped by default"
    );
}

/// Issue 15, defect 1: a key header that is not UTF-8 is a key like any other, hashed as bytes.
#[test]
fn a_key_that_is_not_utf8_has_its_own_bucket() {
    let bench = bench(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let mut latin1 = request(&[]);
    latin1.headers = vec![("x-api-key".to_owned(), b"caf\xe9".to_vec())];
    let utf8 = request(&[("x-api-key", "café")]);
    assert_eq!(bench.admitted(&latin1, 5), 2);
    assert_eq!(bench.admitted(&utf8, 5), 2, "another key");
    assert_eq!(bench.admitted(&latin1, 5), 0, "the same bucket again");
}

#[test]
fn requests_without_a_key_can_share_one_bucket() {
    let bench = bench(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "on_missing_key": "shared", "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    assert_eq!(bench.admitted(&request(&[]), 5), 3);
    assert_eq!(
        bench.admitted(&request(&[("x-api-key", "")]), 5),
        3,
        "an empty key is a key"
    );
}

#[test]
fn method_and_path_parts_split_buckets() {
    let bench = bench(
        r#"{"rules": [{"name": "k", "key": ["method", "path"], "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let mut post = request(&[]);
    post.method = "POST".into();
    let mut other_path = request(&[]);
    other_path.path = "/api/users".into();
    assert_eq!(
        bench.admitted(&request(&[]), 3)
            + bench.admitted(&post, 3)
            + bench.admitted(&other_path, 3),
        3
    );
    let same_path = RequestInfo::new(b"GET", b"//api/./orders?page=2");
    assert_eq!(
        bench.admitted(&same_path, 3),
        0,
        "another spelling of the same path shares its bucket"
    );
}

#[test]
fn client_address_keys_follow_trusted_hops() {
    let bench = bench(
        r#"{"trusted_hops": 1, "rules": [{"name": "c", "key": ["client_address"], "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let arrived = |xff: &str| request(&[("x-forwarded-for", &format!("{xff}, 10.0.0.1"))]);
    assert_eq!(bench.admitted(&arrived("1.1.1.1"), 3), 2);
    assert_eq!(
        bench.admitted(&arrived("9.9.9.9, 1.1.1.1"), 3),
        0,
        "a forged prefix does not buy a new bucket"
    );
    assert_eq!(bench.admitted(&arrived("2.2.2.2"), 3), 2);
    assert_eq!(
        bench.admitted(&arrived("not-an-ip"), 3),
        2,
        "an entry that is no address falls back to the peer, which has its own bucket"
    );
    assert_eq!(
        bench.admitted(&arrived("garbage"), 3),
        0,
        "the peer's bucket again"
    );
}

#[test]
fn memory_is_bounded_by_the_table_size() {
    let bench = bench(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "table_size": 64, "capacity": 3, "refill": {"tokens": 1, "interval": "1s"}}]}"#,
    );
    for i in 0..10_000 {
        let now = NOW.saturating_add(Duration::from_millis(i));
        let _ = bench.decide(&request(&[("x-api-key", &i.to_string())]), now);
    }
    assert!(
        bench.store.len() <= 64 + 1,
        "{} keys: 64 slots and the witness",
        bench.store.len()
    );
}

#[test]
fn colliding_keys_never_exceed_the_limit() {
    // A one-slot table: every key collides. Busy keys share, so together they get one limit.
    let bench = bench(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "table_size": 1, "capacity": 4, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let total: usize = (0..10)
        .map(|i| bench.admitted(&request(&[("x-api-key", &i.to_string())]), 3))
        .sum();
    assert_eq!(total, 4);
}

#[test]
fn store_failures_follow_the_failure_mode() {
    let open = bench(ONE_RULE);
    let admitted = open.run_on(&BrokenStore, NOW, |policy, env| {
        decided(policy.start(env, &request(&[])))
    });
    assert_eq!(admitted, Ok(Vec::new()));
    assert_eq!(open.metric("shared_data.errors"), 1);
    let mut closed = bench(ONE_RULE);
    closed.instance.settings = SharedDataSettings {
        on_error: FailureMode::Deny,
        ..closed.instance.settings
    };
    let refused = closed.run_on(&BrokenStore, NOW, |policy, env| {
        decided(policy.start(env, &request(&[])))
    });
    assert_eq!(
        refused.map_err(|r| (r.status, r.details)),
        Err((503, "resilience_state_unavailable"))
    );
}

#[test]
fn corrupt_slots_are_replaced_not_trusted() {
    let bench = bench(ONE_RULE);
    assert_eq!(bench.admitted(&request(&[]), 1), 1);
    assert_eq!(
        bench.store.set("resilience/t/rl/r/0", b"\x13garbage", None),
        Ok(())
    );
    assert_eq!(
        bench.admitted(&request(&[]), 10),
        5,
        "read as a fresh bucket"
    );
}

/// Eight OS threads as eight Envoy workers on one store, at the default settings: exactly
/// the capacity passes, and every refund lands.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn eight_workers_admit_exactly_the_capacity() {
    use crate::store::MemoryStore;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let rules = r#"{"rules": [
        {"name": "r", "capacity": 100, "refill": {"tokens": 1, "interval": "1h"}},
        {"name": "odd", "match": {"headers": [{"name": "x-odd", "present": true}]},
         "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}"#;
    let store = Arc::new(MemoryStore::default());
    let admitted = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let (store, admitted) = (Arc::clone(&store), Arc::clone(&admitted));
            std::thread::spawn(move || {
                let bench = bench(rules);
                for i in 0..200 {
                    // Every other request also meets a rule that refuses all but one, so
                    // its "r" token is taken and refunded under contention.
                    let odd = (worker + i) % 2 == 1;
                    let request = request(if odd { &[("x-odd", "1")] } else { &[] });
                    let result = bench.run_on(&*store, NOW, |policy, env| {
                        decided(policy.start(env, &request))
                    });
                    if result.is_ok() {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
                assert_eq!(
                    bench.metric("shared_data.errors"),
                    0,
                    "default settings, no failure"
                );
            })
        })
        .collect();
    for worker in workers {
        assert!(worker.join().is_ok());
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 100, "of 1600 requests");
}

/// Found in review: `x-api-key: rotate` then `x-api-key: alice` was keyed on the first line,
/// so rotating it bought a fresh bucket while the upstream may take the last. Every request
/// with a repeated key header shares one bucket of the rule.
#[test]
fn a_key_header_on_several_lines_shares_one_bucket() {
    let bench = bench(
        r#"{"rules": [{"name": "k", "key": [{"header": "x-api-key"}], "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    );
    let rotated = |i: usize| {
        let mut request = request(&[]);
        request.headers = vec![
            ("x-api-key".to_owned(), format!("rotate{i}").into_bytes()),
            ("x-api-key".to_owned(), b"alice".to_vec()),
        ];
        request
    };
    let admitted = (0..10)
        .filter(|&i| bench.decide(&rotated(i), NOW).is_ok())
        .count();
    assert_eq!(admitted, 2);
    assert_eq!(
        bench.admitted(&request(&[("x-api-key", "alice")]), 3),
        2,
        "alice's own bucket"
    );
}
