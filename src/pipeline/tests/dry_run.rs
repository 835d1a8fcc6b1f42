//! Dry run (`shadow`) for every policy, and the decisions a stream carries: a dry-run policy
//! decides, counts and names its refusal, refuses nothing, and keeps its state as enforcing
//! would; what enforced policies see does not change.

use super::*;
use crate::circuit_breaker::Phase;
use crate::etcd::fake::FakeEtcd;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const HEADER: &str = r#""decision_header": "x-resilience-decision""#;

impl Proxy {
    /// Sends a request the upstream answers with `status`: what the client got (the upstream's
    /// status, or the local reply's), and every header the filter added.
    fn exchange(&self, request: RequestInfo, body: &[u8], status: u16) -> (u16, Headers) {
        let mut exchange = Exchange::default();
        match self.send(&mut exchange, request, body) {
            Step::Continue => {
                let added =
                    self.response_headers(&mut exchange, &Upstream::answering(status), false);
                exchange.on_response_body(&self.filter, b"done", true);
                self.finish(&mut exchange, answered(status));
                (status, added)
            }
            Step::Reply(reply) => {
                let added = reply
                    .headers
                    .iter()
                    .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                self.finish(&mut exchange, local(reply.status));
                (reply.status, added)
            }
            step => panic!("{step:?}"),
        }
    }
}

type Headers = Vec<(String, String)>;

fn decision(headers: &Headers) -> Option<&str> {
    let mut values = headers
        .iter()
        .filter(|(name, _)| name == "x-resilience-decision");
    let first = values.next().map(|(_, v)| v.as_str());
    assert_eq!(values.next(), None, "one decision header: {headers:?}");
    first
}

#[test]
fn a_shadow_breaker_opens_probes_and_closes_as_enforcing_would_and_refuses_nothing() {
    let proxy = Proxy::new(&config(&[
        HEADER,
        r#""circuit_breaker": {"breakers": [{"name": "b", "shadow": true, "scope": {"match": {}},
            "trip": {"consecutive_failures": 2}, "open": {"duration": "10s"},
            "half_open": {"max_probes": 1, "successes_to_close": 1}}]}"#,
    ]));
    for _ in 0..2 {
        let (status, headers) = proxy.exchange(post("/", &[]), b"", 500);
        assert_eq!((status, decision(&headers)), (500, None));
    }
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Open));
    // Open: every request goes on, and its failure is not the breaker's to judge (enforcing,
    // it would never have been sent), so the open period does not start over.
    for _ in 0..3 {
        let (status, headers) = proxy.exchange(post("/", &[]), b"", 500);
        assert_eq!(
            (status, decision(&headers)),
            (
                500,
                Some(r#"circuit_breaker;outcome=open;breaker="b";shadow"#)
            )
        );
    }
    assert_eq!(proxy.metric("circuit_breaker.b.shadow_rejected"), 3);
    assert_eq!(proxy.metric("circuit_breaker.b.rejected"), 0);
    assert_eq!(proxy.metric("circuit_breaker.b.transitions_to_open"), 1);
    assert!(proxy
        .logs()
        .iter()
        .any(|(_, line)| line == "shadow circuit breaker \"b\" would refuse POST /"));
    proxy.advance(10_000);
    let (_, headers) = proxy.exchange(post("/", &[]), b"", 200);
    assert_eq!(decision(&headers), None, "the probe");
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Closed));
    assert_eq!(proxy.metric("circuit_breaker.b.transitions_to_closed"), 1);
}

