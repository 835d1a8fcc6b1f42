//! Idempotency across a fleet: several Envoys (each with its own shared data and secret
//! seed) and one etcd.

use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const FLEET: &str = r#"{"idempotency": {"required": true, "lease": "30s", "store": {"etcd": {"cluster": "etcd"}}}}"#;
const FLEET_ALLOW: &str = r#"{"idempotency": {"required": true, "store": {"etcd": {"cluster": "etcd"}, "on_store_error": "allow"}}}"#;

fn fleet(json: &str, envoys: u64) -> (Rc<FakeEtcd>, Vec<Proxy>) {
    let etcd = Rc::new(FakeEtcd::default());
    let proxies = (1..=envoys)
        .map(|seed| Proxy::in_fleet(json, seed, &etcd))
        .collect();
    (etcd, proxies)
}

fn replayed(result: &Result<(), Reply>) -> bool {
    result.as_ref().is_err_and(|reply| {
        reply
            .headers
            .iter()
            .any(|(name, value)| name == "idempotent-replayed" && value == b"true")
    })
}

/// Starts a request that goes upstream and stays there until the test finishes it.
fn start(proxy: &Proxy, key: &str, body: &[u8]) -> Exchange {
    let mut exchange = Exchange::default();
    assert!(matches!(
        proxy.send(&mut exchange, keyed(key), body),
        Step::Continue
    ));
    exchange
}

fn complete(proxy: &Proxy, exchange: &mut Exchange, status: u16) {
    proxy.respond(exchange, &Upstream::answering(status), b"done");
    proxy.finish(exchange, answered(status));
}

#[test]
fn a_duplicate_on_another_envoy_waits_then_gets_the_stored_response() {
    let (etcd, envoys) = fleet(FLEET, 3);
    let mut first = start(&envoys[0], "k", b"{}");
    for other in &envoys[1..] {
        let duplicate = other.call(keyed("k"), b"{}", 200);
        assert_eq!(status(&duplicate), 409, "in flight on another Envoy");
    }
    complete(&envoys[0], &mut first, 201);
    for envoy in &envoys {
        let replay = envoy.call(keyed("k"), b"{}", 200);
        assert!(replayed(&replay), "{replay:?}");
        assert_eq!(status(&replay), 201);
        assert_eq!(replay.unwrap_err().body, b"done");
    }
    // Envoy 0 answered from its own table: its duplicate never left it.
    let calls = etcd.calls.get();
    assert!(envoys[0].call(keyed("k"), b"{}", 200).is_err());
    assert_eq!(etcd.calls.get(), calls);
    // The other Envoys gave back their own claims: another key is theirs to claim.
    assert_eq!(status(&envoys[1].call(keyed("k2"), b"{}", 200)), 200);
}

#[test]
fn the_same_key_with_another_body_on_another_envoy_gets_422() {
    let (_, envoys) = fleet(FLEET, 2);
    assert_eq!(
        status(&envoys[0].call(keyed("k"), b"{}", 201)),
        200,
        "forwarded"
    );
    assert_eq!(status(&envoys[1].call(keyed("k"), b"{\"x\":1}", 201)), 422);
}

#[test]
fn with_etcd_down_deny_answers_503_and_keeps_nothing() {
    let (etcd, envoys) = fleet(FLEET, 2);
    etcd.down.set(true);
    let refused = envoys[0].call(keyed("k"), b"{}", 200);
    let reply = refused.as_ref().unwrap_err();
    assert_eq!(reply.status, 503);
    assert!(String::from_utf8_lossy(&reply.body).contains("store-unavailable"));
    assert!(reply
        .headers
        .iter()
        .any(|(n, v)| n == "retry-after" && v == b"1"));
    assert_eq!(envoys[0].metric("idempotency.store_unavailable"), 1);
    etcd.down.set(false);
    // This Envoy's claim went back with the refusal: the retry is claimed and executed once.
    assert_eq!(
        status(&envoys[0].call(keyed("k"), b"{}", 201)),
        200,
        "forwarded"
    );
    assert!(replayed(&envoys[1].call(keyed("k"), b"{}", 201)));
}

#[test]
fn with_etcd_down_allow_goes_on_under_this_envoys_claim() {
    let (etcd, envoys) = fleet(FLEET_ALLOW, 2);
    etcd.down.set(true);
    let mut first = start(&envoys[0], "k", b"{}");
    assert_eq!(
        status(&envoys[0].call(keyed("k"), b"{}", 200)),
        409,
        "this Envoy still protects"
    );
    complete(&envoys[0], &mut first, 201);
    assert!(replayed(&envoys[0].call(keyed("k"), b"{}", 200)));
    assert_eq!(envoys[0].metric("idempotency.store_unavailable"), 1);
}

