use super::*;
use crate::etcd;
use crate::etcd::fake::FakeEtcd;
use crate::testing::T0;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const TIMEOUT: Duration = Duration::from_millis(500);

fn bucket(capacity: u64, tokens: u64, interval: Duration) -> Bucket {
    match Bucket::new(capacity, tokens, interval) {
        Some(bucket) => bucket,
        None => panic!("invalid bucket"),
    }
}

fn after(ms: u64) -> Instant {
    T0.saturating_add(Duration::from_millis(ms))
}

#[test]
fn a_grant_never_takes_the_reserve() {
    let b = bucket(100, 1, Duration::from_secs(3600));
    let first = b.grant(None, T0, 1, 30, 10);
    assert_eq!(first.granted, 30);
    let second = b.grant(Some(first.tat), T0, 1, 100, 10);
    assert_eq!(second.granted, 60, "100 - 30 taken - 10 held back");
    let third = b.grant(Some(second.tat), T0, 1, 30, 10);
    assert_eq!(third.granted, 0);
    assert_eq!(
        third.retry_after,
        Duration::from_secs(3600),
        "one token's refill"
    );
}

#[test]
fn a_lease_from_a_full_bucket_lasts_as_long_as_the_reserve_takes_to_refill() {
    let b = bucket(100, 10, Duration::from_secs(1)); // a token every 100 ms
    let grant = b.grant(None, T0, 1, 20, 20);
    assert_eq!(grant.valid_until, after(2_000));
    // From a bucket in debt, a lease lasts until the debt and the reserve are paid back.
    let later = b.grant(Some(grant.tat), T0, 1, 20, 20);
    assert_eq!(later.valid_until, after(4_000));
}

#[test]
fn a_lease_is_spent_locally_then_refilled_by_one_ask() {
    let owner = 7;
    let (first, lease) = take(None, owner, T0, 1, 10, TIMEOUT);
    assert_eq!(
        first,
        Taking::Ask {
            ask: 10,
            lease: true,
            seen: None
        }
    );
    let (again, _) = take(lease, owner, T0, 1, 10, TIMEOUT);
    assert_eq!(again, Taking::Wait, "one ask at a time per Envoy");
    let b = bucket(100, 1, Duration::from_secs(3600));
    let grant = b.grant(None, T0, 1, 10, 10);
    let seen = Seen {
        revision: 5,
        slot: crate::rate_limit::Slot {
            owner,
            tat: grant.tat,
            ticks_per_ns: 1,
        },
    };
    let (left, lease) = settle(
        lease,
        owner,
        T0,
        1,
        &Granted::Tokens {
            grant,
            seen,
            writer: 3,
        },
    );
    assert_eq!(left, 9, "the asking request took its token first");
    let mut lease = lease;
    for expected in (0..9).rev() {
        let (taking, next) = take(lease, owner, T0, 1, 10, TIMEOUT);
        assert!(matches!(taking, Taking::Spent { left, .. } if left == expected));
        lease = next;
    }
    let (empty, _) = take(lease, owner, T0, 1, 10, TIMEOUT);
    assert_eq!(
        empty,
        Taking::Ask {
            ask: 10,
            lease: true,
            seen: Some(seen)
        }
    );
}

#[test]
fn an_expired_lease_is_not_spent_and_the_next_ask_shrinks_to_the_use() {
    let owner = 7;
    let lease = Lease {
        owner,
        tokens: 40,
        spent: 3,
        valid_until: after(100),
        ..Lease::default()
    };
    let (taking, _) = take(Some(lease), owner, after(100), 1, 50, TIMEOUT);
    assert_eq!(
        taking,
        Taking::Ask {
            ask: 6,
            lease: true,
            seen: None
        }
    );
}

