use super::*;
use crate::grpc::GrpcStatus;
use crate::hashing::Seed;
use crate::pipeline::config::Config;
use crate::policy::Completion;
use crate::store::MemoryStore;
use crate::testing::{at, config, T0};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn policy(json: &str) -> (Idempotency, SharedDataSettings) {
    match config(&format!(r#"{{"idempotency": {json}}}"#)) {
        Config {
            idempotency: Some(config),
            shared_data,
            ..
        } => (
            Idempotency::new(config, KeyHasher::new(Seed([7, 9])), &mut Catalog::new("t")),
            shared_data,
        ),
        other => panic!("{other:?}"),
    }
}

fn post(key: Option<&str>, authorization: &str) -> RequestInfo {
    let mut headers = vec![(
        "authorization".to_owned(),
        authorization.as_bytes().to_vec(),
    )];
    if let Some(key) = key {
        headers.push(("idempotency-key".to_owned(), key.as_bytes().to_vec()));
    }
    RequestInfo {
        headers,
        peer: "192.0.2.1".parse().ok(),
        ..RequestInfo::new(b"POST", b"/charges")
    }
}

struct Bench {
    policy: Idempotency,
    settings: SharedDataSettings,
    store: MemoryStore,
}

impl Bench {
    fn new(json: &str) -> Bench {
        let (policy, settings) = policy(json);
        Bench {
            policy,
            settings,
            store: MemoryStore::default(),
        }
    }

    fn pending(&self, request: &RequestInfo) -> Pending {
        match self.policy.begin(request) {
            Begin::Check(pending) => pending,
            other => panic!("{other:?}"),
        }
    }

    fn decide(&self, pending: Pending, body: &[u8], claim: u64, now: Instant) -> KeyCheck {
        let fingerprint = Idempotency::fingerprint("POST", b"/charges?x=1", body);
        self.policy
            .decide(
                &self.store,
                &ns(),
                ClaimId { pending, claim },
                fingerprint,
                now,
                self.settings,
            )
            .unwrap()
            .0
    }

    fn finish(&self, pending: Pending, claim: u64, outcome: Outcome, now: Instant) -> Finished {
        self.policy
            .finish(&self.store, &ns(), ClaimId { pending, claim }, outcome, now)
            .unwrap()
    }
}

fn ns() -> Namespace {
    Namespace::new("t")
}

fn created() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("location".into(), b"/charges/1".to_vec()),
        ],
        body: br#"{"id": 1}"#.to_vec(),
    }
}

#[test]
fn the_first_request_claims_and_duplicates_get_the_stored_response() {
    let b = Bench::new("{}");
    let k = b.pending(&post(Some("k1"), "Bearer a"));
    assert_eq!(b.decide(k, b"{}", 1, T0), KeyCheck::Claimed);
    assert_eq!(
        b.decide(k, b"{}", 2, at(10)),
        KeyCheck::InFlight {
            retry_after_secs: 30
        }
    );
    assert_eq!(
        b.finish(k, 1, Outcome::Response(created()), at(100)),
        Finished::Stored
    );
    assert_eq!(b.decide(k, b"{}", 3, at(200)), KeyCheck::Replay(created()));
    assert_eq!(
        b.decide(k, b"{\"other\": 1}", 4, at(300)),
        KeyCheck::Mismatch
    );
}

#[test]
fn keys_are_scoped_by_client_identity() {
    let b = Bench::new("{}");
    let alice = b.pending(&post(Some("same"), "Bearer alice"));
    let bob = b.pending(&post(Some("same"), "Bearer bob"));
    assert_ne!(alice, bob);
    let mut other_address = post(Some("same"), "Bearer alice");
    other_address.peer = "192.0.2.99".parse().ok();
    assert_ne!(
        alice,
        b.pending(&other_address),
        "the default identity includes the client address"
    );
}

