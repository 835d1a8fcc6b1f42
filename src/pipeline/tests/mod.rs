//! The whole pipeline, natively: every pair of policies, what a later refusal gives back,
//! aborts, body waits, response capture, and shared data failing under `allow` and `deny`.

use super::*;
use crate::etcd::fake::FakeEtcd;
use crate::grpc::GrpcStatus;
use crate::idempotency::FleetWrites;
use crate::store::{self as state, MemoryStore};
use crate::testing::{at, counter_random, record, BrokenStore, T0};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// One Envoy worker running one filter instance, with a clock the test moves, and the
/// etcd of its fleet where it has one.
struct Proxy {
    filter: Filter,
    store: MemoryStore,
    now: Cell<Instant>,
    metrics: RefCell<HashMap<String, i64>>,
    logs: RefCell<Vec<(Level, String)>>,
    etcd: Option<Rc<FakeEtcd>>,
    /// Fleet writes of finished streams, not yet landed.
    writes: RefCell<FleetWrites>,
}

impl Proxy {
    fn new(json: &str) -> Proxy {
        Proxy::with(json, Seed([1, 2]), None)
    }

    /// One Envoy of a fleet sharing `etcd`; each Envoy has its own secret seed.
    fn in_fleet(json: &str, seed: u64, etcd: &Rc<FakeEtcd>) -> Proxy {
        Proxy::with(json, Seed([seed, seed]), Some(Rc::clone(etcd)))
    }

    fn with(json: &str, seed: Seed, etcd: Option<Rc<FakeEtcd>>) -> Proxy {
        let store = MemoryStore::default();
        let mut telemetry = Telemetry::default();
        let filter = match Filter::configure("t", json.as_bytes(), &store, seed, T0, &mut telemetry)
        {
            Ok(filter) => filter,
            Err(err) => panic!("{err}"),
        };
        let proxy = Proxy {
            filter,
            store,
            now: Cell::new(T0),
            metrics: RefCell::default(),
            logs: RefCell::default(),
            etcd,
            writes: RefCell::default(),
        };
        record(
            proxy.filter.catalog(),
            &mut telemetry,
            &proxy.metrics,
            &proxy.logs,
        );
        proxy
    }

    fn advance(&self, ms: u64) {
        self.now
            .set(self.now.get().saturating_add(Duration::from_millis(ms)));
    }

    fn run<S: Store, R>(&self, store: &S, call: impl FnOnce(&Filter, &mut Env<'_, S>) -> R) -> R {
        let mut telemetry = Telemetry::default();
        let mut env = Env {
            store,
            instance: &self.filter.instance,
            now: self.now.get(),
            random: counter_random,
            telemetry: &mut telemetry,
        };
        let result = call(&self.filter, &mut env);
        record(
            self.filter.catalog(),
            &mut telemetry,
            &self.metrics,
            &self.logs,
        );
        result
    }

    fn headers(&self, exchange: &mut Exchange, request: RequestInfo, end_of_stream: bool) -> Step {
        self.run(&self.store, |filter, env| {
            exchange.on_request_headers(filter, env, request, end_of_stream)
        })
    }

    /// Sends the request with all of `body` in one chunk; calls to etcd are answered.
    fn send(&self, exchange: &mut Exchange, request: RequestInfo, body: &[u8]) -> Step {
        let step = match self.headers(exchange, request, body.is_empty()) {
            Step::Pause => self.body(exchange, body, true),
            step => step,
        };
        self.answer_calls(exchange, step)
    }

    /// Answers every call to etcd the exchange makes, as the host would.
    fn answer_calls(&self, exchange: &mut Exchange, mut step: Step) -> Step {
        while let Step::Call(call) = step {
            let answer = self.etcd.as_ref().and_then(|etcd| etcd.answer(&call.body));
            step = self.run(&self.store, |filter, env| {
                let answer = answer
                    .as_ref()
                    .map(|(status, body)| (*status, body.as_slice()))
                    .ok_or(crate::etcd::AnswerError::NoAnswer);
                exchange.on_store_answer(filter, env, answer, |_| Vec::new())
            });
        }
        step
    }

    /// Sends each fleet write that is due, as a host tick does.
    fn flush_writes(&self) {
        let due = self
            .writes
            .borrow_mut()
            .take_due(self.now.get(), crate::idempotency::MAX_WRITES_IN_FLIGHT);
        for mut write in due {
            let answer = self
                .etcd
                .as_ref()
                .and_then(|etcd| etcd.answer(&write.call().body));
            self.run(&self.store, |filter, env| {
                let answer = answer
                    .as_ref()
                    .map(|(status, body)| (*status, body.as_slice()));
                if filter.on_fleet_write_answer(env, &mut write, answer) {
                    filter.queue_fleet_write(env, &mut self.writes.borrow_mut(), write);
                }
            });
        }
    }

    fn body(&self, exchange: &mut Exchange, body: &[u8], end_of_stream: bool) -> Step {
        self.run(&self.store, |filter, env| {
            exchange.on_request_body(filter, env, body.len(), end_of_stream, |max| {
                body[..body.len().min(max)].to_vec()
            })
        })
    }

    fn response_headers(
        &self,
        exchange: &mut Exchange,
        response: &impl ResponseView,
        end_of_stream: bool,
    ) -> Vec<(String, String)> {
        let edits = exchange.on_response_headers(&self.filter, response, end_of_stream);
        let added = edits
            .added
            .iter()
            .cloned()
            .chain(
                edits
                    .decision
                    .and_then(|(name, value)| Some((name.to_owned(), value?.to_owned()))),
            )
            .collect();
        if exchange.judged_at_start() {
            self.run(&self.store, |filter, env| {
                exchange.judge_start(filter, env, response, end_of_stream);
            });
        }
        added
    }

    fn respond(&self, exchange: &mut Exchange, response: &Upstream, body: &[u8]) {
        self.response_headers(exchange, response, false);
        exchange.on_response_body(&self.filter, body, true);
    }

    fn finish(&self, exchange: &mut Exchange, completion: Completion) {
        self.run(&self.store, |filter, env| {
            if let Some(write) = exchange.finish(filter, env, || completion) {
                filter.queue_fleet_write(env, &mut self.writes.borrow_mut(), write);
            }
        });
        self.flush_writes();
    }

    /// A whole request the upstream answers with `status`.
    fn call(&self, request: RequestInfo, body: &[u8], status: u16) -> Result<(), Reply> {
        let mut exchange = Exchange::default();
        let step = self.send(&mut exchange, request, body);
        let outcome = match step {
            Step::Continue => {
                self.respond(&mut exchange, &Upstream::answering(status), b"done");
                self.finish(&mut exchange, answered(status));
                Ok(())
            }
            Step::Reply(reply) => {
                self.response_headers(&mut exchange, &Local(reply.status), true);
                self.finish(&mut exchange, local(reply.status));
                Err(reply)
            }
            Step::Pause | Step::Call(_) => panic!("paused with the whole body in"),
        };
        outcome
    }

    fn metric(&self, name: &str) -> i64 {
        self.metrics
            .borrow()
            .get(&format!("resilience.t.{name}"))
            .copied()
            .unwrap_or(0)
    }

    fn in_flight(&self, pool: &str) -> u32 {
        state::read::<crate::load_shedding::PoolState>(
            &self.store,
            &format!("resilience/t/ls/{pool}"),
        )
        .ok()
        .flatten()
        .map_or(0, |s| s.in_flight())
    }

    fn breaker_phase(&self, name: &str) -> Option<crate::circuit_breaker::Phase> {
        state::read::<crate::circuit_breaker::BreakerState>(
            &self.store,
            &format!("resilience/t/cb/{name}"),
        )
        .ok()
        .flatten()
        .map(|s| s.phase)
    }
}

/// The upstream's response as the host would show it.
struct Upstream {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
}

impl Upstream {
    fn answering(status: u16) -> Upstream {
        Upstream {
            status,
            headers: vec![("content-type".to_owned(), b"application/json".to_vec())],
        }
    }
}

impl ResponseView for Upstream {
    fn status(&self) -> Option<u16> {
        Some(self.status)
    }
    fn via_upstream(&self) -> bool {
        true
    }
    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        self.headers.clone()
    }
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.clone())
    }
}