#[test]
fn a_refusal_and_an_outage_are_remembered_without_asking() {
    let owner = 7;
    let (_, lease) = take(None, owner, T0, 1, 10, TIMEOUT);
    let b = bucket(10, 1, Duration::from_secs(10));
    let empty = b.grant(
        Some(b.ticks(T0.saturating_add(Duration::from_secs(100)))),
        T0,
        1,
        10,
        5,
    );
    assert_eq!(empty.granted, 0);
    let (_, refused) = settle(
        lease,
        owner,
        T0,
        1,
        &Granted::Empty {
            grant: empty,
            seen: None,
        },
    );
    let (taking, write) = take(refused, owner, after(1), 1, 10, TIMEOUT);
    assert!(matches!(taking, Taking::Refused { .. }) && write.is_none());
    let (_, lease) = take(None, owner, T0, 1, 10, TIMEOUT);
    let (_, down) = settle(
        lease,
        owner,
        T0,
        1,
        &Granted::Unavailable(AnswerError::NoAnswer),
    );
    let (taking, _) = take(down, owner, after(999), 1, 10, TIMEOUT);
    assert_eq!(taking, Taking::Unavailable);
    let (taking, _) = take(down, owner, after(1_000), 1, 10, TIMEOUT);
    assert!(
        matches!(taking, Taking::Ask { .. }),
        "asks again after a second"
    );
}

#[test]
fn another_keys_live_lease_is_left_alone() {
    let (_, lease) = take(None, 7, T0, 1, 10, TIMEOUT);
    let (taking, write) = take(lease, 8, T0, 2, 10, TIMEOUT);
    assert_eq!(
        taking,
        Taking::Ask {
            ask: 2,
            lease: false,
            seen: None
        }
    );
    assert_eq!(write, None);
}

#[test]
fn leases_decode_what_they_encode_and_refuse_other_bytes() {
    let lease = Lease {
        owner: 1,
        tokens: 2,
        spent: 3,
        valid_until: after(4),
        asking_until: after(5),
        refused_until: after(6),
        unavailable_until: after(7),
        more_at: after(8),
        grant: 13,
        stamp: after(14),
        seen: Some(Seen {
            revision: 9,
            slot: crate::rate_limit::Slot {
                owner: 10,
                tat: Tat(u128::MAX - 1),
                ticks_per_ns: 12,
            },
        }),
    };
    assert_eq!(decode::<Lease>(&encode(&lease)), Ok(lease));
    let none = Lease::default();
    assert_eq!(decode::<Lease>(&encode(&none)), Ok(none));
    assert!(decode::<Lease>(b"\x16short").is_err());
    assert!(decode::<Lease>(&encode(&crate::rate_limit::Slot {
        owner: 1,
        tat: Tat(2),
        ticks_per_ns: 3
    }))
    .is_err());
}

