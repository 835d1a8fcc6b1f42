//! Long-lived requests (streaming RPCs, upgrades): which pools count them, how breakers judge
//! them, and that idempotency leaves them alone.

use super::*;
use crate::circuit_breaker::Phase;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const WATCH: &str = r#""long_lived": {"match": [{"path": "/demo.Orders/Watch"}]}"#;

fn watch() -> RequestInfo {
    RequestInfo {
        grpc: true,
        ..post(
            "/demo.Orders/Watch",
            &[("content-type", "application/grpc")],
        )
    }
}

fn unary() -> RequestInfo {
    grpc_call(None)
}

/// Response headers of a gRPC call under way: its status comes later, in trailers.
fn grpc_started() -> Upstream {
    Upstream {
        status: 200,
        headers: vec![("content-type".to_owned(), b"application/grpc".to_vec())],
    }
}

/// A trailers-only gRPC answer: the call failed before it started.
fn grpc_failed(code: &str) -> Upstream {
    Upstream {
        status: 200,
        headers: vec![
            ("content-type".to_owned(), b"application/grpc".to_vec()),
            ("grpc-status".to_owned(), code.as_bytes().to_vec()),
        ],
    }
}

fn grpc_answered(status: GrpcStatus) -> Completion {
    Completion {
        grpc_status: Some(status),
        ..answered(200)
    }
}

/// Opens a stream whose response headers come after `headers_ms`; it stays open.
fn open_stream(proxy: &Proxy, headers_ms: u64, response: &Upstream) -> Exchange {
    let mut exchange = Exchange::default();
    assert_eq!(proxy.send(&mut exchange, watch(), b""), Step::Continue);
    proxy.advance(headers_ms);
    proxy.response_headers(&mut exchange, response, false);
    exchange
}

/// Only the requests the section names are long-lived, and only as spelled canonically: an
/// `Upgrade` header is the client's to send (Istio allows WebSocket upgrades on every route,
/// and an upstream may ignore it), and an upstream may take `connect` or `/x/../Watch` for
/// another method or path than the rule did. Each would otherwise step out of a pool.
#[test]
fn only_what_the_section_names_is_long_lived_and_only_as_spelled_canonically() {
    let header_map = |method: &str, path: &str, extra: &[(&str, &str)]| {
        let mut map = vec![
            (":method".to_owned(), method.as_bytes().to_vec()),
            (":path".to_owned(), path.as_bytes().to_vec()),
        ];
        map.extend(
            extra
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        );
        RequestInfo::from_header_map(map, &[])
    };
    let proxy = Proxy::new(&config(&[
        r#""long_lived": {"match": [{"path": "/demo.Orders/Watch"}, {"methods": ["CONNECT"]}]}"#,
        r#""load_shedding": {"pools": [{"name": "streams", "max_in_flight": 5, "long_lived": "only"}]}"#,
    ]));
    let counted = |request: RequestInfo| {
        let mut exchange = Exchange::default();
        assert_eq!(proxy.send(&mut exchange, request, b""), Step::Continue);
        let long_lived = proxy.in_flight("streams") == 1;
        proxy.finish(&mut exchange, answered(200));
        long_lived
    };
    assert!(counted(header_map("POST", "/demo.Orders/Watch", &[])));
    assert!(counted(header_map("POST", "/demo.Orders/Watch?x=1", &[])));
    assert!(counted(header_map("CONNECT", "/", &[])));
    for request in [
        header_map(
            "GET",
            "/chat",
            &[("upgrade", "websocket"), ("connection", "upgrade")],
        ),
        header_map("connect", "/", &[]),
        header_map("POST", "/api/../demo.Orders/Watch", &[]),
        header_map("POST", "/demo.Orders/%57atch", &[]),
        header_map("POST", "//demo.Orders/Watch", &[]),
        header_map("post", "/demo.Orders/Watch", &[]),
    ] {
        let spelled = format!(
            "{} {}",
            request.method,
            String::from_utf8_lossy(&request.path_and_query)
        );
        assert!(!counted(request), "{spelled}");
    }
}