#[test]
fn a_claim_left_unanswered_holds_the_key_fleet_wide_until_its_lease_ends() {
    let (_, envoys) = fleet(FLEET, 2);
    let mut first = start(&envoys[0], "k", b"{}");
    // The client went away while the upstream had the request: it may still be executing.
    envoys[0].finish(
        &mut first,
        Completion {
            upstream_host: true,
            ..Completion::default()
        },
    );
    assert_eq!(status(&envoys[1].call(keyed("k"), b"{}", 200)), 409);
    for envoy in &envoys {
        envoy.advance(30_001);
    }
    // The lease ran out: the slot's record is taken over by a compare on its revision.
    assert_eq!(
        status(&envoys[1].call(keyed("k"), b"{}", 201)),
        200,
        "forwarded"
    );
    assert!(replayed(&envoys[0].call(keyed("k"), b"{}", 200)));
}

#[test]
fn a_request_that_never_reached_the_upstream_frees_the_key_fleet_wide() {
    let (_, envoys) = fleet(FLEET, 2);
    let mut first = start(&envoys[0], "k", b"{}");
    // The connection to the upstream failed: Envoy answered 503 itself.
    envoys[0].finish(&mut first, local(503));
    assert_eq!(
        status(&envoys[1].call(keyed("k"), b"{}", 201)),
        200,
        "forwarded"
    );
}

#[test]
fn a_fleet_write_that_fails_is_sent_again_until_it_lands() {
    let (etcd, envoys) = fleet(FLEET, 2);
    let mut first = start(&envoys[0], "k", b"{}");
    etcd.down.set(true);
    complete(&envoys[0], &mut first, 201);
    assert_eq!(envoys[0].writes.borrow().len(), 1, "kept for the next tick");
    etcd.down.set(false);
    envoys[0].advance(100);
    envoys[0].flush_writes();
    assert!(envoys[0].writes.borrow().is_empty());
    assert!(replayed(&envoys[1].call(keyed("k"), b"{}", 200)));
}

#[test]
fn a_fleet_write_still_failing_when_its_claim_expires_is_counted_and_dropped() {
    let (etcd, envoys) = fleet(FLEET, 1);
    let mut first = start(&envoys[0], "k", b"{}");
    etcd.down.set(true);
    complete(&envoys[0], &mut first, 201);
    envoys[0].advance(30_000);
    envoys[0].flush_writes();
    assert!(envoys[0].writes.borrow().is_empty());
    assert_eq!(envoys[0].metric("idempotency.store_writes_lost"), 1);
}

#[test]
fn keys_have_the_same_fleet_slot_on_every_envoy_and_etcd_holds_at_most_records_keys() {
    let json = r#"{"idempotency": {"required": true, "records": 8, "store": {"etcd": {"cluster": "etcd", "prefix": "p/"}}}}"#;
    let (etcd, envoys) = fleet(json, 2);
    for i in 0..40 {
        let envoy = &envoys[i % 2];
        let _ = envoy.call(keyed(&format!("key-{i}")), b"{}", 201);
    }
    let keys = etcd.values();
    assert!(keys.len() <= 8, "{} keys", keys.len());
    assert!(keys
        .keys()
        .all(|k| k.starts_with(b"p/t/idem/") && k.len() <= b"p/t/idem/7".len()));
}

#[test]
fn a_claim_whose_answers_were_lost_is_freed_by_its_value_when_deny_refuses() {
    let (etcd, envoys) = fleet(FLEET, 2);
    // The claim lands, but neither its answer nor the answer to the second try comes back.
    etcd.lose_answers.set(2);
    assert_eq!(status(&envoys[0].call(keyed("k"), b"{}", 200)), 503);
    // The stream's end wrote the record free, compared on its exact bytes: the key is
    // free fleet-wide at once, not held for the claim's 30 s lease.
    assert!(envoys[0].writes.borrow().is_empty());
    assert_eq!(
        status(&envoys[1].call(keyed("k"), b"{}", 201)),
        200,
        "forwarded"
    );
}

#[test]
fn a_claim_whose_answers_were_lost_stores_its_response_by_value_under_allow() {
    let (etcd, envoys) = fleet(FLEET_ALLOW, 2);
    etcd.lose_answers.set(2);
    assert_eq!(
        status(&envoys[0].call(keyed("k"), b"{}", 201)),
        200,
        "forwarded"
    );
    assert!(replayed(&envoys[1].call(keyed("k"), b"{}", 200)));
}