std::thread_local! {
    static WRITER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs one ask against `etcd` to the end, as the host would.
fn ask_through(
    etcd: &FakeEtcd,
    b: &Bucket,
    owner: u64,
    ask: u64,
    reserve: u64,
    seen: Option<Seen>,
    now: Instant,
) -> Granted {
    let mut asking = Asking {
        key: b"k".to_vec(),
        owner,
        ask,
        cost: 1,
        reserve,
        calls: 0,
        writer: WRITER.with(|w| {
            w.set(w.get() + 1);
            w.get()
        }),
        in_doubt: false,
        expected: Expected::Absent,
        value: Vec::new(),
        grant: None,
    };
    let mut step = asking.start(b, seen, now);
    loop {
        match step {
            AskStep::Done(granted) => return granted,
            AskStep::Send => {
                asking.calls += 1;
                let body = etcd::swap(&asking.key, &asking.expected, &asking.value);
                let answer = etcd
                    .answer(&body)
                    .ok_or(AnswerError::NoAnswer)
                    .and_then(|(status, body)| etcd::swapped(status, &body));
                step = asking.answer(b, answer, now, TIMEOUT);
            }
        }
    }
}

#[test]
fn a_stale_view_costs_a_second_transaction_never_a_wrong_grant() {
    let etcd = FakeEtcd::default();
    let b = bucket(100, 1, Duration::from_secs(3600));
    let Granted::Tokens { seen: first, .. } = ask_through(&etcd, &b, 1, 30, 10, None, T0) else {
        panic!("no grant")
    };
    // Another Envoy takes 40 meanwhile.
    let Granted::Tokens { .. } = ask_through(&etcd, &b, 1, 40, 10, Some(first), T0) else {
        panic!("no grant")
    };
    let calls = etcd.calls.get();
    let Granted::Tokens { grant, .. } = ask_through(&etcd, &b, 1, 30, 10, Some(first), T0) else {
        panic!("no grant")
    };
    assert_eq!(grant.granted, 20, "100 - 70 - 10 held back");
    assert_eq!(etcd.calls.get() - calls, 2);
    let Granted::Empty { .. } = ask_through(&etcd, &b, 1, 30, 10, None, T0) else {
        panic!("granted past the reserve")
    };
}

#[test]
fn a_grant_whose_answer_was_lost_is_found_as_its_own() {
    let etcd = FakeEtcd::default();
    let b = bucket(100, 1, Duration::from_secs(3600));
    etcd.lose_answers.set(1);
    let granted = ask_through(&etcd, &b, 1, 30, 10, None, T0);
    assert!(matches!(granted, Granted::Tokens { grant, .. } if grant.granted == 30));
    assert_eq!(etcd.calls.get(), 2);
    let Granted::Tokens { grant, .. } = ask_through(&etcd, &b, 1, 100, 10, None, T0) else {
        panic!("no grant")
    };
    assert_eq!(grant.granted, 60, "the lost answer's 30 were taken once");
}

/// Three Envoys (each a lease) share one bucket in etcd. Requests arrive at each at its own
/// pace, for a simulated minute across many refills; every admission is checked against a
/// reference bucket of the same capacity and refill: none may be one it would refuse.
#[test]
fn a_fleet_of_leases_never_admits_what_one_bucket_would_refuse() {
    let etcd = FakeEtcd::default();
    let b = bucket(50, 100, Duration::from_secs(1)); // 100 a second, bursts of 50
    let chunk = 10;
    let owner = 42;
    let mut leases: [Option<Lease>; 3] = [None; 3];
    let mut admitted_at: Vec<Instant> = Vec::new();
    let mut refused = 0;
    // Envoy i sees a request every `pace[i]` µs: together about 2.4 times the refill.
    let pace = [700u64, 1_100, 2_300];
    let mut next = [0u64; 3];
    let end = 60_000_000u64;
    loop {
        let (i, t) = (0..3)
            .map(|i| (i, next[i]))
            .min_by_key(|(_, t)| *t)
            .unwrap_or((0, end));
        if t >= end {
            break;
        }
        // Each 5 s: 2 s of load, then 3 s when each Envoy sends once a second, keeping what
        // its lease holds while the bucket fills up again, then load again.
        let quiet = (2_000_000..5_000_000).contains(&(t % 5_000_000));
        next[i] = if quiet { t + 1_000_000 } else { t + pace[i] };
        let now = T0.saturating_add(Duration::from_micros(t));
        let (taking, written) = take(leases[i], owner, now, 1, chunk, TIMEOUT);
        if let Some(lease) = written {
            leases[i] = Some(lease);
        }
        match taking {
            Taking::Spent { .. } => admitted_at.push(now),
            Taking::Refused { .. } => refused += 1,
            Taking::Ask { ask, lease, seen } => {
                assert!(lease);
                let granted = ask_through(&etcd, &b, owner, ask, chunk, seen, now);
                let (_, settled) = settle(leases[i], owner, now, 1, &granted);
                leases[i] = settled;
                match granted {
                    Granted::Tokens { .. } => admitted_at.push(now),
                    Granted::Empty { .. } => refused += 1,
                    other => panic!("etcd failed: {other:?}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut reference = None;
    for (n, at) in admitted_at.iter().enumerate() {
        let check = b.check(reference, *at, 1);
        assert!(check.admitted, "admission {n} at {at:?} exceeds the bucket");
        reference = Some(check.tat);
    }
    let requests = admitted_at.len() + refused;
    assert!(
        refused > 0 && admitted_at.len() > 2_000,
        "{} admitted",
        admitted_at.len()
    );
    assert!(
        u64::from(etcd.calls.get()) * 4 < requests as u64,
        "{} transactions for {requests} requests",
        etcd.calls.get()
    );
}

/// The burst the issue names: a full bucket of N and no refill to speak of, three Envoys
/// each spending until refused. The fleet admits at most N, and at least N − chunk × 4.
#[test]
fn a_burst_over_three_envoys_admits_between_n_minus_the_chunks_and_n() {
    for chunk in [1u64, 7, 25] {
        let etcd = FakeEtcd::default();
        let n = 100;
        let b = bucket(n, 1, Duration::from_secs(3600));
        let mut leases: [Option<Lease>; 3] = [None; 3];
        let mut admitted = 0u64;
        for round in 0..400 {
            let i = round % 3;
            let (taking, written) = take(leases[i], 1, T0, 1, chunk, TIMEOUT);
            if let Some(lease) = written {
                leases[i] = Some(lease);
            }
            match taking {
                Taking::Spent { .. } => admitted += 1,
                Taking::Ask { ask, seen, .. } => {
                    let granted = ask_through(&etcd, &b, 1, ask, chunk, seen, T0);
                    leases[i] = settle(leases[i], 1, T0, 1, &granted).1;
                    admitted += u64::from(matches!(granted, Granted::Tokens { .. }));
                }
                _ => {}
            }
        }
        assert!(admitted <= n, "chunk {chunk}: {admitted}");
        assert!(admitted >= n - chunk * 4, "chunk {chunk}: {admitted}");
    }
}

/// Review finds: a grant whose answer comes after its validity admits nobody, and a token
/// given back never goes into a later grant.
#[test]
fn a_late_grant_admits_nobody_and_refunds_stay_with_their_grant() {
    let etcd = FakeEtcd::default();
    let b = bucket(100, 1, Duration::from_millis(1)); // a token a millisecond
    let mut asking = Asking {
        key: b"k".to_vec(),
        owner: 1,
        ask: 10,
        cost: 1,
        reserve: 10,
        calls: 1,
        writer: 99,
        in_doubt: false,
        expected: Expected::Absent,
        value: Vec::new(),
        grant: None,
    };
    assert_eq!(asking.start(&b, None, T0), AskStep::Send);
    let body = etcd::swap(&asking.key, &asking.expected, &asking.value);
    let answer = etcd
        .answer(&body)
        .ok_or(AnswerError::NoAnswer)
        .and_then(|(status, body)| etcd::swapped(status, &body));
    // The reserve of 10 refills in 10 ms: an answer 10 ms late is too late.
    assert_eq!(
        asking.answer(&b, answer, after(10), TIMEOUT),
        AskStep::Done(Granted::TooLate)
    );
    let lease = Lease {
        owner: 1,
        tokens: 5,
        grant: 7,
        valid_until: after(100),
        ..Lease::default()
    };
    assert_eq!(
        refund(Some(lease), 1, 6, T0, 1),
        None,
        "another grant's lease"
    );
    assert_eq!(refund(Some(lease), 1, 7, T0, 1).map(|l| l.tokens), Some(6));
}

#[test]
fn a_clock_step_back_voids_the_lease_and_what_it_remembers() {
    let owner = 7;
    let lease = Lease {
        owner,
        tokens: 9,
        valid_until: after(3_600_000),
        refused_until: Instant::default(),
        asking_until: after(3_600_000),
        stamp: after(3_600_000),
        ..Lease::default()
    };
    let (taking, _) = take(Some(lease), owner, T0, 1, 10, TIMEOUT);
    assert!(matches!(taking, Taking::Ask { .. }), "{taking:?}");
    let refused = Lease {
        refused_until: after(3_600_000),
        ..lease
    };
    let (taking, _) = take(Some(refused), owner, T0, 1, 10, TIMEOUT);
    assert!(
        matches!(taking, Taking::Ask { .. }),
        "a refusal does not last the step: {taking:?}"
    );
}