/// A pool counts long-lived requests only if told to: excluded by default, counted with the
/// rest (`include`), or alone (`only`, a cap on open streams). Their slots go back when they
/// end, however long they lived, and their lives never teach an adaptive pool a latency.
#[test]
fn pools_count_long_lived_requests_as_configured() {
    let proxy = Proxy::new(&config(&[
        WATCH,
        r#""load_shedding": {"pools": [
            {"name": "calls", "max_in_flight": 1},
            {"name": "streams", "max_in_flight": 1, "long_lived": "only"},
            {"name": "all", "max_in_flight": 10, "long_lived": "include"}],
           "shed_at": {"high": 1, "normal": 1, "low": 1}}"#,
    ]));
    let mut stream = open_stream(&proxy, 5, &grpc_started());
    assert_eq!(
        [
            proxy.in_flight("calls"),
            proxy.in_flight("streams"),
            proxy.in_flight("all")
        ],
        [0, 1, 1]
    );
    assert_eq!(
        status(&proxy.call(unary(), b"", 200)),
        200,
        "the open stream holds no slot of the pool of calls"
    );
    let shed = proxy.call(watch(), b"", 200).unwrap_err();
    assert_eq!(shed.grpc_status, Some(GrpcStatus::UNAVAILABLE));
    assert_eq!(
        shed.header("x-load-shed"),
        Some(&b"pool=streams; class=normal"[..])
    );

    proxy.advance(10_000);
    proxy.finish(&mut stream, grpc_answered(GrpcStatus::OK));
    assert_eq!(
        [
            proxy.in_flight("calls"),
            proxy.in_flight("streams"),
            proxy.in_flight("all")
        ],
        [0, 0, 0],
        "a stream held for 10 s gives its slots back"
    );
    assert_eq!(proxy.metric("load_shedding.streams.in_flight"), 0);
    let stream_life = Completion {
        long_lived: true,
        duration: Duration::from_secs(10),
        ..answered(200)
    };
    assert_eq!(
        stream_life.latency_sample(),
        None,
        "an adaptive pool never takes a stream's life for a latency"
    );
}