#[test]
fn a_5xx_releases_the_key_and_4xx_are_kept_for_less_time() {
    let b = Bench::new(r#"{"ttl": "1h", "client_error_ttl": "1m"}"#);
    let k = b.pending(&post(Some("k"), "a"));
    assert_eq!(b.decide(k, b"", 1, T0), KeyCheck::Claimed);
    let failed = StoredResponse {
        status: 503,
        headers: vec![],
        body: vec![],
    };
    assert_eq!(
        b.finish(k, 1, Outcome::Response(failed), at(10)),
        Finished::Released
    );
    assert_eq!(
        b.decide(k, b"", 2, at(20)),
        KeyCheck::Claimed,
        "the client may retry"
    );
    let refused = StoredResponse {
        status: 402,
        headers: vec![],
        body: b"no".to_vec(),
    };
    assert_eq!(
        b.finish(k, 2, Outcome::Response(refused.clone()), at(30)),
        Finished::Stored
    );
    assert_eq!(b.decide(k, b"", 3, at(59_000)), KeyCheck::Replay(refused));
    assert_eq!(
        b.decide(k, b"", 4, at(60_031)),
        KeyCheck::Claimed,
        "the 4xx expired after a minute"
    );
}

/// An answer that means "not executed" (408, 409, 425, 429) frees the key, as a 5xx does:
/// a client that waits out a 429 and retries with the same key executes (issue 16: it was
/// refused for `client_error_ttl`, 10 minutes). `released_statuses: []` keeps them.
#[test]
fn a_not_executed_answer_frees_the_key_unless_configured_otherwise() {
    let answer = |status| StoredResponse {
        status,
        headers: vec![("retry-after".to_owned(), b"2".to_vec())],
        body: vec![],
    };
    let b = Bench::new("{}");
    for (claim, status) in [(1, 408), (2, 409), (3, 425), (4, 429)] {
        let k = b.pending(&post(Some(&format!("k{status}")), "a"));
        assert_eq!(b.decide(k, b"", claim, T0), KeyCheck::Claimed);
        assert_eq!(
            b.finish(k, claim, Outcome::Response(answer(status)), at(10)),
            Finished::Released,
            "{status}"
        );
        assert_eq!(
            b.decide(k, b"", claim + 10, at(20)),
            KeyCheck::Claimed,
            "{status}"
        );
    }
    let kept = Bench::new(r#"{"released_statuses": []}"#);
    let k = kept.pending(&post(Some("k"), "a"));
    assert_eq!(kept.decide(k, b"", 1, T0), KeyCheck::Claimed);
    assert_eq!(
        kept.finish(k, 1, Outcome::Response(answer(429)), at(10)),
        Finished::Stored
    );
    assert_eq!(
        kept.decide(k, b"", 2, at(20)),
        KeyCheck::Replay(answer(429)),
        "replayed with its Retry-After"
    );
    assert!(kept
        .policy
        .config()
        .stored_headers
        .contains(&"retry-after".to_owned()));
}

#[test]
fn server_errors_can_be_kept_when_configured() {
    let b = Bench::new(r#"{"server_error_ttl": "5m"}"#);
    let k = b.pending(&post(Some("k"), "a"));
    assert_eq!(b.decide(k, b"", 1, T0), KeyCheck::Claimed);
    let failed = StoredResponse {
        status: 500,
        headers: vec![],
        body: b"oops".to_vec(),
    };
    assert_eq!(
        b.finish(k, 1, Outcome::Response(failed.clone()), at(1)),
        Finished::Stored
    );
    assert_eq!(b.decide(k, b"", 2, at(2)), KeyCheck::Replay(failed));
}

#[test]
fn a_request_without_a_response_frees_its_key() {
    let b = Bench::new("{}");
    let k = b.pending(&post(Some("k"), "a"));
    assert_eq!(b.decide(k, b"", 1, T0), KeyCheck::Claimed);
    assert_eq!(b.finish(k, 1, Outcome::NotSent, at(5)), Finished::Released);
    assert_eq!(b.decide(k, b"", 2, at(6)), KeyCheck::Claimed);
}

#[test]
fn a_claim_nobody_finishes_expires_with_its_lease_and_its_late_finish_is_dropped() {
    let b = Bench::new(r#"{"lease": "2s"}"#);
    let k = b.pending(&post(Some("k"), "a"));
    assert_eq!(b.decide(k, b"", 1, T0), KeyCheck::Claimed);
    assert_eq!(
        b.decide(k, b"", 2, at(1_999)),
        KeyCheck::InFlight {
            retry_after_secs: 1
        }
    );
    assert_eq!(
        b.decide(k, b"", 3, at(2_000)),
        KeyCheck::Claimed,
        "the lease ran out: claimable"
    );
    assert_eq!(
        b.finish(k, 1, Outcome::Response(created()), at(2_500)),
        Finished::Superseded
    );
    assert_eq!(
        b.decide(k, b"", 4, at(2_600)),
        KeyCheck::InFlight {
            retry_after_secs: 2
        },
        "claim 3 still holds it"
    );
}

#[test]
fn a_response_too_large_to_store_is_never_executed_again() {
    let b = Bench::new("{}");
    let k = b.pending(&post(Some("k"), "a"));
    assert_eq!(b.decide(k, b"", 1, T0), KeyCheck::Claimed);
    assert_eq!(
        b.finish(k, 1, Outcome::ResponseNotStored { status: 200 }, at(1)),
        Finished::Stored
    );
    let again = b.decide(k, b"", 2, at(2));
    assert_eq!(again, KeyCheck::Unreplayable { status: 200 });
    assert_eq!(b.policy.problem(&again).map(|p| p.status), Some(409));
}

#[test]
fn a_live_record_of_another_key_makes_the_table_full() {
    let b = Bench::new(r#"{"records": 1}"#);
    let first = b.pending(&post(Some("first"), "a"));
    let second = b.pending(&post(Some("second"), "a"));
    assert_eq!(b.decide(first, b"", 1, T0), KeyCheck::Claimed);
    let full = b.decide(second, b"", 2, at(1));
    assert_eq!(
        full,
        KeyCheck::Full {
            retry_after_secs: 30
        },
        "the claim in the way holds for its lease"
    );
    assert_eq!(
        b.policy
            .problem(&full)
            .map(|p| (p.status, p.retry_after_secs)),
        Some((503, Some(30)))
    );
    assert_eq!(
        b.finish(first, 1, Outcome::Response(created()), at(2)),
        Finished::Stored
    );
    assert_eq!(
        b.decide(second, b"", 3, at(2)),
        KeyCheck::Full {
            retry_after_secs: 86_400
        },
        "found in review: Retry-After said 30 s while the record in the way lives a day"
    );
    assert_eq!(
        b.decide(second, b"", 4, at(86_400_002)),
        KeyCheck::Claimed,
        "the first expired after a day"
    );
    let (passing, _) = policy(r#"{"records": 1, "when_full": "pass"}"#);
    assert_eq!(passing.problem(&full), None);
}

#[test]
fn expired_records_are_swept_and_give_their_bytes_back() {
    let b = Bench::new(r#"{"records": 64, "ttl": "1s"}"#);
    let mut stored = 0;
    for i in 0..20 {
        let k = b.pending(&post(Some(&format!("k{i}")), "a"));
        if b.decide(k, b"", i, T0) == KeyCheck::Claimed {
            assert_eq!(
                b.finish(k, i, Outcome::Response(created()), T0),
                Finished::Stored
            );
            stored += 1;
        }
    }
    assert!(
        stored >= 15,
        "keys sharing a slot find the table full: {stored} stored"
    );
    let before: usize = (0..64)
        .filter_map(|s| {
            b.store
                .get(&format!("resilience/t/idem/{s}"))
                .ok()
                .flatten()
        })
        .map(|v| v.bytes.len())
        .sum();
    assert_eq!(
        b.policy
            .sweep(&b.store, &ns(), 0, 64, at(500), b.settings)
            .0,
        0,
        "nothing expired yet"
    );
    let (freed, next) = b
        .policy
        .sweep(&b.store, &ns(), 0, 64, at(1_000), b.settings);
    assert_eq!(freed, stored);
    assert_eq!(next, 0);
    let after: usize = (0..64)
        .filter_map(|s| {
            b.store
                .get(&format!("resilience/t/idem/{s}"))
                .ok()
                .flatten()
        })
        .map(|v| v.bytes.len())
        .sum();
    assert!(after * 10 < before, "{before} bytes before, {after} after");
}

#[test]
fn keys_are_checked_before_anything_else() {
    let (p, _) = policy(r#"{"required": true, "match": {"path_prefix": "/charges"}}"#);
    let problem = |r: &RequestInfo| match p.begin(r) {
        Begin::Refuse(problem) => Some((problem.status, problem.kind)),
        _ => None,
    };
    assert_eq!(problem(&post(None, "a")), Some((400, "key-missing")));
    assert_eq!(
        problem(&post(Some("bad key"), "a")),
        Some((400, "key-invalid"))
    );
    assert_eq!(
        problem(&post(Some(&"x".repeat(300)), "a")),
        Some((400, "key-invalid"))
    );
    assert!(matches!(
        p.begin(&post(Some("\"ok\""), "a")),
        Begin::Check(_)
    ));
    let mut get = post(None, "a");
    get.method = "GET".into();
    assert_eq!(p.begin(&get), Begin::Skip, "GET is not covered by default");
    let mut elsewhere = post(None, "a");
    elsewhere.path = "/other".into();
    assert_eq!(p.begin(&elsewhere), Begin::Skip);
    let (optional, _) = policy("{}");
    assert_eq!(
        optional.begin(&post(None, "a")),
        Begin::Skip,
        "a missing key is fine unless required"
    );
}

#[test]
fn problems_are_rfc_9457_json() {
    let (p, _) = policy("{}");
    let reply = p.problem(&KeyCheck::Mismatch).unwrap().reply();
    assert_eq!(
        reply.header("content-type"),
        Some(&b"application/problem+json"[..])
    );
    assert_eq!(reply.details, "resilience_idempotency");
    let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(json["status"], 422);
    assert_eq!(json["type"], "urn:envoy-resilience:idempotency:key-reused");
    assert!(json["detail"].as_str().unwrap().contains("Use a new key"));
}

#[test]
fn records_round_trip_and_foreign_bytes_are_refused() {
    use crate::store::{decode, encode};
    let record = IdempotencyRecord {
        owner: 5,
        fingerprint: [3; 32],
        deadline: T0,
        entry: Entry::Completed(created()),
    };
    assert_eq!(
        decode::<IdempotencyRecord>(&encode(&record)),
        Ok(record.clone())
    );
    let in_flight = IdempotencyRecord {
        entry: Entry::InFlight { claim: 9 },
        ..record.clone()
    };
    assert_eq!(
        decode::<IdempotencyRecord>(&encode(&in_flight)),
        Ok(in_flight)
    );
    assert_eq!(
        encode(&IdempotencyRecord::free()).len(),
        2,
        "a freed slot keeps two bytes"
    );
    let mut truncated = encode(&record);
    truncated.truncate(truncated.len() - 3);
    assert!(decode::<IdempotencyRecord>(&truncated).is_err());
}

/// Eight threads as eight workers, all sending the same request with the same key at once:
/// exactly one claims it.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn eight_workers_racing_with_one_key_make_one_claim() {
    use std::sync::Arc;
    let store = Arc::new(MemoryStore::default());
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let (policy, settings) = policy("{}");
                let store = &*store;
                let Begin::Check(pending) = policy.begin(&post(Some("race"), "a")) else {
                    panic!()
                };
                let fingerprint = Idempotency::fingerprint("POST", b"/charges", b"{}");
                (0..25u64)
                    .filter(|i| {
                        let decided = policy.decide(
                            store,
                            &ns(),
                            ClaimId {
                                pending,
                                claim: w * 100 + i,
                            },
                            fingerprint,
                            T0,
                            settings,
                        );
                        decided.unwrap().0 == KeyCheck::Claimed
                    })
                    .count()
            })
        })
        .collect();
    let claims: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(claims, 1, "of 200 attempts");
}

fn captured(
    config: &IdempotencyConfig,
    headers: &[(&str, &[u8])],
    body: &[u8],
    from_upstream: bool,
) -> Outcome {
    let mut capture = Capture::default();
    let headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect();
    capture.headers(config, Some(201), from_upstream, &headers, false);
    capture.body(config, body, true);
    let local = Completion {
        status: Some(201),
        ..Completion::default()
    };
    capture.outcome(&local)
}

/// Issue 15, defect 8: a stored header was cut at 65,535 bytes, which could split a UTF-8
/// character; the record then failed to decode and the duplicate executed again.
#[test]
fn a_header_too_long_for_the_record_makes_it_unreplayable_never_cut() {
    use crate::store::{decode, encode};
    let long = "é".repeat(40_000).into_bytes();
    let record = IdempotencyRecord {
        owner: 5,
        fingerprint: [3; 32],
        deadline: T0,
        entry: Entry::Completed(StoredResponse {
            status: 201,
            headers: vec![("location".into(), long.clone())],
            body: b"{}".to_vec(),
        }),
    };
    assert_eq!(
        decode::<IdempotencyRecord>(&encode(&record)).map(|r| r.entry),
        Ok(Entry::Unreplayable { status: 201 })
    );
    let (p, _) = policy(r#"{"max_response_bytes": 1048576, "records": 512}"#);
    assert_eq!(
        captured(p.config(), &[("location", &long)], b"{}", true),
        Outcome::ResponseNotStored { status: 201 },
        "within max_response_bytes, but longer than a record's header field"
    );
}

/// Issue 15, defect 1: a stored header that is not UTF-8 is replayed byte for byte.
#[test]
fn header_values_that_are_not_utf8_are_stored_and_replayed_as_bytes() {
    use crate::store::{decode, encode};
    let (p, _) = policy("{}");
    let outcome = captured(
        p.config(),
        &[("location", b"/orders/caf\xe9"), ("x-other", b"dropped")],
        b"{}",
        true,
    );
    let Outcome::Response(stored) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        stored.headers,
        [("location".to_owned(), b"/orders/caf\xe9".to_vec())],
        "allow-listed headers only"
    );
    let record = IdempotencyRecord {
        owner: 1,
        fingerprint: [0; 32],
        deadline: T0,
        entry: Entry::Completed(stored.clone()),
    };
    assert_eq!(
        decode::<IdempotencyRecord>(&encode(&record)).map(|r| r.entry),
        Ok(Entry::Completed(stored))
    );
}

/// Issue 15, defect 8: the memory bound `records × (max_response_bytes + 4096)` ignored stored
/// headers, and one record took 80 KB against a 4 KB allowance. Headers now count.
#[test]
fn a_record_never_takes_more_than_its_allowance() {
    use crate::store::encode;
    let (p, _) = policy(r#"{"max_response_bytes": 4096}"#);
    let budget = crate::idempotency::RECORD_FIXED_BYTES + 4096;
    let big = vec![b'x'; 80_000];
    type Headers<'a> = &'a [(&'a str, &'a [u8])];
    let cases: [(Headers<'_>, usize); 5] = [
        (&[("location", &big)], 0),
        (&[("location", &big[..4000])], 0),
        (&[("location", &big[..4000])], 200),
        (&[("etag", b"\"v1\"")], 4096),
        (&[("etag", b"\"v1\"")], 4000),
    ];
    for (headers, body_len) in cases {
        let outcome = captured(p.config(), headers, &big[..body_len], true);
        let entry = match outcome {
            Outcome::Response(stored) => {
                assert!(stored.size() <= 4096);
                Entry::Completed(stored)
            }
            Outcome::ResponseNotStored { status } => Entry::Unreplayable { status },
            Outcome::Unanswered | Outcome::NotSent => panic!("the upstream answered"),
        };
        let record = IdempotencyRecord {
            owner: 1,
            fingerprint: [0; 32],
            deadline: T0,
            entry,
        };
        assert!(
            encode(&record).len() <= budget,
            "{} bytes for a {body_len}-byte body",
            encode(&record).len()
        );
    }
    assert!(matches!(
        captured(p.config(), &[("etag", b"\"v1\"")], &big[..4000], true),
        Outcome::Response(_)
    ));
    assert!(matches!(
        captured(p.config(), &[("etag", b"\"v1\"")], &big[..4096], true),
        Outcome::ResponseNotStored { .. }
    ));
}

/// Issue 15, defect 2: a response that ends in trailers never completed its capture.
#[test]
fn a_response_ending_in_trailers_is_complete_and_grpc_is_never_stored() {
    let (p, _) = policy("{}");
    let config = p.config();
    let mut capture = Capture::default();
    capture.headers(config, Some(200), true, &[], false);
    capture.body(config, b"data", false);
    capture.trailers();
    assert!(matches!(capture.outcome(&answered()), Outcome::Response(_)));

    let mut grpc = Capture::default();
    let content_type = vec![(
        "content-type".to_owned(),
        b"application/grpc+proto".to_vec(),
    )];
    grpc.headers(config, Some(200), true, &content_type, false);
    grpc.body(config, b"\0\0\0\0\x02hi", false);
    grpc.trailers();
    assert_eq!(
        grpc.outcome(&answered()),
        Outcome::ResponseNotStored { status: 200 },
        "its grpc-status lives in trailers, which a replay cannot send"
    );
    // A call the server failed is judged by its grpc-status, as a 503: released by default,
    // so the client's retry executes; not kept for `ttl` as a 200 would be.
    let mut failed = Capture::default();
    failed.headers(config, Some(200), true, &content_type, true);
    let unavailable = Completion {
        grpc_status: GrpcStatus::from_code(14),
        ..answered()
    };
    assert_eq!(
        failed.outcome(&unavailable),
        Outcome::ResponseNotStored { status: 503 }
    );
    assert_eq!(p.config().keep_for(503), None, "released");

    let mut cut = Capture::default();
    cut.headers(config, Some(200), true, &[], false);
    cut.body(config, b"half", false);
    assert_eq!(
        cut.outcome(&answered()),
        Outcome::ResponseNotStored { status: 200 }
    );
}

fn answered() -> Completion {
    Completion {
        status: Some(200),
        via_upstream: true,
        ..Completion::default()
    }
}

/// A local reply (another stage's refusal, a chained instance's 429) is not the upstream's
/// answer: the request never executed, so the key is freed, never stored.
#[test]
fn a_local_reply_frees_the_key() {
    let (p, _) = policy("{}");
    assert_eq!(
        captured(p.config(), &[], b"rate limited", false),
        Outcome::NotSent
    );
}

/// Found in review: a client that timed out (or a route timeout) released the claim, and its
/// retry executed while the first request was still running upstream. A request that may
/// have reached the upstream keeps its claim until the lease runs out.
#[test]
fn a_request_the_upstream_may_have_keeps_its_claim_until_the_lease() {
    let outcome = |completion: Completion| Capture::default().outcome(&completion);
    let routed = |status: Option<u16>, flags: u64| Completion {
        status,
        flags,
        upstream_host: true,
        ..Completion::default()
    };
    let may_have_it = [
        ("the client left", routed(None, 0x4000)),
        ("an HTTP/2 reset by the client", routed(None, 0x1000_0000)),
        ("a route timeout", routed(Some(504), 0x4)),
        ("an upstream reset", routed(Some(503), 0x10)),
        ("a stream idle timeout", routed(Some(504), 0x1_0000)),
        (
            "a max stream duration, no flag at all",
            routed(Some(504), 0),
        ),
        (
            "retries exhausted after a timeout",
            routed(Some(504), 0x8000 | 0x4 | 0x20),
        ),
    ];
    for (ending, completion) in may_have_it {
        assert_eq!(outcome(completion), Outcome::Unanswered, "{ending}");
    }
    let never_sent = [
        ("a connect failure", routed(Some(503), 0x20)),
        (
            "connect failures, retried",
            routed(Some(503), 0x8000 | 0x20),
        ),
        ("no healthy upstream", routed(Some(503), 0x2)),
        (
            "a later filter's reply",
            Completion {
                status: Some(429),
                ..Completion::default()
            },
        ),
        (
            "a client that left before the router",
            Completion {
                flags: 0x4000,
                ..Completion::default()
            },
        ),
    ];
    for (ending, completion) in never_sent {
        assert_eq!(outcome(completion), Outcome::NotSent, "{ending}");
    }

    let b = Bench::new(r#"{"lease": "2s"}"#);
    let k = b.pending(&post(Some("k"), "a"));
    assert_eq!(b.decide(k, b"", 1, T0), KeyCheck::Claimed);
    assert_eq!(b.finish(k, 1, Outcome::Unanswered, at(500)), Finished::Kept);
    assert_eq!(
        b.decide(k, b"", 2, at(600)),
        KeyCheck::InFlight {
            retry_after_secs: 2
        },
        "a retry must not run while the first may still be executing"
    );
    assert_eq!(
        b.decide(k, b"", 3, at(2_000)),
        KeyCheck::Claimed,
        "after the lease"
    );
}

#[test]
fn a_key_sent_twice_is_invalid() {
    let (p, _) = policy("{}");
    let mut twice = post(Some("a"), "alice");
    twice
        .headers
        .push(("idempotency-key".to_owned(), b"b".to_vec()));
    match p.begin(&twice) {
        Begin::Refuse(problem) => {
            assert_eq!((problem.status, problem.kind), (400, "key-invalid"));
            assert!(problem.detail.contains("more than once"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !p.awaits_body(&twice),
        "answered at once, without waiting for the body"
    );
}

/// Every table the configuration accepts fits its memory budget as written: `records` ×
/// (`max_response_bytes` + 4096) within 1 GiB, or the configuration is refused; and every
/// response the capture may store (at most `max_response_bytes` of headers, framing and body,
/// within the record's fixed-width lengths) encodes to a record of at most its fixed fields
/// plus that size, so a slot never holds more than the budget counted for it.
#[test]
fn every_accepted_table_stays_within_its_memory_budget() {
    use crate::idempotency::{
        Entry, IdempotencyRecord, StoredResponse, MAX_STORED_HEADERS, RECORD_FIXED_BYTES,
    };
    use crate::testing::{parsed_exactly_when, Cases};
    const OVERHEAD: u64 = 4096;
    let mut cases = Cases::new(0x7ab1_e5e5);
    for case in 0..2_000 {
        let records = cases.in_range(0, (1 << 20) + 1);
        let max_response_bytes = cases.in_range(0, (1 << 20) + 1);
        let json = format!(
            r#"{{"idempotency": {{"records": {records}, "max_response_bytes": {max_response_bytes}}}}}"#
        );
        let enforceable = (1..=1 << 20).contains(&records)
            && max_response_bytes <= 1 << 20
            && records * (max_response_bytes + OVERHEAD) <= 1 << 30;
        let Ok(config) = parsed_exactly_when(enforceable, &json, case) else {
            continue;
        };
        let config = config.idempotency;
        let Some(config) = config else {
            panic!("case {case}: no section")
        };
        // A response of exactly the largest size stored: headers, then the rest as body.
        let limit = config.max_response_bytes;
        let mut headers = Vec::new();
        let mut left = limit;
        while headers.len() < MAX_STORED_HEADERS && left > 8 && cases.next() % 3 != 0 {
            let value_len = (cases.in_range(0, 300) as usize).min(left - 5);
            headers.push(("x-h".to_owned(), vec![0xff; value_len.saturating_sub(3)]));
            left -= 4 + 3 + value_len.saturating_sub(3);
        }
        let response = StoredResponse {
            status: 201,
            headers,
            body: vec![b'x'; left],
        };
        assert_eq!(response.size(), limit, "case {case}");
        assert!(response.fits_record());
        let record = IdempotencyRecord {
            owner: u64::MAX,
            fingerprint: [0xff; 32],
            deadline: Instant::from_nanos(u64::MAX),
            entry: Entry::Completed(response),
        };
        let bytes = crate::store::encode(&record).len();
        assert!(
            bytes <= RECORD_FIXED_BYTES + limit,
            "case {case}: {bytes} bytes for a {limit}-byte response"
        );
        assert!(
            bytes as u64 <= limit as u64 + OVERHEAD,
            "case {case}: the budget counts {} bytes for the slot, it holds {bytes}",
            limit as u64 + OVERHEAD
        );
    }
}

/// Every lease and TTL the configuration accepts (1 ms to 30 days) holds exactly as written:
/// a response is replayed until its TTL has passed since it was stored (that of its class:
/// success, client error, server error when kept) and the key is free from that instant; a
/// claim holds the key until its lease has passed; anything outside the range is refused.
#[test]
fn every_accepted_lease_and_ttl_holds_exactly_as_written() {
    use crate::testing::{parsed_exactly_when, Cases};
    const MONTH_NS: u64 = 30 * 86_400 * 1_000_000_000;
    let mut cases = Cases::new(0x0077_1e55);
    for case in 0..1_000 {
        let [lease, ttl, client_error_ttl, server_error_ttl] =
            [(); 4].map(|()| cases.in_range(999_999, MONTH_NS + 1));
        let json = format!(
            r#"{{"lease": "{lease}ns", "ttl": "{ttl}ns", "client_error_ttl": "{client_error_ttl}ns",
                "server_error_ttl": "{server_error_ttl}ns"}}"#
        );
        let enforceable = [lease, ttl, client_error_ttl, server_error_ttl]
            .iter()
            .all(|d| (1_000_000..=MONTH_NS).contains(d));
        let document = format!(r#"{{"idempotency": {json}}}"#);
        if parsed_exactly_when(enforceable, &document, case).is_err() {
            continue;
        }
        let b = Bench::new(&json);
        let after = |ns: u64| T0.saturating_add(std::time::Duration::from_nanos(ns));
        // A claim never answered (its request may still run) frees the key at its lease.
        let k = b.pending(&post(Some("unanswered"), "a"));
        assert_eq!(b.decide(k, b"{}", 1, T0), KeyCheck::Claimed);
        let k = b.pending(&post(Some("unanswered"), "a"));
        assert!(
            matches!(
                b.decide(k, b"{}", 2, after(lease - 1)),
                KeyCheck::InFlight { .. }
            ),
            "case {case}: {json}: held until its lease"
        );
        let k = b.pending(&post(Some("unanswered"), "a"));
        assert_eq!(
            b.decide(k, b"{}", 3, after(lease)),
            KeyCheck::Claimed,
            "case {case}: {json}: free at its lease"
        );
        for (status, kept) in [(201, ttl), (404, client_error_ttl), (503, server_error_ttl)] {
            let key = format!("k{status}");
            let k = b.pending(&post(Some(&key), "a"));
            assert_eq!(b.decide(k, b"{}", 1, T0), KeyCheck::Claimed, "case {case}");
            // Before it completes, the claim holds the key until exactly its lease.
            let k = b.pending(&post(Some(&key), "a"));
            assert!(
                matches!(
                    b.decide(k, b"{}", 2, after(lease - 1)),
                    KeyCheck::InFlight { .. }
                ),
                "case {case}: {json}: lease"
            );
            let k = b.pending(&post(Some(&key), "a"));
            let response = StoredResponse {
                status,
                ..created()
            };
            b.finish(k, 1, Outcome::Response(response.clone()), T0);
            let k = b.pending(&post(Some(&key), "a"));
            assert_eq!(
                b.decide(k, b"{}", 3, after(kept - 1)),
                KeyCheck::Replay(response),
                "case {case}: {json}: {status} replayed until its TTL"
            );
            let k = b.pending(&post(Some(&key), "a"));
            assert_eq!(
                b.decide(k, b"{}", 4, after(kept)),
                KeyCheck::Claimed,
                "case {case}: {json}: {status} free once its TTL passed"
            );
        }
    }
}