/// A local reply passing back through the filter (this one's, or another filter's).
struct Local(u16);

impl ResponseView for Local {
    fn status(&self) -> Option<u16> {
        Some(self.0)
    }
    fn via_upstream(&self) -> bool {
        false
    }
    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        Vec::new()
    }
    fn header(&self, _name: &str) -> Option<Vec<u8>> {
        None
    }
}

fn answered(status: u16) -> Completion {
    Completion {
        status: Some(status),
        via_upstream: true,
        upstream_host: true,
        ..Completion::default()
    }
}

fn local(status: u16) -> Completion {
    Completion {
        status: Some(status),
        ..Completion::default()
    }
}

fn post(path: &str, headers: &[(&str, &str)]) -> RequestInfo {
    RequestInfo {
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        peer: "192.0.2.1".parse().ok(),
        ..RequestInfo::new(b"POST", path.as_bytes())
    }
}

fn status(result: &Result<(), Reply>) -> u16 {
    result.as_ref().map_or_else(|reply| reply.status, |()| 200)
}

const POOL: &str = r#""load_shedding": {"pools": [{"name": "all", "max_in_flight": 100}], "shed_at": {"high": 1, "normal": 1}}"#;
const LIMIT_ONE: &str = r#""rate_limit": {"rules": [{"name": "one", "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}"#;
const IDEMPOTENCY: &str = r#""idempotency": {"required": true}"#;
const BREAKER: &str = r#""circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}}, "trip": {"consecutive_failures": 1}, "open": {"duration": "10s"}}]}"#;

fn config(sections: &[&str]) -> String {
    format!("{{{}}}", sections.join(", "))
}

fn keyed(key: &str) -> RequestInfo {
    post("/orders", &[("idempotency-key", key)])
}

#[test]
fn a_rate_limit_refusal_gives_back_the_load_shedding_slot() {
    let proxy = Proxy::new(&config(&[POOL, LIMIT_ONE]));
    assert_eq!(status(&proxy.call(post("/", &[]), b"", 200)), 200);
    let mut exchange = Exchange::default();
    let Step::Reply(reply) = proxy.send(&mut exchange, post("/", &[]), b"") else {
        panic!("the second request passed a one-token bucket")
    };
    assert_eq!(reply.status, 429);
    assert_eq!(proxy.in_flight("all"), 1, "held until the stream ends");
    proxy.finish(&mut exchange, local(429));
    assert_eq!(proxy.in_flight("all"), 0);
    assert_eq!(proxy.metric("load_shedding.all.in_flight"), 0);
}

#[test]
fn an_idempotency_refusal_gives_back_the_slot_and_spends_the_token() {
    let proxy = Proxy::new(&config(&[
        POOL,
        r#""rate_limit": {"rules": [{"name": "r", "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
        IDEMPOTENCY,
    ]));
    assert_eq!(
        status(&proxy.call(post("/orders", &[]), b"{}", 200)),
        400,
        "key required"
    );
    assert_eq!(proxy.in_flight("all"), 0);
    assert_eq!(status(&proxy.call(keyed("k"), b"{}", 201)), 200);
    let replay = proxy.call(keyed("k"), b"{}", 201);
    assert_eq!(
        replay
            .as_ref()
            .map_err(|r| (r.status, r.header("idempotent-replayed"))),
        Err((201, Some(&b"true"[..])))
    );
    assert_eq!(proxy.in_flight("all"), 0);
    assert_eq!(
        status(&proxy.call(keyed("k2"), b"{}", 201)),
        429,
        "each of the three requests spent a token, replays and refusals included"
    );
}