#[test]
fn failed_fleet_writes_back_off_and_a_full_queue_drops_and_counts() {
    let (etcd, envoys) = fleet(FLEET, 1);
    let envoy = &envoys[0];
    let mut first = start(envoy, "k", b"{}");
    etcd.down.set(true);
    complete(envoy, &mut first, 201);
    assert_eq!(envoy.writes.borrow().len(), 1);
    // Failed at once: due again 10 ms later, then 20 ms after that.
    let calls = etcd.calls.get();
    envoy.advance(9);
    envoy.flush_writes();
    etcd.down.set(false);
    assert_eq!(etcd.calls.get(), calls, "not due yet");
    etcd.down.set(true);
    envoy.advance(1);
    envoy.flush_writes();
    assert_eq!(envoy.writes.borrow().len(), 1);
    // A queue at its bound drops what comes next.
    let write = {
        let mut due = envoy.writes.borrow_mut().take_due(at(60_000), 1);
        due.pop().unwrap()
    };
    for _ in 0..=crate::idempotency::MAX_PENDING_WRITES {
        envoy.run(&envoy.store, |filter, env| {
            filter.queue_fleet_write(env, &mut envoy.writes.borrow_mut(), write.clone());
        });
    }
    assert_eq!(
        envoy.writes.borrow().len(),
        crate::idempotency::MAX_PENDING_WRITES
    );
    assert_eq!(envoy.metric("idempotency.store_writes_lost"), 1);
}

/// A claim sent to etcd whose stream ends before the answer (the client left): the claim
/// may commit, so the stream's end frees it by its value, also when it commits late.
#[test]
fn a_stream_gone_while_its_claim_was_on_the_way_frees_the_key_even_if_it_commits_late() {
    let (etcd, envoys) = fleet(FLEET, 2);
    let mut exchange = Exchange::default();
    let step = match envoys[0].headers(&mut exchange, keyed("k"), false) {
        Step::Pause => envoys[0].body(&mut exchange, b"{}", true),
        other => other,
    };
    let Step::Call(claim) = step else {
        panic!("no call to etcd")
    };
    // The client leaves; Envoy logs the stream before etcd commits the claim.
    envoys[0].finish(&mut exchange, Completion::default());
    assert_eq!(
        envoys[0].writes.borrow().len(),
        1,
        "nothing there yet: tried again"
    );
    assert!(etcd.answer(&claim.body).is_some(), "the claim commits late");
    envoys[0].advance(10);
    envoys[0].flush_writes();
    assert!(envoys[0].writes.borrow().is_empty());
    assert_eq!(
        status(&envoys[1].call(keyed("k"), b"{}", 201)),
        200,
        "free at once"
    );
}

/// A call the host could not send leaves nothing to settle in etcd.
#[test]
fn a_call_never_sent_leaves_no_write() {
    let (etcd, envoys) = fleet(FLEET, 1);
    let mut exchange = Exchange::default();
    let step = match envoys[0].headers(&mut exchange, keyed("k"), false) {
        Step::Pause => envoys[0].body(&mut exchange, b"{}", true),
        other => other,
    };
    assert!(matches!(step, Step::Call(_)));
    for _ in 0..2 {
        let step = envoys[0].run(&envoys[0].store, |filter, env| {
            exchange.on_store_answer(filter, env, Err(crate::etcd::AnswerError::NotSent), |_| {
                Vec::new()
            })
        });
        if let Step::Reply(reply) = step {
            assert_eq!(reply.status, 503);
            break;
        }
    }
    envoys[0].finish(&mut exchange, local(503));
    assert!(envoys[0].writes.borrow().is_empty());
    assert_eq!(etcd.calls.get(), 0);
}

#[test]
fn claims_count_once_whichever_tier_decides() {
    let (_, envoys) = fleet(FLEET, 2);
    assert_eq!(status(&envoys[0].call(keyed("k"), b"{}", 201)), 200);
    assert!(replayed(&envoys[1].call(keyed("k"), b"{}", 201)));
    assert_eq!(envoys[0].metric("idempotency.claims"), 1);
    assert_eq!(envoys[1].metric("idempotency.claims"), 0);
    assert_eq!(envoys[1].metric("idempotency.replays"), 1);
}

/// With a fleet store, a key whose slot in this Envoy's table holds another live key is
/// decided by the fleet's table, where it may have room.
#[test]
fn a_slot_full_in_this_envoy_is_decided_by_the_fleet() {
    let json = r#"{"idempotency": {"required": true, "records": 2, "store": {"etcd": {"cluster": "etcd"}}}}"#;
    let (_, envoys) = fleet(json, 2);
    let pending = |key: &str| {
        let policy = envoys[0].filter.idempotency.as_ref().unwrap();
        match policy.begin(&keyed(key)) {
            crate::idempotency::Begin::Check(pending) => pending,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(status(&envoys[0].call(keyed("a"), b"{}", 201)), 200);
    let a = pending("a");
    let b = (0..1000)
        .map(|i| format!("b{i}"))
        .find(|key| {
            let b = pending(key);
            b.slot == a.slot && b.fleet.map(|f| f.slot) != a.fleet.map(|f| f.slot)
        })
        .unwrap();
    assert_eq!(
        status(&envoys[0].call(keyed(&b), b"{}", 201)),
        200,
        "forwarded"
    );
    assert!(replayed(&envoys[1].call(keyed(&b), b"{}", 200)));
    assert!(
        replayed(&envoys[0].call(keyed("a"), b"{}", 200)),
        "a still held here"
    );
    assert_eq!(envoys[0].metric("idempotency.full"), 0);
}
