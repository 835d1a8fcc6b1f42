use super::*;
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
    let parse = |json: &str| serde_json::from_str::<Duration>(json).map(|d| d.0).ok();
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

/// The host fetches only what these name: a policy missing here silently sees nothing.
#[test]
fn every_policy_declares_the_request_parts_it_reads() {
    let config = Config::parse(
        br#"{
        "rate_limit": {"rules": [{"name": "r", "key": [{"header": "x-api-key"}, "client_address"], "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}]},
        "circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {"host": "a.example", "headers": [{"name": "x-tenant", "present": true}]}}, "trip": {"consecutive_failures": 1}}]},
        "load_shedding": {"pools": [{"name": "p", "scope": {"cluster": "c"}, "max_in_flight": 1}],
                          "priority": {"header": "x-priority", "trusted_sources": ["10.0.0.0/8"],
                                       "rules": [{"match": {"headers": [{"name": "x-batch", "present": true}]}, "class": "low"}]}}
    }"#,
    );
    let Ok(config) = config else {
        panic!("{config:?}")
    };
    assert_eq!(
        config.request_headers(),
        [
            ":authority",
            "x-api-key",
            "x-batch",
            "x-priority",
            "x-tenant"
        ]
    );
    assert!(config.needs_peer() && config.needs_cluster());

    let Ok(shedding_only) = Config::parse(
        br#"{"load_shedding": {"pools": [{"name": "p", "scope": {"cluster": "c"}, "max_in_flight": 1}],
             "priority": {"header": "x-priority", "trusted_sources": ["10.0.0.0/8"]}}}"#,
    ) else {
        panic!()
    };
    assert_eq!(shedding_only.request_headers(), ["x-priority"]);
    assert!(shedding_only.needs_peer() && shedding_only.needs_cluster());
    assert!(Config::parse(b"{}")
        .is_ok_and(|c| !c.needs_peer() && !c.needs_cluster() && c.request_headers().is_empty()));
}
