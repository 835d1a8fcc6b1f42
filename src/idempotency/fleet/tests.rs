//! The fleet tier's transactions against an in-memory etcd, one answer at a time.

use super::*;
use crate::etcd::fake::FakeEtcd;
use crate::hashing::{KeyHasher, Seed};
use crate::idempotency::Pending;
use crate::pipeline::config::Config;
use crate::telemetry::Catalog;
use crate::testing::{at, config, T0};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn policy(store: &str) -> Idempotency {
    let json = format!(r#"{{"idempotency": {{"lease": "30s", "store": {store}}}}}"#);
    policy_from(&json)
}

fn policy_from(json: &str) -> Idempotency {
    match config(json) {
        Config {
            idempotency: Some(config),
            ..
        } => Idempotency::new(config, KeyHasher::new(Seed([7, 9])), &mut Catalog::new("t")),
        other => panic!("{other:?}"),
    }
}

const STORE: &str = r#"{"etcd": {"cluster": "etcd", "timeout": "100ms"}}"#;

fn claim(policy: &Idempotency, claim: u64) -> (FleetClaim, ClaimId) {
    let place = policy.fleet_place(b"client and key");
    let fleet = policy.fleet_claim("t", Some(place), [1; 32]).unwrap();
    let id = ClaimId {
        pending: Pending {
            slot: 0,
            owner: 0,
            fleet: Some(place),
        },
        claim,
    };
    (fleet, id)
}

fn call(step: FleetStep) -> StoreCall {
    match step {
        FleetStep::Call(call) => call,
        other => panic!("{other:?}"),
    }
}

fn answer(etcd: &FakeEtcd, call: &StoreCall) -> Result<Swapped, AnswerError> {
    let (status, body) = etcd.answer(&call.body).expect("etcd is up");
    etcd::swapped(status, &body)
}

#[test]
fn a_claim_whose_answer_was_lost_is_recognised_when_its_transaction_is_sent_again() {
    let p = policy(STORE);
    let etcd = FakeEtcd::default();
    let (mut fleet, id) = claim(&p, 1);
    let first = call(p.fleet_start(&mut fleet, id, T0));
    assert_eq!(first.timeout, Duration::from_millis(100));
    let _landed = answer(&etcd, &first);
    // Its answer never came back (the member died after the commit): sent again, at once.
    let again = call(p.fleet_answer(&mut fleet, id, Err(AnswerError::NoAnswer), at(10)));
    assert_eq!(again.body, first.body);
    assert_eq!(
        again.timeout,
        Duration::from_millis(90),
        "within the one timeout"
    );
    let decided = p.fleet_answer(&mut fleet, id, answer(&etcd, &again), at(12));
    assert_eq!(decided, FleetStep::Decided(KeyCheck::Claimed));
    // And another claim on the same key is in flight, not a second execution.
    let (mut other, other_id) = claim(&p, 2);
    let first = call(p.fleet_start(&mut other, other_id, at(20)));
    assert_eq!(
        p.fleet_answer(&mut other, other_id, answer(&etcd, &first), at(21)),
        FleetStep::Decided(KeyCheck::InFlight {
            retry_after_secs: 30
        })
    );
}

#[test]
fn a_second_failure_or_an_exhausted_timeout_is_the_store_errors_to_decide() {
    let p = policy(STORE);
    let (mut fleet, id) = claim(&p, 1);
    let _ = call(p.fleet_start(&mut fleet, id, T0));
    let _ = call(p.fleet_answer(&mut fleet, id, Err(AnswerError::Status(503)), at(1)));
    assert_eq!(
        p.fleet_answer(&mut fleet, id, Err(AnswerError::NoAnswer), at(2)),
        FleetStep::Unavailable(AnswerError::NoAnswer)
    );
    let (mut late, id) = claim(&p, 2);
    let _ = call(p.fleet_start(&mut late, id, T0));
    assert_eq!(
        p.fleet_answer(&mut late, id, Err(AnswerError::NoAnswer), at(100)),
        FleetStep::Unavailable(AnswerError::NoAnswer),
        "the timeout is spent: no second call"
    );
}

#[test]
fn a_slot_raced_for_on_every_call_gives_up_as_contended() {
    let p = policy(STORE);
    let (mut fleet, id) = claim(&p, 1);
    let mut step = p.fleet_start(&mut fleet, id, T0);
    // Each answer shows an expired record that changed since the last read.
    let expired = IdempotencyRecord {
        owner: 5,
        fingerprint: [0; 32],
        deadline: T0,
        entry: Entry::InFlight { claim: 9 },
    };
    for revision in 1.. {
        match step {
            FleetStep::Call(_) => {}
            FleetStep::Unavailable(err) => {
                assert_eq!(err, AnswerError::Contended);
                assert_eq!(revision, 5, "4 calls, then no more");
                return;
            }
            other => panic!("{other:?}"),
        }
        let found = Swapped::Found(Some(etcd::Found {
            value: encode(&expired),
            revision,
        }));
        step = p.fleet_answer(&mut fleet, id, Ok(found), at(1));
    }
}

#[test]
fn a_finished_claim_writes_its_record_only_over_its_own_revision() {
    let p = policy(STORE);
    let etcd = FakeEtcd::default();
    let (mut fleet, id) = claim(&p, 1);
    let first = call(p.fleet_start(&mut fleet, id, T0));
    assert_eq!(
        p.fleet_answer(&mut fleet, id, answer(&etcd, &first), T0),
        FleetStep::Decided(KeyCheck::Claimed)
    );
    let unanswered = p.fleet_finish(fleet.clone(), id, &Outcome::Unanswered, at(5));
    assert_eq!(unanswered, None, "kept until the lease runs out");
    let write = p.fleet_finish(fleet, id, &Outcome::NotSent, at(5)).unwrap();
    assert_eq!(write.until, at(30_005));
    let body: serde_json::Value = serde_json::from_slice(&write.call().body).unwrap();
    assert_eq!(body["compare"][0]["target"], "MOD");
    assert_eq!(
        answer(&etcd, &write.call()),
        Ok(Swapped::Written { revision: 2 })
    );
    // Written twice, the second finds the record changed: it never overwrites another's.
    assert!(matches!(
        answer(&etcd, &write.call()),
        Ok(Swapped::Found(Some(_)))
    ));
}

#[test]
fn keys_are_placed_alike_by_every_envoy_whatever_its_seed() {
    let json = r#"{"idempotency": {"store": {"etcd": {"cluster": "etcd"}}}}"#;
    let build = |seed| match config(json) {
        Config {
            idempotency: Some(config),
            ..
        } => Idempotency::new(
            config,
            KeyHasher::new(Seed([seed, seed])),
            &mut Catalog::new("t"),
        ),
        other => panic!("{other:?}"),
    };
    let (a, b) = (build(1), build(2));
    assert_eq!(a.fleet_place(b"k"), b.fleet_place(b"k"));
    assert_ne!(a.fleet_place(b"k"), a.fleet_place(b"l"));
}

fn written(p: &Idempotency, etcd: &FakeEtcd, claim_id: u64, outcome: Outcome) -> FleetWrite {
    let (mut fleet, id) = claim(p, claim_id);
    let first = call(p.fleet_start(&mut fleet, id, T0));
    let _ = p.fleet_answer(&mut fleet, id, answer(etcd, &first), T0);
    p.fleet_finish(fleet, id, &outcome, at(1)).unwrap()
}

#[test]
fn a_full_queue_drops_releases_before_results() {
    let p = policy(STORE);
    let etcd = FakeEtcd::default();
    let release = written(&p, &etcd, 1, Outcome::NotSent);
    let result = written(
        &p,
        &FakeEtcd::default(),
        2,
        Outcome::Response(crate::idempotency::StoredResponse {
            status: 201,
            headers: Vec::new(),
            body: b"done".to_vec(),
        }),
    );
    let mut queue = FleetWrites::default();
    for _ in 0..MAX_PENDING_WRITES {
        assert!(queue.push(release.clone()));
    }
    assert!(!queue.push(release.clone()), "full: a release is dropped");
    assert!(
        !queue.push(result.clone()),
        "a result takes a release's place"
    );
    assert_eq!(queue.len(), MAX_PENDING_WRITES);
    let due = queue.take_due(at(1), MAX_PENDING_WRITES);
    assert_eq!(due.iter().filter(|w| **w == result).count(), 1);
    assert!(queue.is_empty());
}

#[test]
fn the_queue_holds_at_most_its_byte_budget() {
    let p =
        policy(r#"{"etcd": {"cluster": "etcd"}}, "max_response_bytes": 1048576, "records": 16"#);
    let big = written(
        &p,
        &FakeEtcd::default(),
        1,
        Outcome::Response(crate::idempotency::StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: vec![b'x'; 1 << 20],
        }),
    );
    let mut queue = FleetWrites::default();
    let mut queued = 0;
    while queue.push(big.clone()) {
        queued += 1;
    }
    assert_eq!(queued, MAX_PENDING_BYTES / big.bytes());
    // Taken out to be sent, its bytes no longer count.
    assert_eq!(queue.take_due(at(1), 1).len(), 1);
    assert!(queue.push(big));
}