#[test]
fn a_breaker_refusal_gives_back_the_slot_and_frees_the_idempotency_claim() {
    let proxy = Proxy::new(&config(&[POOL, IDEMPOTENCY, BREAKER]));
    assert_eq!(
        status(&proxy.call(post("/fail", &[("idempotency-key", "x")]), b"", 500)),
        200
    );
    assert_eq!(
        proxy.breaker_phase("b"),
        Some(crate::circuit_breaker::Phase::Open)
    );
    let refused = proxy.call(keyed("k"), b"{}", 200);
    assert_eq!(
        refused.as_ref().map_err(|r| r.details),
        Err("resilience_circuit_open")
    );
    assert_eq!(proxy.in_flight("all"), 0);
    assert_eq!(proxy.metric("idempotency.claims"), 2);
    assert_eq!(
        proxy.metric("idempotency.released"),
        2,
        "the 500 and the refused request"
    );
    proxy.advance(10_000);
    assert_eq!(
        status(&proxy.call(keyed("k"), b"{}", 201)),
        200,
        "the key was free: the retry executes (and closes the breaker)"
    );
    assert_eq!(
        status(&proxy.call(keyed("k"), b"{}", 201)),
        201,
        "then replays"
    );
}

#[test]
fn a_load_shedding_refusal_comes_first_and_takes_nothing_else() {
    let proxy = Proxy::new(&config(&[
        r#""load_shedding": {"pools": [{"name": "all", "max_in_flight": 1}], "shed_at": {"high": 1, "normal": 1}}"#,
        LIMIT_ONE,
        IDEMPOTENCY,
        BREAKER,
    ]));
    let mut first = Exchange::default();
    assert_eq!(proxy.send(&mut first, keyed("a"), b"{}"), Step::Continue);
    let shed = proxy.call(keyed("b"), b"{}", 200);
    assert_eq!(
        shed.as_ref().map_err(|r| r.details),
        Err("resilience_load_shed")
    );
    assert_eq!(
        proxy.metric("rate_limit.one.allowed"),
        1,
        "the shed request took no token"
    );
    assert_eq!(proxy.metric("idempotency.claims"), 1);
    proxy.respond(&mut first, &Upstream::answering(201), b"{}");
    proxy.finish(&mut first, answered(201));
    assert_eq!(proxy.in_flight("all"), 0);
}

/// A request every stage admitted, then abandoned by its client while upstream: its slot and
/// probe permit come back, nothing counts as an upstream outcome, and its idempotency claim
/// stays until the lease runs out, since the upstream may still be executing it.
#[test]
fn an_abort_gives_everything_back_but_the_claim_on_a_request_the_upstream_may_have() {
    let proxy = Proxy::new(&config(&[
        POOL,
        r#""rate_limit": {"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
        r#""idempotency": {"required": true, "lease": "30s"}"#,
        BREAKER,
    ]));
    let mut exchange = Exchange::default();
    assert_eq!(proxy.send(&mut exchange, keyed("k"), b"{}"), Step::Continue);
    assert!(exchange.holds_loans());
    assert_eq!(proxy.in_flight("all"), 1);
    let abandoned = Completion {
        status: None,
        flags: 0x4000,
        upstream_host: true,
        ..Completion::default()
    };
    proxy.finish(&mut exchange, abandoned);
    assert_eq!(proxy.in_flight("all"), 0);
    assert_eq!(proxy.metric("idempotency.unanswered"), 1);
    assert_ne!(
        proxy.breaker_phase("b"),
        Some(crate::circuit_breaker::Phase::Open)
    );
    assert_eq!(
        status(&proxy.call(keyed("k"), b"{}", 201)),
        409,
        "still in flight"
    );
    assert_eq!(
        proxy.metric("idempotency.conflicts"),
        1,
        "the 409, and only it (issue 16)"
    );
    assert_eq!(proxy.metric("idempotency.replays"), 0);
    proxy.advance(30_000);
    assert_eq!(
        status(&proxy.call(keyed("k"), b"{}", 201)),
        200,
        "the lease ran out"
    );
}

/// A request that never reached the upstream (the connection failed) frees its key at once.
#[test]
fn a_claim_on_a_request_that_never_reached_the_upstream_is_freed() {
    let proxy = Proxy::new(&config(&[IDEMPOTENCY]));
    let mut exchange = Exchange::default();
    assert_eq!(proxy.send(&mut exchange, keyed("k"), b"{}"), Step::Continue);
    proxy.response_headers(&mut exchange, &Local(503), true);
    let connect_failure = Completion {
        flags: 0x20,
        upstream_host: true,
        ..local(503)
    };
    proxy.finish(&mut exchange, connect_failure);
    assert_eq!(proxy.metric("idempotency.released"), 1);
    assert_eq!(
        status(&proxy.call(keyed("k"), b"{}", 201)),
        200,
        "the retry executes"
    );
}