#[test]
fn a_shadow_pool_lets_through_what_it_would_shed_without_counting_it_in_flight() {
    let proxy = Proxy::new(&config(&[
        HEADER,
        r#""load_shedding": {"pools": [{"name": "p", "max_in_flight": 1, "shadow": true}], "shed_at": {"high": 1, "normal": 1}}"#,
        LIMIT_ONE,
    ]));
    let mut first = Exchange::default();
    assert_eq!(proxy.send(&mut first, post("/", &[]), b""), Step::Continue);
    let mut second = Exchange::default();
    let step = proxy.send(&mut second, post("/", &[]), b"");
    // The shadow pool lets it go on; the enforced rate limit then sees it as it would
    // without the pool, and refuses it: both decisions, in order.
    let Step::Reply(reply) = step else {
        panic!("{step:?}")
    };
    assert_eq!(reply.status, 429);
    assert_eq!(
        reply.header("x-resilience-decision"),
        Some(
            &br#"load_shedding;outcome=shed;pool="p";class=normal;shadow, rate_limit;outcome=limited;rule="one""#[..]
        )
    );
    assert_eq!(
        second.unpublished_decisions(),
        Some(
            r#"load_shedding;outcome=shed;pool="p";class=normal;shadow, rate_limit;outcome=limited;rule="one""#
        )
    );
    assert_eq!(second.unpublished_decisions(), None, "published once");
    assert_eq!(proxy.in_flight("p"), 1, "the passed request holds no slot");
    assert_eq!(proxy.metric("load_shedding.p.in_flight"), 1);
    assert_eq!(proxy.metric("load_shedding.p.shadow_shed.normal"), 1);
    assert_eq!(proxy.metric("load_shedding.p.shed.normal"), 0);
    proxy.finish(&mut second, local(429));
    proxy.finish(&mut first, answered(200));
    assert_eq!(proxy.in_flight("p"), 0);
    assert_eq!(proxy.metric("load_shedding.p.in_flight"), 0);
}

#[test]
fn shadow_idempotency_stores_responses_and_lets_every_would_be_answer_through() {
    let proxy = Proxy::new(&config(&[
        HEADER,
        r#""idempotency": {"required": true, "shadow": true}"#,
    ]));
    let (status, headers) = proxy.exchange(keyed("k"), b"{}", 201);
    assert_eq!((status, decision(&headers)), (201, None));
    let (status, headers) = proxy.exchange(keyed("k"), b"{}", 201);
    assert_eq!(
        (status, decision(&headers)),
        (201, Some("idempotency;outcome=replayed;shadow")),
        "executed again: the upstream answered"
    );
    let (status, headers) = proxy.exchange(keyed("k"), b"{\"other\": 1}", 201);
    assert_eq!(
        (status, decision(&headers)),
        (201, Some("idempotency;outcome=key-reused;shadow"))
    );
    let (status, headers) = proxy.exchange(post("/orders", &[]), b"{}", 201);
    assert_eq!(
        (status, decision(&headers)),
        (201, Some("idempotency;outcome=key-missing;shadow"))
    );
    // A duplicate while the first is still in flight.
    let mut first = Exchange::default();
    assert_eq!(proxy.send(&mut first, keyed("j"), b"{}"), Step::Continue);
    let (status, headers) = proxy.exchange(keyed("j"), b"{}", 201);
    assert_eq!(
        (status, decision(&headers)),
        (201, Some("idempotency;outcome=in-flight;shadow"))
    );
    proxy.finish(&mut first, answered(201));
    assert_eq!(proxy.metric("idempotency.shadow_passed"), 4);
    assert_eq!(proxy.metric("idempotency.claims"), 2, "k and j");
    assert_eq!(proxy.metric("idempotency.replays"), 1, "would-be replays");
}

#[test]
fn a_shadow_body_wait_that_times_out_lets_the_request_go_on() {
    let proxy = Proxy::new(&config(&[
        r#""idempotency": {"shadow": true, "body_timeout": "1s"}"#,
    ]));
    let mut exchange = Exchange::default();
    assert_eq!(proxy.headers(&mut exchange, keyed("k"), false), Step::Pause);
    proxy.advance(1_000);
    let step = proxy.run(&proxy.store, |filter, env| {
        exchange.on_tick(filter, env, |_| Vec::new())
    });
    assert_eq!(step, Some(Step::Continue));
    assert_eq!(
        exchange.unpublished_decisions(),
        Some("idempotency;outcome=body-timeout;shadow")
    );
    assert_eq!(proxy.metric("idempotency.shadow_passed"), 1);
}