/// A breaker judges a long-lived request by its response headers: the 10 s a stream then
/// lives is not a slow call, though a 10 s unary call is.
#[test]
fn a_long_stream_is_no_slow_call_but_a_late_start_is_under_its_own_rule() {
    let breaker = |long_lived: &str| {
        config(&[
            WATCH,
            &format!(
                r#""circuit_breaker": {{"breakers": [{{"name": "b", "scope": {{"match": {{}}}},
                "failure": {{"slow_call": "1s"}}, {long_lived}
                "trip": {{"slow_call_rate_percent": 50, "minimum_calls": 1, "window": {{"calls": 10}}}}}}]}}"#
            ),
        ])
    };
    let proxy = Proxy::new(&breaker(""));
    let mut stream = open_stream(&proxy, 5, &grpc_started());
    proxy.advance(10_000);
    proxy.finish(&mut stream, grpc_answered(GrpcStatus::OK));
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Closed));
    let mut slow_start = open_stream(&proxy, 5_000, &grpc_started());
    proxy.finish(&mut slow_start, grpc_answered(GrpcStatus::OK));
    assert_eq!(
        proxy.breaker_phase("b"),
        Some(Phase::Closed),
        "without long_lived.slow_call no stream is slow"
    );

    let control = Proxy::new(&breaker(""));
    let mut call = Exchange::default();
    assert_eq!(control.send(&mut call, unary(), b""), Step::Continue);
    control.advance(10_000);
    control.respond(&mut call, &grpc_started(), b"");
    control.finish(&mut call, grpc_answered(GrpcStatus::OK));
    assert_eq!(
        control.breaker_phase("b"),
        Some(Phase::Open),
        "a 10 s unary call is slow"
    );

    let own_rule = Proxy::new(&breaker(r#""long_lived": {"slow_call": "100ms"},"#));
    let mut prompt = open_stream(&own_rule, 50, &grpc_started());
    own_rule.advance(10_000);
    own_rule.finish(&mut prompt, grpc_answered(GrpcStatus::OK));
    assert_eq!(own_rule.breaker_phase("b"), Some(Phase::Closed));
    let _late = open_stream(&own_rule, 200, &grpc_started());
    assert_eq!(
        own_rule.breaker_phase("b"),
        Some(Phase::Open),
        "headers after 200 ms are slow under a 100 ms rule, judged while the stream lives"
    );
}

/// A stream probing a half-open breaker gives its slot back once it has started, so a breaker
/// whose probes are streams recovers without waiting for them to end; how the stream ends
/// (a server draining its streams ends them UNAVAILABLE) is not counted.
#[test]
fn a_streaming_probe_closes_the_breaker_when_it_starts() {
    let proxy = Proxy::new(&config(&[
        WATCH,
        r#""circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}},
            "trip": {"consecutive_failures": 1}, "open": {"duration": "1s"},
            "half_open": {"max_probes": 1}}]}"#,
    ]));
    proxy.advance(1);
    let mut failed = Exchange::default();
    assert_eq!(proxy.send(&mut failed, unary(), b""), Step::Continue);
    proxy.respond(&mut failed, &grpc_failed("14"), b"");
    proxy.finish(&mut failed, grpc_answered(GrpcStatus::UNAVAILABLE));
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Open));
    proxy.advance(1_000);
    let mut probe = Exchange::default();
    assert_eq!(proxy.send(&mut probe, watch(), b""), Step::Continue);
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::HalfOpen));
    proxy.advance(5);
    proxy.response_headers(&mut probe, &grpc_started(), false);
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Closed));
    proxy.advance(60_000);
    proxy.finish(&mut probe, grpc_answered(GrpcStatus::UNAVAILABLE));
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Closed));

    // Refused at its start (trailers-only), or never answered: a failure.
    let mut refused = Exchange::default();
    assert_eq!(proxy.send(&mut refused, watch(), b""), Step::Continue);
    proxy.response_headers(&mut refused, &grpc_failed("14"), true);
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Open));
    proxy.finish(&mut refused, grpc_answered(GrpcStatus::UNAVAILABLE));
    proxy.advance(2_000);
    let mut reset = Exchange::default();
    assert_eq!(proxy.send(&mut reset, watch(), b""), Step::Continue);
    proxy.finish(
        &mut reset,
        Completion {
            flags: 0x10,
            upstream_host: true,
            ..Completion::default()
        },
    );
    assert_eq!(
        proxy.breaker_phase("b"),
        Some(Phase::Open),
        "an upstream reset before the headers failed the probe"
    );
}

/// `counted: false`: the breaker still refuses streams while open, but their outcomes never
/// count, and one passing a half-open breaker takes no probe slot.
#[test]
fn uncounted_streams_are_refused_while_open_and_judge_nothing() {
    let proxy = Proxy::new(&config(&[
        WATCH,
        r#""circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}},
            "trip": {"consecutive_failures": 1}, "open": {"duration": "1s"},
            "half_open": {"max_probes": 1}, "long_lived": {"counted": false}}]}"#,
    ]));
    let mut stream = Exchange::default();
    assert_eq!(proxy.send(&mut stream, watch(), b""), Step::Continue);
    proxy.response_headers(&mut stream, &grpc_failed("14"), true);
    proxy.finish(&mut stream, grpc_answered(GrpcStatus::UNAVAILABLE));
    assert_eq!(proxy.breaker_phase("b"), None, "not counted");

    assert_eq!(status(&proxy.call(post("/", &[]), b"", 500)), 200);
    let refused = proxy.call(watch(), b"", 200).unwrap_err();
    assert_eq!(refused.grpc_status, Some(GrpcStatus::UNAVAILABLE));
    proxy.advance(1_000);
    let mut passing = open_stream(&proxy, 5, &grpc_started());
    assert_eq!(
        status(&proxy.call(post("/", &[]), b"", 200)),
        200,
        "the stream left the one probe slot free"
    );
    assert_eq!(proxy.breaker_phase("b"), Some(Phase::Closed));
    proxy.finish(&mut passing, grpc_answered(GrpcStatus::OK));
}