/// Issue 15, defect 4: another filter's local reply (here a 503 from a chained instance)
/// passes back through this one; it is not the upstream's answer.
#[test]
fn another_filters_refusals_never_open_the_breaker() {
    let proxy = Proxy::new(&config(&[BREAKER]));
    for _ in 0..10 {
        let mut exchange = Exchange::default();
        assert_eq!(
            proxy.send(&mut exchange, post("/", &[]), b""),
            Step::Continue
        );
        proxy.response_headers(&mut exchange, &Local(503), true);
        proxy.finish(&mut exchange, local(503));
    }
    assert_ne!(
        proxy.breaker_phase("b"),
        Some(crate::circuit_breaker::Phase::Open)
    );
    assert_eq!(
        status(&proxy.call(post("/", &[]), b"", 503)),
        200,
        "the upstream's own 503..."
    );
    assert_eq!(
        proxy.breaker_phase("b"),
        Some(crate::circuit_breaker::Phase::Open),
        "...counts"
    );
}

/// A later stage's refusal of a claimed request, or another filter's 429, is not a response
/// to store: the key is freed and a retry executes.
#[test]
fn a_local_reply_after_the_claim_is_never_replayed() {
    let proxy = Proxy::new(&config(&[IDEMPOTENCY]));
    let mut exchange = Exchange::default();
    assert_eq!(proxy.send(&mut exchange, keyed("k"), b"{}"), Step::Continue);
    proxy.response_headers(&mut exchange, &Local(429), false);
    exchange.on_response_body(&proxy.filter, b"slow down", true);
    proxy.finish(&mut exchange, local(429));
    assert_eq!(
        status(&proxy.call(keyed("k"), b"{}", 201)),
        200,
        "executed, not a replayed 429"
    );
}

