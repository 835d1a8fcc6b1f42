use super::*;
use crate::config::json::read;
use crate::config::Duration;
use crate::store::{FailureMode, DEFAULT_MAX_ATTEMPTS};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn error_path(json: &str) -> String {
    match Config::parse(json.as_bytes()) {
        Ok(config) => format!("accepted: {config:?}"),
        Err(err) => err.path,
    }
}

#[test]
fn empty_configuration_runs_with_defaults() {
    let defaults = Config {
        shared_data: SharedDataSettings {
            on_error: FailureMode::Allow,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        },
        rate_limit: None,
        circuit_breaker: None,
        load_shedding: None,
        idempotency: None,
        long_lived: Vec::new(),
        decision_header: None,
    };
    assert_eq!(Config::parse(b""), Ok(defaults.clone()));
    assert_eq!(Config::parse(b" \n"), Ok(defaults.clone()));
    assert_eq!(Config::parse(b"{}"), Ok(defaults));
}

#[test]
fn settings_are_read() {
    let config = Config::parse(br#"{"shared_data": {"on_error": "deny", "max_attempts": 3}}"#);
    assert_eq!(
        config.map(|c| c.shared_data),
        Ok(SharedDataSettings {
            on_error: FailureMode::Deny,
            max_attempts: 3
        })
    );
}

#[test]
fn errors_name_the_field() {
    assert_eq!(
        error_path(r#"{"shared_data": {"max_attempts": 0}}"#),
        "shared_data.max_attempts"
    );
    assert_eq!(
        error_path(r#"{"shared_data": {"max_attempts": 65}}"#),
        "shared_data.max_attempts"
    );
    assert_eq!(
        error_path(r#"{"shared_data": {"max_attempts": -1}}"#),
        "shared_data.max_attempts"
    );
    assert_eq!(
        error_path(r#"{"shared_data": {"on_error": "maybe"}}"#),
        "shared_data.on_error"
    );
    assert_eq!(
        error_path(r#"{"shared_data": {"retries": 1}}"#),
        "shared_data.retries"
    );
    assert_eq!(error_path(r#"{"rate_limits": {}}"#), "rate_limits");
    assert_eq!(
        error_path(r#"{"rate_limit": {"rules": []}}"#),
        "rate_limit.rules"
    );
    let rule = |extra: &str| {
        format!(
            r#"{{"rate_limit": {{"rules": [{{"name": "r", "capacity": 5, "refill": {{"tokens": 1, "interval": "1s"}}{extra}}}]}}}}"#
        )
    };
    assert!(Config::parse(rule("").as_bytes()).is_ok());
    assert_eq!(
        error_path(&rule(r#", "cost": 6"#)),
        "rate_limit.rules[0].cost"
    );
    assert_eq!(
        error_path(
            r#"{"rate_limit": {"rules": [{"name": "r", "capacity": 0, "refill": {"tokens": 1, "interval": "1s"}}]}}"#
        ),
        "rate_limit.rules[0].capacity"
    );
    assert_eq!(
        error_path(&rule(r#", "table_size": 5"#)),
        "rate_limit.rules[0].table_size"
    );
    assert_eq!(
        error_path(&rule(r#", "key": ["client_address"], "table_size": 0"#)),
        "rate_limit.rules[0].table_size"
    );
    assert_eq!(
        error_path(&rule(r#", "key": [{"header": "bad name"}]"#)),
        "rate_limit.rules[0].key[0].header"
    );
    assert_eq!(
        error_path(&rule(r#", "key": ["cookie"]"#)),
        "rate_limit.rules[0].key[0]"
    );
    assert_eq!(
        error_path(&rule(r#", "match": {"path_prefix": "x"}"#)),
        "rate_limit.rules[0].match.path_prefix"
    );
    assert_eq!(
        error_path(&rule(r#", "burst": 3"#)),
        "rate_limit.rules[0].burst"
    );
    assert_eq!(
        error_path(
            r#"{"rate_limit": {"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1"}}]}}"#
        ),
        "rate_limit.rules[0].refill.interval"
    );
    assert_eq!(
        error_path(
            r#"{"rate_limit": {"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1s"}}, {"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1s"}}]}}"#
        ),
        "rate_limit.rules[1].name"
    );
    assert_eq!(
        error_path(
            r#"{"rate_limit": {"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1s"}}], "limited_response": {"status": 200}}}"#
        ),
        "rate_limit.limited_response.status"
    );
}

#[test]
fn malformed_documents_are_refused() {
    assert_eq!(error_path("{"), ".");
    assert_eq!(error_path("{} {}"), ".");
    assert_eq!(error_path("[]"), ".");
    assert_eq!(error_path("\u{feff}{}"), ".");
    assert_eq!(error_path(r#"{"shared_data": "#), "shared_data");
    assert_eq!(
        error_path(r#"{"rate_limit": {"rules": [{"name": "r", "name": 1}]}}"#),
        "rate_limit.rules[0].name"
    );
}

#[test]
fn error_message_carries_path_and_reason() {
    let err = Config::parse(br#"{"shared_data": {"max_attempts": 0}}"#).err();
    assert_eq!(
        err.map(|e| e.to_string()),
        Some(
            "invalid configuration at `shared_data.max_attempts`: must be between 1 and 64, got 0"
                .into()
        )
    );
}

#[test]
fn durations_are_strings_with_units() {
    let parse = |json: &str| read::<Duration>(json).map(|d| d.0).ok();
    assert_eq!(
        parse(r#""250ms""#),
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(parse(r#""30s""#), Some(std::time::Duration::from_secs(30)));
    assert_eq!(
        parse(r#""24h""#),
        Some(std::time::Duration::from_secs(86_400))
    );
    assert_eq!(
        parse(r#""1m 30s""#),
        Some(std::time::Duration::from_secs(90))
    );
    assert_eq!(parse(r#""30""#), None, "a unit is required");
    assert_eq!(parse("30"), None, "numbers are ambiguous");
    assert_eq!(parse(r#""-1s""#), None);
}

/// Issue 15: every numeric field either holds exactly as written or is refused, naming it.
#[test]
fn values_that_cannot_be_honoured_are_refused_with_the_field() {
    let shedding = |shed_at: &str| {
        format!(
            r#"{{"load_shedding": {{"pools": [{{"name": "p", "max_in_flight": 10}}], "shed_at": {shed_at}}}}}"#
        )
    };
    assert_eq!(
        error_path(&shedding(r#"{"low": 0.1234567}"#)),
        "load_shedding.shed_at.low"
    );
    assert!(Config::parse(shedding(r#"{"low": 0.123456}"#).as_bytes()).is_ok());
    assert_eq!(
        error_path(&shedding(r#"{"low": 0.009}"#)),
        "load_shedding.shed_at.low"
    );
    let lease = |lease: &str| {
        format!(
            r#"{{"load_shedding": {{"pools": [{{"name": "p", "max_in_flight": 10}}], "slot_lease": "{lease}"}}}}"#
        )
    };
    assert_eq!(error_path(&lease("999ms")), "load_shedding.slot_lease");
    assert_eq!(error_path(&lease("25h")), "load_shedding.slot_lease");
    assert!(Config::parse(lease("24h").as_bytes()).is_ok());
    let idempotency = |field: &str| format!(r#"{{"idempotency": {{{field}}}}}"#);
    assert_eq!(
        error_path(&idempotency(r#""body_timeout": "99ms""#)),
        "idempotency.body_timeout",
        "finer than the timer that keeps it"
    );
    assert!(Config::parse(idempotency(r#""body_timeout": "100ms""#).as_bytes()).is_ok());
    assert_eq!(
        error_path(&idempotency(r#""body_timeout": "6m""#)),
        "idempotency.body_timeout"
    );
    assert!(Config::parse(idempotency(r#""body_timeout": "5m""#).as_bytes()).is_ok());
    let rule = |refill: &str| {
        format!(
            r#"{{"rate_limit": {{"rules": [{{"name": "r", "capacity": 1000000000, "refill": {refill}}}]}}}}"#
        )
    };
    assert_eq!(
        error_path(&rule(r#"{"tokens": 2000000, "interval": "1ms"}"#)),
        "rate_limit.rules[0].refill",
        "faster than a token per nanosecond"
    );
    assert!(Config::parse(rule(r#"{"tokens": 1000000, "interval": "1ms"}"#).as_bytes()).is_ok());
    assert!(Config::parse(rule(r#"{"tokens": 1, "interval": "366days"}"#).as_bytes()).is_ok());
    assert!(Config::parse(rule(r#"{"tokens": 700000000, "interval": "1s"}"#).as_bytes()).is_ok());
    assert_eq!(
        error_path(&rule(r#"{"tokens": 1, "interval": "367days"}"#)),
        "rate_limit.rules[0].refill.interval"
    );
    assert_eq!(
        error_path(
            r#"{"rate_limit": {"rules": [{"name": "r", "match": {"path_prefix": "/a/../b/"}, "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}]}}"#
        ),
        "rate_limit.rules[0].match.path_prefix"
    );
}

/// Found in review: a rule on `host` or `connection` was accepted and never applied: Envoy
/// keeps the host in `:authority` and strips hop-by-hop headers before filters.
#[test]
fn request_headers_envoy_never_passes_are_refused() {
    assert_eq!(
        error_path(
            r#"{"rate_limit": {"rules": [{"name": "r", "key": [{"header": "Host"}], "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}]}}"#
        ),
        "rate_limit.rules[0].key[0].header"
    );
    assert_eq!(
        error_path(
            r#"{"load_shedding": {"pools": [{"name": "p", "max_in_flight": 1, "scope": {"match": {"headers": [{"name": "connection", "present": true}]}}}]}}"#
        ),
        "load_shedding.pools[0].scope.match.headers[0].name"
    );
    assert_eq!(
        error_path(r#"{"idempotency": {"identity": [{"header": "transfer-encoding"}]}}"#),
        "idempotency.identity[0].header"
    );
    assert!(Config::parse(br#"{"idempotency": {"stored_headers": ["location"]}}"#).is_ok());
}

#[test]
fn global_rules_need_a_store_and_a_chunk_that_leaves_room() {
    let rule = |capacity: u64, cost: u64, chunk: u64| {
        format!(
            r#"{{"rate_limit": {{"rules": [{{"name": "g", "capacity": {capacity}, "cost": {cost},
                "refill": {{"tokens": 1, "interval": "1s"}}, "global": {{"chunk": {chunk}}}}}],
                "store": {{"etcd": {{"cluster": "etcd"}}}}}}}}"#
        )
    };
    assert!(error_path(&rule(100, 1, 99)).starts_with("accepted"));
    assert!(error_path(&rule(100, 5, 5)).starts_with("accepted"));
    assert!(error_path(&rule(1_000_000_000, 1, 999_999_999)).starts_with("accepted"));
    for (capacity, cost, chunk) in [
        (100, 1, 0),
        (100, 1, 100),
        (100, 5, 4),
        (100, 5, 96),
        (1, 1, 1),
    ] {
        assert_eq!(
            error_path(&rule(capacity, cost, chunk)),
            "rate_limit.rules[0].global.chunk",
            "capacity {capacity}, cost {cost}, chunk {chunk}"
        );
    }
    let without_store = r#"{"rate_limit": {"rules": [{"name": "g", "capacity": 10,
        "refill": {"tokens": 1, "interval": "1s"}, "global": {"chunk": 2}}]}}"#;
    assert_eq!(error_path(without_store), "rate_limit.rules[0].global");
    let store_unused = r#"{"rate_limit": {"rules": [{"name": "l", "capacity": 10,
        "refill": {"tokens": 1, "interval": "1s"}}], "store": {"etcd": {"cluster": "etcd"}}}}"#;
    assert_eq!(error_path(store_unused), "rate_limit.store");
    let bad_timeout = rule(100, 1, 10).replace(
        r#"{"cluster": "etcd"}"#,
        r#"{"cluster": "etcd", "timeout": "5ms"}"#,
    );
    assert_eq!(error_path(&bad_timeout), "rate_limit.store.etcd.timeout");
}

#[test]
fn grpc_fields_are_checked_by_name() {
    let limited = |response: &str| {
        error_path(&format!(
            r#"{{"rate_limit": {{"rules": [{{"name": "r", "capacity": 1, "refill": {{"tokens": 1, "interval": "1s"}}}}],
                "limited_response": {response}}}}}"#
        ))
    };
    assert!(
        limited(r#"{"grpc_status": "UNAVAILABLE", "grpc_message": "m"}"#).starts_with("accepted")
    );
    for wrong in [r#""OK""#, r#""unavailable""#, r#""14""#, "14"] {
        assert_eq!(
            limited(&format!(r#"{{"grpc_status": {wrong}}}"#)),
            "rate_limit.limited_response.grpc_status",
            "{wrong}"
        );
    }
    let breaker = |failure: &str| {
        error_path(&format!(
            r#"{{"circuit_breaker": {{"breakers": [{{"name": "b", "scope": {{"match": {{}}}},
                "failure": {failure}, "trip": {{"consecutive_failures": 1}}}}]}}}}"#
        ))
    };
    assert!(breaker(r#"{"grpc_statuses": ["INTERNAL", "OK"]}"#).starts_with("accepted"));
    assert_eq!(
        breaker(r#"{"grpc_statuses": ["INTERNAL", "BROKEN"]}"#),
        "circuit_breaker.breakers[0].failure.grpc_statuses[1]"
    );
}

#[test]
fn a_response_cannot_set_what_makes_the_grpc_answer() {
    let shed = |response: &str| {
        error_path(&format!(
            r#"{{"load_shedding": {{"pools": [{{"name": "p", "max_in_flight": 1}}], "response": {response}}}}}"#
        ))
    };
    for name in [
        "grpc-status",
        "grpc-message",
        "grpc-retry-pushback-ms",
        "content-length",
    ] {
        assert_eq!(
            shed(&format!(r#"{{"headers": {{"{name}": "0"}}}}"#)),
            format!("load_shedding.response.headers.{name}")
        );
    }
    assert!(shed(r#"{"headers": {"x-grpc": "1"}}"#).starts_with("accepted"));
    let long = "m".repeat(1025);
    assert_eq!(
        shed(&format!(r#"{{"grpc_message": "{long}"}}"#)),
        "load_shedding.response.grpc_message"
    );
    assert!(shed(&format!(r#"{{"grpc_message": "{}"}}"#, &long[1..])).starts_with("accepted"));
}

#[test]
fn long_lived_settings_are_checked_where_they_are_written() {
    let section = |matches: &str| {
        error_path(&format!(
            r#"{{"long_lived": {{"match": {matches}}}, "idempotency": {{}}}}"#
        ))
    };
    assert!(section(r#"[{"path_prefix": "/feed.Feed/"}]"#).starts_with("accepted"));
    assert!(section(r#"[{"methods": ["CONNECT"]}]"#).starts_with("accepted"));
    assert_eq!(section("[]"), "long_lived.match");
    assert_eq!(
        section(r#"[{"path": "/a"}, {"path": "no-slash"}]"#),
        "long_lived.match[1].path"
    );
    assert_eq!(
        section("[{}]"),
        "long_lived.match[0]",
        "names every request"
    );
    assert_eq!(
        section(r#"[{"path": "/a", "headers": [{"name": "upgrade", "present": true}]}]"#),
        "long_lived.match[0].headers",
        "a client would name itself"
    );
    assert_eq!(
        section(r#"[{"path": "/a", "host": "streams.example.com"}]"#),
        "long_lived.match[0].host"
    );
    assert_eq!(
        error_path(
            r#"{"long_lived": {"match": [{"path": "/a"}]}, "rate_limit": {"rules": [{"name": "r", "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}]}}"#
        ),
        "long_lived",
        "no policy here would treat them apart"
    );

    let pool = |setting: &str| {
        error_path(&format!(
            r#"{{"load_shedding": {{"pools": [{{"name": "p", "max_in_flight": 5, {setting}}}]}}}}"#
        ))
    };
    for accepted in [r#""exclude""#, r#""include""#, r#""only""#] {
        assert!(pool(&format!(r#""long_lived": {accepted}"#)).starts_with("accepted"));
    }
    assert_eq!(
        pool(r#""long_lived": "separate""#),
        "load_shedding.pools[0].long_lived"
    );
    assert_eq!(
        pool(r#""long_lived": "only", "adaptive": {}"#),
        "load_shedding.pools[0].adaptive",
        "a pool of streams has no latencies to learn from"
    );
    assert!(pool(r#""long_lived": "include", "adaptive": {}"#).starts_with("accepted"));
    assert!(pool(r#""long_lived": "only", "slot_lease": "24h""#).starts_with("accepted"));
    assert_eq!(
        pool(r#""slot_lease": "25h""#),
        "load_shedding.pools[0].slot_lease"
    );

    let breaker = |long_lived: &str, trip: &str| {
        error_path(&format!(
            r#"{{"circuit_breaker": {{"breakers": [{{"name": "b", "scope": {{"match": {{}}}},
                "failure": {{"slow_call": "1s"}}, "trip": {trip}, "long_lived": {long_lived}}}]}}}}"#
        ))
    };
    let rates = r#"{"slow_call_rate_percent": 50, "window": {"calls": 10}}"#;
    let consecutive = r#"{"consecutive_failures": 1}"#;
    assert!(breaker(r#"{"slow_call": "2s"}"#, rates).starts_with("accepted"));
    assert!(breaker(r#"{"counted": false}"#, consecutive).starts_with("accepted"));
    for (long_lived, trip) in [
        (r#"{"slow_call": "0s"}"#, rates),
        (r#"{"slow_call": "2s", "counted": false}"#, rates),
        (r#"{"slow_call": "2s"}"#, consecutive),
    ] {
        assert_eq!(
            breaker(long_lived, trip),
            "circuit_breaker.breakers[0].long_lived.slow_call",
            "{long_lived} {trip}"
        );
    }
    let streams_only = error_path(
        r#"{"circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}},
            "trip": {"slow_call_rate_percent": 50, "window": {"calls": 10}},
            "long_lived": {"slow_call": "1s"}}]}}"#,
    );
    assert!(
        streams_only.starts_with("accepted"),
        "a slow-call rule for streams alone needs no failure.slow_call: {streams_only}"
    );
    assert_eq!(
        breaker(r#"{"count": true}"#, consecutive),
        "circuit_breaker.breakers[0].long_lived.count"
    );
}

/// One `Retry-After` (issue 16: a configured one came as a second, contradicting value), and
/// no configured copy of any header a policy sets with its real state.
#[test]
fn a_response_cannot_repeat_a_header_the_policy_sets() {
    for header in [
        "Retry-After",
        "ratelimit",
        "RateLimit-Policy",
        "x-load-shed",
        "x-circuit-breaker",
    ] {
        let path = error_path(&format!(
            r#"{{"rate_limit": {{"rules": [{{"name": "r", "capacity": 1, "refill": {{"tokens": 1, "interval": "1s"}}}}],
                "limited_response": {{"headers": {{"{header}": "60"}}}}}}}}"#
        ));
        assert_eq!(
            path,
            format!("rate_limit.limited_response.headers.{header}"),
            "{header}"
        );
    }
}

#[test]
fn released_statuses_are_4xx() {
    let idempotency = |statuses: &str| {
        error_path(&format!(
            r#"{{"idempotency": {{"released_statuses": {statuses}}}}}"#
        ))
    };
    assert!(idempotency("[408, 429]").starts_with("accepted"));
    assert!(idempotency("[]").starts_with("accepted"));
    assert_eq!(
        idempotency("[429, 503]"),
        "idempotency.released_statuses[1]"
    );
    assert_eq!(idempotency("[200]"), "idempotency.released_statuses[0]");
}