/// A streaming call has no single request to fingerprint: idempotency lets it through
/// without waiting for its body, key or no key.
#[test]
fn idempotency_never_holds_a_long_lived_request() {
    let proxy = Proxy::new(&config(&[WATCH, IDEMPOTENCY]));
    let mut exchange = Exchange::default();
    assert_eq!(proxy.headers(&mut exchange, watch(), false), Step::Continue);
    proxy.finish(&mut exchange, answered(200));
    assert_eq!(status(&proxy.call(unary(), b"", 200)), 400);
}

/// A stream's start is judged as Envoy reports a call's status: its `grpc-status`, else gRPC's
/// reading of the HTTP status (503 and 429 are `UNAVAILABLE`); only a 200 with no status yet
/// is a call under way.
#[test]
fn a_stream_refused_with_an_http_status_is_judged_by_grpcs_mapping() {
    let proxy = Proxy::new(&config(&[
        WATCH,
        r#""circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}},
            "failure": {"grpc_statuses": ["UNAVAILABLE"]},
            "trip": {"consecutive_failures": 2}, "open": {"duration": "1s"}}]}"#,
    ]));
    let answering = |status: u16| Upstream {
        status,
        headers: vec![("content-type".to_owned(), b"application/grpc".to_vec())],
    };
    let mut refused = Exchange::default();
    assert_eq!(proxy.send(&mut refused, watch(), b""), Step::Continue);
    proxy.response_headers(&mut refused, &answering(503), false);
    let mut limited = Exchange::default();
    assert_eq!(proxy.send(&mut limited, watch(), b""), Step::Continue);
    proxy.response_headers(&mut limited, &answering(429), true);
    assert_eq!(
        proxy.breaker_phase("b"),
        Some(Phase::Open),
        "two UNAVAILABLE starts in a row"
    );
    proxy.finish(&mut refused, grpc_answered(GrpcStatus::UNAVAILABLE));
    proxy.finish(&mut limited, grpc_answered(GrpcStatus::UNAVAILABLE));

    proxy.advance(1_000);
    let mut not_found = Exchange::default();
    assert_eq!(proxy.send(&mut not_found, watch(), b""), Step::Continue);
    proxy.response_headers(&mut not_found, &answering(404), true);
    assert_eq!(
        proxy.breaker_phase("b"),
        Some(Phase::Closed),
        "UNIMPLEMENTED is not in the set: the probe succeeded"
    );
    proxy.finish(&mut not_found, grpc_answered(GrpcStatus::OK));
}

/// Each pool may have its own slot lease: a pool of streams keeps its slots for a day while a
/// pool of calls gets slots lost to a failed VM back within minutes.
#[test]
fn a_pool_of_streams_has_its_own_slot_lease() {
    let proxy = Proxy::new(&config(&[
        WATCH,
        r#""load_shedding": {"slot_lease": "3s", "pools": [
            {"name": "all", "max_in_flight": 10, "long_lived": "include"},
            {"name": "streams", "max_in_flight": 10, "long_lived": "only", "slot_lease": "24h"}]}"#,
    ]));
    let mut stream = open_stream(&proxy, 5, &grpc_started());
    assert_eq!([proxy.in_flight("all"), proxy.in_flight("streams")], [1, 1]);
    proxy.advance(5_000);
    assert_eq!(status(&proxy.call(unary(), b"", 200)), 200);
    assert_eq!(
        [proxy.in_flight("all"), proxy.in_flight("streams")],
        [0, 1],
        "the 3 s lease ran out in the pool of all requests, not in the pool of streams"
    );
    proxy.finish(&mut stream, grpc_answered(GrpcStatus::OK));
    assert_eq!(proxy.in_flight("streams"), 0);
}