#[test]
fn a_shadow_rule_and_shadow_policies_refuse_nothing_when_shared_data_fails_under_deny() {
    for section in [
        r#""rate_limit": {"rules": [{"name": "r", "shadow": true, "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
        r#""load_shedding": {"pools": [{"name": "p", "max_in_flight": 1, "shadow": true}], "shed_at": {"high": 1, "normal": 1}}"#,
        r#""circuit_breaker": {"breakers": [{"name": "b", "shadow": true, "scope": {"match": {}}, "trip": {"consecutive_failures": 1}}]}"#,
    ] {
        let proxy = Proxy::new(&config(&[
            r#""shared_data": {"on_error": "deny"}"#,
            section,
        ]));
        let mut exchange = Exchange::default();
        let step = proxy.run(&BrokenStore, |filter, env| {
            exchange.on_request_headers(filter, env, post("/", &[]), true)
        });
        assert_eq!(step, Step::Continue, "{section}");
        assert_eq!(proxy.metric("shared_data.errors"), 1, "{section}");
    }
}

#[test]
fn enforced_refusals_name_their_policy_and_rule_in_the_reply_and_the_filter_state() {
    let proxy = Proxy::new(&config(&[HEADER, LIMIT_ONE]));
    let (_, headers) = proxy.exchange(post("/", &[]), b"", 200);
    assert_eq!(decision(&headers), None, "nothing decided: no header");
    let (status, headers) = proxy.exchange(post("/", &[]), b"", 200);
    assert_eq!(
        (status, decision(&headers)),
        (429, Some(r#"rate_limit;outcome=limited;rule="one""#))
    );

    // Without a header configured, the filter state still carries it.
    let proxy = Proxy::new(&config(&[IDEMPOTENCY]));
    let mut exchange = Exchange::default();
    let Step::Reply(reply) = proxy.send(&mut exchange, post("/orders", &[]), b"{}") else {
        panic!("a missing key passed")
    };
    assert_eq!(reply.header("x-resilience-decision"), None);
    assert_eq!(
        exchange.unpublished_decisions(),
        Some("idempotency;outcome=key-missing")
    );
    assert_eq!(proxy.filter.decision_state(), "resilience.t.decision");
}

#[test]
fn the_decision_header_is_refused_where_it_would_collide() {
    for (name, extra) in [
        ("retry-after", ""),
        ("RateLimit", ""),
        ("idempotent-replayed", ""),
        ("content-type", ""),
        ("grpc-status", ""),
        (
            "x-why",
            r#", "load_shedding": {"pools": [{"name": "p", "max_in_flight": 1}], "response": {"headers": {"x-why": "busy"}}}"#,
        ),
        ("idempotency-key", r#", "idempotency": {}"#),
        (
            "x-stored",
            r#", "idempotency": {"stored_headers": ["x-stored"]}"#,
        ),
        ("bad header", ""),
        ("transfer-encoding", ""),
        ("connection", ""),
        ("content-encoding", ""),
        ("server", ""),
        ("date", ""),
        ("location", ""),
        ("set-cookie", ""),
        ("x-envoy-overloaded", ""),
    ] {
        let json = format!(r#"{{"decision_header": "{name}"{extra}}}"#);
        let err = Config::parse(json.as_bytes()).err();
        assert_eq!(
            err.map(|e| e.path),
            Some("decision_header".to_owned()),
            "{json}"
        );
    }
    let config = Config::parse(br#"{"decision_header": "X-Resilience-Decision"}"#);
    assert_eq!(
        config.map(|c| c.decision_header),
        Ok(Some("x-resilience-decision".to_owned()))
    );
}

/// Global rules make the rate-limit stage wait for etcd, or for another worker's grant, and
/// decide again at a tick: a shadow refusal decided there belongs to its own stream, even
/// when the stream then waits on a later rule, and even when the host ticks every waiting
/// stream in one call.
#[test]
fn a_shadow_refusal_decided_at_a_tick_stays_with_its_stream() {
    let etcd = Rc::new(FakeEtcd::default());
    let rules = r#""rate_limit": {"rules": [
        {"name": "g1", "capacity": 100, "refill": {"tokens": 1, "interval": "1h"}, "global": {"chunk": 10}},
        {"name": "s", "shadow": true, "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}},
        {"name": "g2", "match": {"path_prefix": "/g2"}, "capacity": 100, "refill": {"tokens": 1, "interval": "1h"}, "global": {"chunk": 10}}],
        "store": {"etcd": {"cluster": "etcd", "timeout": "500ms"}, "on_store_error": "deny"}}"#;
    let proxy = Proxy::in_fleet(&config(&[HEADER, rules]), 1, &etcd);
    let answer = |exchange: &mut Exchange, call: &crate::etcd::StoreCall| {
        let answer = etcd.answer(&call.body);
        proxy.run(&proxy.store, |filter, env| {
            let answer = answer
                .as_ref()
                .map(|(status, body)| (*status, body.as_slice()))
                .ok_or(crate::etcd::AnswerError::NoAnswer);
            exchange.on_store_answer(filter, env, answer, |_| Vec::new())
        })
    };
    let mut first = Exchange::default();
    let Step::Call(grant) = proxy.headers(&mut first, post("/g2", &[]), true) else {
        panic!("the first request asks etcd for g1")
    };
    let mut second = Exchange::default();
    assert_eq!(
        proxy.headers(&mut second, post("/g2", &[]), true),
        Step::Pause
    );
    let mut third = Exchange::default();
    assert_eq!(
        proxy.headers(&mut third, post("/x", &[]), true),
        Step::Pause
    );
    // The first takes g1, then the shadow rule's only token, and asks for g2.
    let Step::Call(grant_2) = answer(&mut first, &grant) else {
        panic!("the first request asks etcd for g2")
    };
    // One tick for every waiting stream, in one call, as the host makes it: the second
    // passes g1, is refused by the shadow rule, and waits for g2; the third passes g1, is
    // refused by the shadow rule, and goes on.
    let (second_step, third_step) = proxy.run(&proxy.store, |filter, env| {
        (
            second.on_tick(filter, env, |_| Vec::new()),
            third.on_tick(filter, env, |_| Vec::new()),
        )
    });
    assert_eq!((second_step, third_step), (None, Some(Step::Continue)));
    let refused = Some(r#"rate_limit;outcome=limited;rule="s";shadow"#);
    assert_eq!(third.unpublished_decisions(), refused, "its own, once");
    assert_eq!(second.unpublished_decisions(), refused);
    assert_eq!(answer(&mut first, &grant_2), Step::Continue);
    let step = proxy.run(&proxy.store, |filter, env| {
        second.on_tick(filter, env, |_| Vec::new())
    });
    assert_eq!(step, Some(Step::Continue));
    assert_eq!(proxy.metric("rate_limit.s.shadow_limited"), 2);
}

#[test]
fn the_decision_header_is_the_filters_alone_on_every_response_it_passes() {
    let proxy = Proxy::new(&config(&[HEADER, LIMIT_ONE]));
    let spoofed = Upstream {
        status: 200,
        headers: vec![(
            "x-resilience-decision".to_owned(),
            b"circuit_breaker;outcome=open".to_vec(),
        )],
    };
    let mut exchange = Exchange::default();
    assert_eq!(
        proxy.send(&mut exchange, post("/", &[]), b""),
        Step::Continue
    );
    let edits = exchange.on_response_headers(&proxy.filter, &spoofed, false);
    assert_eq!(
        edits.decision,
        Some(("x-resilience-decision", None)),
        "no decision: the upstream's value is removed"
    );
    let mut exchange = Exchange::default();
    let Step::Reply(_) = proxy.send(&mut exchange, post("/", &[]), b"") else {
        panic!("the bucket had one token")
    };
    let edits = exchange.on_response_headers(&proxy.filter, &Local(429), true);
    assert_eq!(
        edits.decision, None,
        "its own reply carries the header already"
    );
}
