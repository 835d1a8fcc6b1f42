//! With no policy configured the filter is invisible; a bad configuration is refused.

use super::envoy::envoy;
use super::upstream::{Upstream, STATUS_HEADER};
use super::{clients, join_all};

#[tokio::test(flavor = "multi_thread")]
async fn without_policies_requests_reach_the_upstream_unchanged() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("smoke", "{}").start(&upstream).await;
    let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();

    for (protocol, client) in clients() {
        let before = upstream.count();
        let response = client
            .post(envoy.url("/orders/42?expand=items&q=a%20b"))
            .header("x-custom", "kept as is")
            .header("idempotency-key", "\"abc\"")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{protocol}");
        let sequence = response.headers()["x-upstream-seq"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            response.text().await.unwrap(),
            format!("upstream response {sequence}: 100000 bytes received\n")
        );
        assert_eq!(
            upstream.count(),
            before + 1,
            "{protocol}: exactly one upstream request"
        );

        let seen = upstream.received().pop().unwrap();
        assert_eq!(seen.method, "POST", "{protocol}");
        assert_eq!(seen.uri, "/orders/42?expand=items&q=a%20b", "{protocol}");
        assert_eq!(seen.header("x-custom"), Some("kept as is"), "{protocol}");
        assert_eq!(
            seen.header("idempotency-key"),
            Some("\"abc\""),
            "{protocol}"
        );
        assert_eq!(seen.body, body, "{protocol}: body byte for byte");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_policies_upstream_statuses_pass_through() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("smoke", "").start(&upstream).await;
    for (protocol, client) in clients() {
        for status in [201, 404, 429, 503] {
            let response = client
                .get(envoy.url("/"))
                .header(STATUS_HEADER, status.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), status, "{protocol}");
            assert!(
                response.headers().contains_key("x-upstream-seq"),
                "{protocol}: answered by the upstream"
            );
        }
    }
    assert_eq!(upstream.count(), 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_configuration_is_refused_with_the_field_named() {
    let upstream = Upstream::start().await;
    for (config, field) in [
        (
            r#"{"shared_data": {"max_attempts": 0}}"#,
            "`shared_data.max_attempts`",
        ),
        (
            r#"{"shared_data": {"on_eror": "deny"}}"#,
            "`shared_data.on_eror`",
        ),
        (r#"{"shared_data": "#, "`shared_data`"),
        ("[]", "`.`"),
    ] {
        let (status, log) = envoy()
            .filter("refused", config)
            .start_expecting_refusal(&upstream)
            .await;
        assert!(!status.success(), "Envoy must not start with {config}");
        let line = log
            .lines()
            .find(|line| line.contains("resilience filter \"refused\": invalid configuration at"))
            .unwrap_or_else(|| panic!("no refusal line for {config} in:\n{log}"));
        assert!(
            line.contains(&format!("invalid configuration at {field}:")),
            "{line} should name {field}"
        );
        assert!(
            log.contains("Unable to create Wasm plugin refused"),
            "Envoy refused the filter"
        );
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_in_envoy_stats_and_prometheus() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"rules": [{"name": "per-client", "capacity": 1000,
        "refill": {"tokens": 1, "interval": "1s"}}]}}"#;
    let envoy = envoy()
        .filter("metered", config)
        .concurrency(3)
        .start(&upstream)
        .await;
    for (_, client) in clients() {
        for _ in 0..5 {
            client.get(envoy.url("/")).send().await.unwrap();
        }
    }
    assert_eq!(
        envoy.stat("wasmcustom.resilience.metered.requests").await,
        Some(10)
    );
    // One VM per worker, plus the base VM and the thread-local one on Envoy's main thread.
    assert_eq!(
        envoy.stat("wasmcustom.resilience.metered.vms").await,
        Some(3 + 2)
    );
    let prometheus = envoy.admin("/stats/prometheus").await.unwrap();
    assert!(
        prometheus.contains("\nresilience_metered_requests{} 10\n"),
        "{prometheus}"
    );
    // Prometheus names keep letters, digits and `_`: the rule's `-` becomes `_` (issue 16).
    assert!(
        prometheus.contains("\nresilience_metered_rate_limit_per_client_allowed{} 10\n"),
        "{prometheus}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chained_instances_each_see_every_request() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("first", "{}")
        .filter("second", "{}")
        .start(&upstream)
        .await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        assert_eq!(
            client.get(envoy.url("/")).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(
        envoy.stat("wasmcustom.resilience.first.requests").await,
        Some(3)
    );
    assert_eq!(
        envoy.stat("wasmcustom.resilience.second.requests").await,
        Some(3)
    );
    assert_eq!(upstream.count(), 3);
}

/// The harness's own upstream controls, seen through Envoy: what later tests rely on.
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_follows_the_tests_controls() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("smoke", "{}").start(&upstream).await;
    let client = reqwest::Client::new();

    upstream.set_status(503);
    assert_eq!(
        client.get(envoy.url("/")).send().await.unwrap().status(),
        503
    );
    upstream.set_status(200);

    upstream.set_delay(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let requests: Vec<_> = (0..6).map(|_| client.get(envoy.url("/")).send()).collect();
    for response in join_all(requests).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(upstream.max_in_flight(), 6, "all six were held at once");
    assert_eq!(upstream.in_flight(), 0);
}

/// Issue 10: every worker's VM compiles the whole module, so its size is a cost per worker.
/// `make build` runs wasm-opt over cargo's output; a build that skipped it, or code that grew
/// the module past the budget, fails here.
#[test]
fn the_filter_is_at_most_450_kb() {
    let bytes = std::fs::metadata(super::envoy::wasm_path()).unwrap().len();
    assert!(
        bytes <= 450_000,
        "the .wasm is {bytes} bytes: over the 450 KB budget (was it built by `make build`?)"
    );
}