#[test]
fn a_response_over_max_response_bytes_is_stored_as_unreplayable() {
    let proxy = Proxy::new(r#"{"idempotency": {"max_response_bytes": 100}}"#);
    let mut exchange = Exchange::default();
    assert_eq!(proxy.send(&mut exchange, keyed("k"), b"{}"), Step::Continue);
    proxy.response_headers(&mut exchange, &Upstream::answering(201), false);
    exchange.on_response_body(&proxy.filter, &[b'x'; 60], false);
    exchange.on_response_body(&proxy.filter, &[b'x'; 60], true);
    proxy.finish(&mut exchange, answered(201));
    let again = proxy.call(keyed("k"), b"{}", 201);
    let Err(reply) = again else {
        panic!("executed twice")
    };
    assert_eq!(reply.status, 409);
    assert!(String::from_utf8_lossy(&reply.body).contains("idempotency:not-replayable"));
}

/// Issue 15, defect 2: a request that ends in trailers is decided when its trailers arrive,
/// and a duplicate of it is caught like any other.
#[test]
fn a_request_ending_in_trailers_is_decided_at_its_trailers() {
    let proxy = Proxy::new(&config(&[IDEMPOTENCY]));
    for attempt in 0..2 {
        let mut exchange = Exchange::default();
        assert_eq!(proxy.headers(&mut exchange, keyed("k"), false), Step::Pause);
        assert_eq!(
            proxy.body(&mut exchange, b"{\"amount\"", false),
            Step::Pause
        );
        assert_eq!(
            proxy.body(&mut exchange, b"{\"amount\": 1}", false),
            Step::Pause
        );
        let step = proxy.run(&proxy.store, |filter, env| {
            exchange.on_request_trailers(filter, env, |max| {
                b"{\"amount\": 1}"[..max.min(13)].to_vec()
            })
        });
        if attempt == 0 {
            assert_eq!(step, Step::Continue);
            proxy.response_headers(&mut exchange, &Upstream::answering(201), false);
            exchange.on_response_body(&proxy.filter, b"created", false);
            exchange.on_response_trailers();
            proxy.finish(&mut exchange, answered(201));
        } else {
            let Step::Reply(reply) = step else {
                panic!("{step:?}")
            };
            assert_eq!(
                (reply.status, reply.body.as_slice()),
                (201, &b"created"[..])
            );
        }
    }
    assert_eq!(proxy.metric("idempotency.claims"), 1);
    assert_eq!(proxy.metric("idempotency.replays"), 1);
}

/// Issue 15, defect 7: a body that is slow to arrive is waited for, never forwarded
/// undecided; one that does not arrive within `body_timeout` gets 408.
#[test]
fn a_slow_body_is_waited_for_and_a_stalled_one_gets_408() {
    let proxy = Proxy::new(&config(&[POOL, r#""idempotency": {"body_timeout": "2s"}"#]));
    assert_eq!(status(&proxy.call(keyed("k"), b"{}", 201)), 200);

    let mut slow = Exchange::default();
    assert_eq!(proxy.headers(&mut slow, keyed("k"), false), Step::Pause);
    proxy.advance(1_500);
    assert_eq!(
        proxy.run(&proxy.store, |f, env| slow.on_tick(f, env, |_| Vec::new())),
        None
    );
    let Step::Reply(replay) = proxy.body(&mut slow, b"{}", true) else {
        panic!("a duplicate whose body took 1.5 s was not answered")
    };
    assert_eq!(replay.status, 201);
    proxy.finish(&mut slow, local(201));

    let mut stalled = Exchange::default();
    assert_eq!(
        proxy.headers(&mut stalled, keyed("other"), false),
        Step::Pause
    );
    assert_eq!(proxy.body(&mut stalled, b"{", false), Step::Pause);
    proxy.advance(1_999);
    assert_eq!(
        proxy.run(&proxy.store, |f, env| stalled.on_tick(
            f,
            env,
            |_| Vec::new()
        )),
        None
    );
    proxy.advance(1);
    let timed_out = proxy.run(&proxy.store, |f, env| {
        stalled.on_tick(f, env, |_| Vec::new())
    });
    let Some(Step::Reply(reply)) = timed_out else {
        panic!("no 408 at the deadline")
    };
    assert_eq!(
        (reply.status, reply.details),
        (408, "resilience_idempotency")
    );
    assert!(String::from_utf8_lossy(&reply.body).contains("idempotency:body-timeout"));
    assert_eq!(stalled.body_deadline(), None);
    assert_eq!(
        proxy.body(&mut stalled, b"}", true),
        Step::Continue,
        "answered already: nothing more"
    );
    proxy.finish(&mut stalled, local(408));
    assert_eq!(proxy.in_flight("all"), 0);
    assert_eq!(proxy.metric("idempotency.body_timeouts"), 1);
    assert!(
        proxy
            .logs()
            .iter()
            .all(|(_, line)| !line.contains("allow_on_headers_stop_iteration")),
        "bodies reached the filter: the setting is right, and the log does not say otherwise"
    );
}

#[test]
fn without_any_body_reaching_the_filter_the_timeout_names_the_setting_once() {
    let proxy = Proxy::new(r#"{"idempotency": {"body_timeout": "1s"}}"#);
    for key in ["a", "b"] {
        let mut exchange = Exchange::default();
        assert_eq!(proxy.headers(&mut exchange, keyed(key), false), Step::Pause);
        proxy.advance(1_000);
        assert!(proxy
            .run(&proxy.store, |f, env| exchange
                .on_tick(f, env, |_| Vec::new()))
            .is_some());
    }
    let hints = proxy
        .logs()
        .iter()
        .filter(|(level, line)| {
            *level == Level::Error && line.contains("allow_on_headers_stop_iteration: true")
        })
        .count();
    assert_eq!(hints, 1);
}

#[test]
fn a_body_over_the_limit_is_refused_before_it_is_read() {
    let proxy = Proxy::new(r#"{"idempotency": {"max_body_bytes": 4}}"#);
    let mut exchange = Exchange::default();
    assert_eq!(proxy.headers(&mut exchange, keyed("k"), false), Step::Pause);
    let step = proxy.run(&proxy.store, |filter, env| {
        exchange.on_request_body(filter, env, 5, false, |_| {
            panic!("read a body over the limit")
        })
    });
    assert!(matches!(step, Step::Reply(Reply { status: 413, .. })));
}

impl Proxy {
    fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }
}

/// `shared_data.on_error` for every policy: `allow` lets the request through unprotected,
/// `deny` refuses it with 503.
#[test]
fn shared_data_failures_follow_on_error_for_every_policy() {
    let sections = [
        ("load shedding", POOL),
        ("rate limit", LIMIT_ONE),
        ("idempotency", IDEMPOTENCY),
        ("circuit breaker", BREAKER),
    ];
    for (policy, section) in sections {
        for on_error in ["allow", "deny"] {
            let json = config(&[
                &format!(r#""shared_data": {{"on_error": "{on_error}"}}"#),
                section,
            ]);
            let proxy = Proxy::new(&json);
            let mut exchange = Exchange::default();
            let step = proxy.run(&BrokenStore, |filter, env| {
                exchange.on_request_headers(filter, env, keyed("k"), true)
            });
            match (on_error, step) {
                ("allow", Step::Continue) => {}
                ("deny", Step::Reply(reply)) => {
                    assert_eq!(reply.status, 503, "{policy}");
                    let problem: serde_json::Value =
                        serde_json::from_slice(&reply.body).unwrap_or_default();
                    assert_eq!(
                        (problem["type"].as_str(), problem["detail"].as_str()),
                        (
                            Some("urn:envoy-resilience:state-unavailable"),
                            Some(format!("{policy} state unavailable").as_str())
                        ),
                        "{policy}"
                    );
                }
                (_, step) => panic!("{policy}, {on_error}: {step:?}"),
            }
            assert_eq!(
                proxy.metric("shared_data.errors"),
                1,
                "{policy}, {on_error}"
            );
            proxy.run(&BrokenStore, |filter, env| {
                exchange.finish(filter, env, || answered(200))
            });
        }
    }
}

/// The host reads how a stream ended (three hostcalls) only for the policies that judge it: a
/// pool that only counts gives its slot back without them; an adaptive pool, a breaker in
/// scope and an idempotency claim need them.
#[test]
fn only_streams_whose_outcome_is_judged_read_it() {
    let judged = |json: &str, request: RequestInfo| {
        let proxy = Proxy::new(json);
        let mut exchange = Exchange::default();
        assert_eq!(proxy.send(&mut exchange, request, b"{}"), Step::Continue);
        exchange.judges_outcome(&proxy.filter)
    };
    let pool = r#"{"load_shedding": {"pools": [{"name": "p", "max_in_flight": 9}]}}"#;
    assert!(!judged(pool, post("/", &[])));
    let adaptive = r#"{"load_shedding": {"pools": [{"name": "p", "max_in_flight": 9, "adaptive": {"min_limit": 2}}]}}"#;
    assert!(judged(adaptive, post("/", &[])));
    let breaker = r#"{"circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {"path_prefix": "/api"}}, "trip": {"consecutive_failures": 1}}]}}"#;
    assert!(judged(breaker, post("/api", &[])));
    assert!(!judged(breaker, post("/other", &[])), "no breaker in scope");
    let keyed = r#"{"idempotency": {}}"#;
    assert!(judged(keyed, post("/", &[("idempotency-key", "k1")])));
    let bucket = r#"{"rate_limit": {"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 5, "interval": "1s"}}]}}"#;
    assert!(!judged(bucket, post("/", &[])));
}

/// The host fetches only what the filter needs: a policy missing here silently sees nothing.
#[test]
fn every_policy_declares_the_request_parts_it_reads() {
    let proxy = Proxy::new(
        r#"{
        "rate_limit": {"rules": [{"name": "r", "key": [{"header": "x-api-key"}, "client_address"], "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}]},
        "circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {"host": "a.example", "headers": [{"name": "x-tenant", "present": true}]}}, "trip": {"consecutive_failures": 1}}]},
        "load_shedding": {"pools": [{"name": "p", "scope": {"cluster": "c"}, "max_in_flight": 1}],
                          "priority": {"header": "x-priority", "trusted_sources": ["10.0.0.0/8"],
                                       "rules": [{"match": {"headers": [{"name": "x-batch", "present": true}]}, "class": "low"}]}},
        "idempotency": {"identity": [{"header": "x-account"}]}
    }"#,
    );
    let needs = proxy.filter.needs();
    assert_eq!(
        needs.headers,
        [
            ":authority",
            "idempotency-key",
            "x-account",
            "x-api-key",
            "x-batch",
            "x-priority",
            "x-tenant"
        ]
    );
    assert!(needs.request && needs.peer && needs.cluster);
    let shedding = Proxy::new(
        r#"{"load_shedding": {"pools": [{"name": "p", "scope": {"cluster": "c"}, "max_in_flight": 1}]}}"#,
    );
    assert_eq!(shedding.filter.needs().headers, Vec::<String>::new());
    assert!(!shedding.filter.needs().peer && shedding.filter.needs().cluster);
    assert_eq!(Proxy::new("{}").filter.needs(), &Needs::default());
}

/// `:method` and `:path` are declared by exactly what reads them: matchers and keys on them,
/// dry-run refusals (their logs name them), idempotency and long-lived requests.
#[test]
fn the_request_line_is_declared_by_what_reads_it() {
    let reads = |json: &str| Proxy::new(json).filter.needs().request_line;
    let breaker = |fields: &str| {
        format!(
            r#"{{"circuit_breaker": {{"breakers": [{{"name": "b", {fields} "trip": {{"consecutive_failures": 1}}}}]}}}}"#
        )
    };
    assert!(!reads(&breaker(r#""scope": {"match": {}},"#)));
    assert!(!reads(&breaker(
        r#""scope": {"match": {"headers": [{"name": "x-t", "present": true}]}},"#
    )));
    assert!(reads(&breaker(
        r#""scope": {"match": {"path_prefix": "/api"}},"#
    )));
    assert!(reads(&breaker(
        r#""scope": {"match": {"methods": ["GET"]}},"#
    )));
    assert!(reads(&breaker(
        r#""scope": {"match": {}}, "shadow": true,"#
    )));
    let rule = |fields: &str| {
        format!(
            r#"{{"rate_limit": {{"rules": [{{"name": "r", {fields} "capacity": 1, "refill": {{"tokens": 1, "interval": "1s"}}}}]}}}}"#
        )
    };
    assert!(!reads(&rule(r#""key": ["client_address"],"#)));
    assert!(reads(&rule(r#""key": ["method"],"#)));
    assert!(reads(&rule(r#""key": ["path"],"#)));
    assert!(reads(&rule(r#""match": {"path": "/x"},"#)));
    assert!(reads(&rule(r#""shadow": true,"#)));
    assert!(!reads(
        r#"{"load_shedding": {"pools": [{"name": "p", "max_in_flight": 1}]}}"#
    ));
    assert!(reads(
        r#"{"load_shedding": {"pools": [{"name": "p", "max_in_flight": 1, "shadow": true}]}}"#
    ));
    assert!(reads(
        r#"{"load_shedding": {"pools": [{"name": "p", "max_in_flight": 1}], "priority": {"rules": [{"match": {"path_prefix": "/batch"}, "class": "low"}]}}}"#
    ));
    assert!(reads(r#"{"idempotency": {}}"#));
    assert!(reads(&format!(
        r#"{{"load_shedding": {{"pools": [{{"name": "p", "max_in_flight": 1}}]}}, {}}}"#,
        r#""long_lived": {"match": [{"path": "/demo.Orders/Watch"}]}"#
    )));
}

/// Where nothing declares `:method` and `:path`, the host reads only `content-type`: every
/// decision must come out the same without them.
#[test]
fn what_does_not_read_the_request_line_decides_the_same_without_it() {
    let request = |line: bool| {
        let mut map = vec![("content-type".to_owned(), b"application/json".to_vec())];
        if line {
            map.push((":method".to_owned(), b"POST".to_vec()));
            map.push((":path".to_owned(), b"/orders".to_vec()));
        }
        let mut request = RequestInfo::from_header_map(map, &[]);
        request.peer = "192.0.2.1".parse().ok();
        request
    };
    for json in [
        r#"{"circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}}, "trip": {"consecutive_failures": 2}}]}}"#,
        r#"{"load_shedding": {"pools": [{"name": "p", "max_in_flight": 1}]}}"#,
        r#"{"rate_limit": {"rules": [{"name": "r", "key": ["client_address"], "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}}]}}"#,
    ] {
        let (with, without) = (Proxy::new(json), Proxy::new(json));
        assert!(!with.filter.needs().request_line, "{json}");
        for upstream in [200, 500, 500, 200, 500] {
            let statuses = [(&with, true), (&without, false)]
                .map(|(proxy, line)| status(&proxy.call(request(line), b"", upstream)));
            assert_eq!(statuses[0], statuses[1], "{json}");
        }
    }
}

#[test]
fn every_request_is_counted_and_an_empty_filter_lets_it_through() {
    let proxy = Proxy::new("{}");
    let mut exchange = Exchange::default();
    assert_eq!(
        proxy.send(&mut exchange, post("/", &[]), b"x"),
        Step::Continue
    );
    assert!(!exchange.holds_loans());
    assert_eq!(proxy.metric("requests"), 1);
}

#[test]
fn the_sweep_runs_once_a_second() {
    let proxy = Proxy::new(r#"{"idempotency": {"ttl": "1s", "records": 300}}"#);
    for i in 0..5 {
        assert_eq!(
            status(&proxy.call(keyed(&format!("k{i}")), b"{}", 201)),
            200
        );
    }
    let mut sweeper = proxy.filter.sweeper(0);
    proxy.advance(1_000);
    proxy.run(&proxy.store, |filter, env| filter.tick(env, &mut sweeper));
    proxy.run(&proxy.store, |filter, env| filter.tick(env, &mut sweeper));
    assert_eq!(
        proxy.metric("idempotency.evictions"),
        5,
        "256 slots from 0, then nothing: too soon"
    );
    assert_eq!(proxy.filter.tick_period(), Some(TICK));
    assert_eq!(Proxy::new("{}").filter.tick_period(), None);
}

#[test]
fn a_restarted_vm_reports_the_adaptive_limit_where_the_others_left_it() {
    let json = r#"{"load_shedding": {"pools": [{"name": "api", "max_in_flight": 40, "adaptive": {"min_limit": 2}}]}}"#;
    let first = Proxy::new(json);
    let state = crate::load_shedding::PoolState {
        limit: 17,
        ..Default::default()
    };
    assert!(state::update::<crate::load_shedding::PoolState, _>(
        &first.store,
        &first.filter.instance.namespace,
        "resilience/t/ls/api",
        8,
        |_| ((), Some(state)),
    )
    .is_ok());
    let mut telemetry = Telemetry::default();
    let second = Filter::configure(
        "t",
        json.as_bytes(),
        &first.store,
        Seed([3, 4]),
        at(0),
        &mut telemetry,
    );
    assert!(second.is_ok());
    let metrics = RefCell::default();
    if let Ok(second) = &second {
        record(
            second.catalog(),
            &mut telemetry,
            &metrics,
            &RefCell::default(),
        );
    }
    assert_eq!(
        metrics.borrow().get("resilience.t.load_shedding.api.limit"),
        Some(&17)
    );
}

/// Within one stage: a breaker that refuses gives back the probe slot an earlier breaker of
/// the same request took, at once.
#[test]
fn a_breaker_refusal_gives_back_an_earlier_breakers_probe_slot() {
    let proxy = Proxy::new(
        r#"{"circuit_breaker": {"breakers": [
            {"name": "a", "scope": {"match": {}}, "trip": {"consecutive_failures": 1},
             "open": {"duration": "1s"}, "half_open": {"max_probes": 1}},
            {"name": "b", "scope": {"match": {"path_prefix": "/b/"}}, "trip": {"consecutive_failures": 1},
             "open": {"duration": "60s"}}]}}"#,
    );
    use crate::circuit_breaker::Phase;
    assert_eq!(status(&proxy.call(post("/b/x", &[]), b"", 500)), 200);
    assert_eq!(
        (proxy.breaker_phase("a"), proxy.breaker_phase("b")),
        (Some(Phase::Open), Some(Phase::Open))
    );
    proxy.advance(1_000);
    let refused = proxy.call(post("/b/y", &[]), b"", 200);
    assert_eq!(
        refused.map_err(|r| r.header("x-circuit-breaker").map(<[u8]>::to_vec)),
        Err(Some(b"b".to_vec()))
    );
    assert_eq!(
        proxy.breaker_phase("a"),
        Some(Phase::HalfOpen),
        "a took its one probe slot..."
    );
    assert_eq!(
        status(&proxy.call(post("/a", &[]), b"", 200)),
        200,
        "...and b's refusal gave it back, so the next probe passes"
    );
    assert_eq!(proxy.breaker_phase("a"), Some(Phase::Closed));
}

/// Rate-limit tokens are spent, not lent: a request the breaker refuses still counted.
#[test]
fn a_breaker_refusal_leaves_the_rate_limit_token_spent() {
    let proxy = Proxy::new(&config(&[
        r#""rate_limit": {"rules": [{"name": "r", "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
        BREAKER,
    ]));
    assert_eq!(status(&proxy.call(post("/", &[]), b"", 500)), 200);
    assert_eq!(
        status(&proxy.call(post("/", &[]), b"", 200)),
        503,
        "the breaker is open"
    );
    assert_eq!(
        status(&proxy.call(post("/", &[]), b"", 200)),
        429,
        "both tokens were spent"
    );
}

mod dry_run;
mod fleet;
mod global;
mod long_lived;

fn grpc_call(key: Option<&str>) -> RequestInfo {
    let mut headers = vec![("content-type", "application/grpc")];
    headers.extend(key.map(|key| ("idempotency-key", key)));
    RequestInfo {
        grpc: true,
        ..post("/demo.Orders/Create", &headers)
    }
}

fn grpc_refusal(reply: &Reply) -> (Option<GrpcStatus>, String, Option<String>) {
    let pushback = reply
        .header("grpc-retry-pushback-ms")
        .map(|v| String::from_utf8_lossy(v).into_owned());
    (
        reply.grpc_status,
        String::from_utf8_lossy(&reply.body).into_owned(),
        pushback,
    )
}

/// A gRPC call is refused with the code a gRPC client acts on, a message naming the policy
/// and rule, and the wait as `grpc-retry-pushback-ms`; other requests get HTTP refusals.
#[test]
fn grpc_calls_are_refused_with_grpc_statuses() {
    let proxy = Proxy::new(&config(&[LIMIT_ONE]));
    assert_eq!(status(&proxy.call(grpc_call(None), b"", 200)), 200);
    let refusal = proxy.call(grpc_call(None), b"", 200).unwrap_err();
    assert_eq!(
        grpc_refusal(&refusal),
        (
            Some(GrpcStatus::RESOURCE_EXHAUSTED),
            "rate limited by rule one".to_owned(),
            Some("3600000".to_owned())
        )
    );
    assert_eq!(
        refusal.header("content-type"),
        None,
        "Envoy sets application/grpc"
    );
    assert_eq!(refusal.header("retry-after"), Some(&b"3600"[..]));
    assert!(refusal.header("ratelimit").is_some());
    let http = proxy.call(post("/", &[]), b"", 200).unwrap_err();
    assert_eq!((http.status, http.grpc_status), (429, None));
    assert_eq!(
        http.header("content-type"),
        Some(&b"application/problem+json"[..])
    );
    let problem: serde_json::Value = serde_json::from_slice(&http.body).unwrap_or_default();
    assert_eq!(
        problem,
        serde_json::json!({
            "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
            "title": "Quota exceeded",
            "status": 429,
            "detail": "rate limited by rule one",
            "violated-policies": ["one"],
        })
    );

    let configured = Proxy::new(
        r#"{"rate_limit": {"rules": [{"name": "one", "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}],
            "limited_response": {"grpc_status": "UNAVAILABLE", "grpc_message": "slow down"}}}"#,
    );
    assert_eq!(status(&configured.call(grpc_call(None), b"", 200)), 200);
    let refusal = configured.call(grpc_call(None), b"", 200).unwrap_err();
    assert_eq!(
        grpc_refusal(&refusal),
        (
            Some(GrpcStatus::UNAVAILABLE),
            "slow down".to_owned(),
            Some("1000".to_owned())
        )
    );

    // Only a gRPC answer has a grpc-status to read.
    let proxy = Proxy::new(&config(&[BREAKER]));
    for (content_type, grpc_response) in [(&b"text/html"[..], false), (b"application/grpc", true)] {
        let mut exchange = Exchange::default();
        assert_eq!(
            proxy.send(&mut exchange, grpc_call(None), b""),
            Step::Continue
        );
        let upstream = Upstream {
            status: 200,
            headers: vec![("content-type".to_owned(), content_type.to_vec())],
        };
        proxy.respond(&mut exchange, &upstream, b"");
        assert_eq!(exchange.grpc_response(), grpc_response);
        proxy.finish(&mut exchange, answered(200));
    }
    let mut http = Exchange::default();
    assert_eq!(proxy.send(&mut http, post("/", &[]), b""), Step::Continue);
    proxy.respond(&mut http, &Upstream::answering(200), b"");
    assert!(!http.grpc_response(), "not a gRPC call");
    proxy.finish(&mut http, answered(200));

    let proxy = Proxy::new(&config(&[POOL, IDEMPOTENCY, BREAKER]));
    let missing = proxy.call(grpc_call(None), b"", 200).unwrap_err();
    assert_eq!(missing.grpc_status, Some(GrpcStatus::INVALID_ARGUMENT));
    assert!(String::from_utf8_lossy(&missing.body).starts_with("idempotency:key-missing: "));
    let mut first = Exchange::default();
    assert_eq!(
        proxy.send(&mut first, grpc_call(Some("k")), b"m"),
        Step::Continue
    );
    let in_flight = proxy.call(grpc_call(Some("k")), b"m", 200).unwrap_err();
    assert_eq!(
        (
            in_flight.grpc_status,
            in_flight.header("grpc-retry-pushback-ms")
        ),
        (Some(GrpcStatus::ABORTED), Some(&b"30000"[..]))
    );
    proxy.respond(&mut first, &Upstream::answering(503), b"");
    proxy.finish(&mut first, answered(503));
    let open = proxy.call(grpc_call(Some("k2")), b"m", 200).unwrap_err();
    assert_eq!(open.grpc_status, Some(GrpcStatus::UNAVAILABLE));
    assert_eq!(
        String::from_utf8_lossy(&open.body),
        "circuit breaker b is open"
    );
}

/// A store through which another worker writes right before this worker's next write: the
/// window a compare-and-swap protects.
struct Racing<'a> {
    shared: &'a MemoryStore,
    other_worker: RefCell<Option<Box<dyn FnOnce() + 'a>>>,
}

impl crate::store::Store for Racing<'_> {
    fn get(&self, key: &str) -> Result<Option<crate::store::Versioned>, crate::store::StoreError> {
        self.shared.get(key)
    }

    fn set(
        &self,
        key: &str,
        value: &[u8],
        cas: Option<std::num::NonZeroU32>,
    ) -> Result<(), crate::store::StoreError> {
        let other_worker = self.other_worker.borrow_mut().take();
        if let Some(other_worker) = other_worker {
            other_worker();
        }
        self.shared.set(key, value, cas)
    }
}

/// Issue 16: `shared_data.conflicts` counts the compare-and-swaps this worker lost to another
/// worker's write, once each, and the answers stay exact: two tokens, two admitted.
#[test]
fn a_compare_and_swap_lost_to_another_worker_is_counted_once() {
    let proxy = Proxy::new(&config(&[
        r#""rate_limit": {"rules": [{"name": "r", "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}"#,
    ]));
    let other_admitted = Cell::new(false);
    let racing = Racing {
        shared: &proxy.store,
        other_worker: RefCell::new(Some(Box::new(|| {
            other_admitted.set(status(&proxy.call(post("/", &[]), b"", 200)) == 200);
        }))),
    };
    let mut exchange = Exchange::default();
    let step = proxy.run(&racing, |filter, env| {
        exchange.on_request_headers(filter, env, post("/", &[]), true)
    });
    assert_eq!(step, Step::Continue);
    assert!(other_admitted.get());
    assert_eq!(proxy.metric("shared_data.conflicts"), 1);
    assert_eq!(proxy.metric("rate_limit.r.allowed"), 2);
    assert_eq!(status(&proxy.call(post("/", &[]), b"", 200)), 429);
}
