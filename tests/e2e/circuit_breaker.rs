//! Circuit breaking through real Envoy with several workers.

use super::envoy::{envoy, Envoy};
use super::upstream::{Upstream, DELAY_HEADER};
use super::{fresh_connections, join_all};
use reqwest::{Client, Response};
use std::time::{Duration, Instant};

fn breaker(fields: &str) -> String {
    format!(r#"{{"circuit_breaker": {{"breakers": [{{"name": "b", {fields}}}]}}}}"#)
}

fn from_breaker(response: &Response) -> bool {
    response.status() == 503
        && response
            .headers()
            .get("x-circuit-breaker")
            .is_some_and(|v| v == "b")
}

fn from_upstream(response: &Response) -> bool {
    response.headers().contains_key("x-upstream-seq")
}

async fn get(client: &Client, url: &str) -> Response {
    client.get(url).send().await.unwrap()
}

fn transitions(envoy: &Envoy, from: &str, to: &str) -> usize {
    envoy
        .log()
        .matches(&format!("circuit breaker \"b\": {from} -> {to}:"))
        .count()
}

async fn stat(envoy: &Envoy, name: &str) -> Option<u64> {
    envoy
        .stat(&format!(
            "wasmcustom.resilience.cb.circuit_breaker.b.{name}"
        ))
        .await
}

/// Fails the upstream and sends requests until the breaker is open: exactly `failures` of
/// them must have reached the upstream.
async fn trip(envoy: &Envoy, upstream: &Upstream, failures: u64) {
    let client = fresh_connections();
    let before = upstream.count();
    upstream.set_status(500);
    for i in 0..failures {
        let response = get(&client, &envoy.url("/")).await;
        assert!(
            from_upstream(&response) && response.status() == 500,
            "failure {i} reaches the upstream"
        );
    }
    for _ in 0..10 {
        assert!(from_breaker(&get(&client, &envoy.url("/")).await));
    }
    assert_eq!(
        upstream.count(),
        before + failures,
        "nothing reaches the upstream while open"
    );
}

const CONSECUTIVE: &str = r#""scope": {"match": {}}, "trip": {"consecutive_failures": 3}, "open": {"duration": "2s"}, "half_open": {"max_probes": 2}"#;

#[tokio::test(flavor = "multi_thread")]
async fn opens_after_exactly_the_configured_failures_and_fails_fast() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("cb", &breaker(CONSECUTIVE))
        .concurrency(4)
        .start(&upstream)
        .await;
    trip(&envoy, &upstream, 3).await;

    let client = fresh_connections();
    let started = Instant::now();
    let response = get(&client, &envoy.url("/")).await;
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "rejected at once"
    );
    assert!(from_breaker(&response));
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=2).contains(&retry_after),
        "Retry-After {retry_after}: the time left"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(problem["type"], "urn:envoy-resilience:circuit-breaker:open");
    assert_eq!(problem["status"], 503);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("circuit breaker "),
        "{problem}"
    );

    assert_eq!(stat(&envoy, "state").await, Some(1), "open");
    assert_eq!(stat(&envoy, "rejected").await, Some(11));
    assert_eq!(stat(&envoy, "transitions_to_open").await, Some(1));
    assert_eq!(
        transitions(&envoy, "closed", "open"),
        1,
        "logged once across workers"
    );
    assert!(envoy
        .log()
        .contains("closed -> open: 3 consecutive failures"));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_open_duration_at_most_k_probes_reach_the_upstream_and_success_closes() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("cb", &breaker(CONSECUTIVE))
        .concurrency(4)
        .start(&upstream)
        .await;
    trip(&envoy, &upstream, 3).await;
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    upstream.set_status(200);
    upstream.set_delay(Duration::from_millis(600));
    let before = upstream.count();
    let client = fresh_connections();
    let requests: Vec<_> = (0..12)
        .map(|_| {
            let (client, url) = (client.clone(), envoy.url("/"));
            async move {
                let started = Instant::now();
                let response = client.get(url).send().await.unwrap();
                (
                    from_upstream(&response),
                    from_breaker(&response),
                    started.elapsed(),
                )
            }
        })
        .collect();
    let results = join_all(requests).await;
    let probes = results.iter().filter(|(upstream, _, _)| *upstream).count();
    assert_eq!(probes, 2, "{results:?}");
    assert_eq!(upstream.count(), before + 2);
    assert_eq!(upstream.max_in_flight(), 2);
    for (_, rejected, elapsed) in results.iter().filter(|(upstream, _, _)| !*upstream) {
        assert!(
            *rejected && *elapsed < Duration::from_millis(400),
            "shed at once, not queued: {elapsed:?}"
        );
    }

    upstream.set_delay(Duration::ZERO);
    for _ in 0..5 {
        assert!(
            from_upstream(&get(&client, &envoy.url("/")).await),
            "closed after two successful probes"
        );
    }
    assert_eq!(stat(&envoy, "state").await, Some(0));
    assert_eq!(transitions(&envoy, "open", "half-open"), 1);
    assert_eq!(transitions(&envoy, "half-open", "closed"), 1);
    assert_eq!(stat(&envoy, "transitions_to_half_open").await, Some(1));
    assert_eq!(stat(&envoy, "transitions_to_closed").await, Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_probe_reopens_the_breaker() {
    let upstream = Upstream::start().await;
    let config = breaker(
        r#""scope": {"match": {}}, "trip": {"consecutive_failures": 2}, "open": {"duration": "1s", "backoff_multiplier": 3}"#,
    );
    let envoy = envoy().filter("cb", &config).start(&upstream).await;
    trip(&envoy, &upstream, 2).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let client = fresh_connections();
    let before = upstream.count();
    let probe = get(&client, &envoy.url("/")).await;
    assert!(from_upstream(&probe) && probe.status() == 500);
    let refused = get(&client, &envoy.url("/")).await;
    assert!(from_breaker(&refused), "open again at once");
    assert_eq!(refused.headers()["retry-after"], "3", "second trip: 1s x 3");
    assert_eq!(upstream.count(), before + 1);
    assert_eq!(transitions(&envoy, "half-open", "open"), 1);
    assert!(envoy.log().contains("half-open -> open: a probe failed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_aborted_probe_does_not_wedge_the_breaker() {
    let upstream = Upstream::start().await;
    let config = breaker(
        r#""scope": {"match": {}}, "trip": {"consecutive_failures": 2}, "open": {"duration": "1s"}, "half_open": {"max_probes": 1}"#,
    );
    let envoy = envoy().filter("cb", &config).start(&upstream).await;
    trip(&envoy, &upstream, 2).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    // The only probe slot goes to a request whose client gives up after 300 ms.
    upstream.set_status(200);
    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .no_proxy()
        .build()
        .unwrap();
    let aborted = impatient
        .get(envoy.url("/"))
        .header(DELAY_HEADER, "5000")
        .send()
        .await;
    assert!(aborted.is_err_and(|e| e.is_timeout()));
    // Its slot came back when the stream ended, long before the upstream would have answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = fresh_connections();
    let probe = get(&client, &envoy.url("/")).await;
    assert!(
        from_upstream(&probe) && probe.status() == 200,
        "a new probe got the slot"
    );
    assert!(
        from_upstream(&get(&client, &envoy.url("/")).await),
        "and closed the breaker"
    );
    assert_eq!(stat(&envoy, "state").await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_failures_trip_a_breaker_scoped_to_their_cluster_only() {
    let upstream = Upstream::start().await;
    let config = r#"{"circuit_breaker": {"breakers": [
        {"name": "b", "scope": {"cluster": "dead"}, "trip": {"consecutive_failures": 2}, "open": {"duration": "30s"}},
        {"name": "healthy", "scope": {"cluster": "upstream"}, "trip": {"consecutive_failures": 2}}]}}"#;
    let envoy = envoy().filter("cb", config).start(&upstream).await;
    let client = fresh_connections();
    for _ in 0..2 {
        let response = get(&client, &envoy.url("/dead/x")).await;
        assert_eq!(response.status(), 503);
        assert!(
            !from_breaker(&response),
            "Envoy's own connect-failure reply"
        );
    }
    assert!(
        from_breaker(&get(&client, &envoy.url("/dead/x")).await),
        "open after two connect failures"
    );
    for _ in 0..3 {
        assert!(
            from_upstream(&get(&client, &envoy.url("/")).await),
            "the other cluster's breaker is closed"
        );
    }
    assert!(envoy
        .log()
        .contains("circuit breaker \"b\": closed -> open: 2 consecutive failures"));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_calls_trip_the_slow_call_rate() {
    let upstream = Upstream::start().await;
    let config = breaker(
        r#""scope": {"match": {"path_prefix": "/slow/"}}, "failure": {"slow_call": "200ms"},
           "trip": {"slow_call_rate_percent": 50, "minimum_calls": 4, "window": {"calls": 10}}"#,
    );
    let envoy = envoy().filter("cb", &config).start(&upstream).await;
    let client = fresh_connections();
    for delay in ["0", "300", "0", "300"] {
        let response = client
            .get(envoy.url("/slow/x"))
            .header(DELAY_HEADER, delay)
            .send()
            .await
            .unwrap();
        assert!(from_upstream(&response) && response.status() == 200);
    }
    assert!(
        from_breaker(&get(&client, &envoy.url("/slow/x")).await),
        "2 slow of 4 calls"
    );
    assert!(
        from_upstream(&get(&client, &envoy.url("/fast")).await),
        "out of the breaker's scope"
    );
    assert!(envoy.log().contains("slow-call rate 2/4 calls reached 50%"));
}

/// Issue 15, defect 4: a chained instance shedding load answers 503 locally; those 503s pass
/// back through the breaker's instance, and must not open it against a healthy upstream.
#[tokio::test(flavor = "multi_thread")]
async fn another_instances_refusals_do_not_open_the_breaker() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(500));
    let shed = r#"{"load_shedding": {"pools": [{"name": "one", "max_in_flight": 1}], "shed_at": {"high": 1, "normal": 1}}}"#;
    let envoy = envoy()
        .filter("cb", &breaker(r#""scope": {"match": {}}, "trip": {"consecutive_failures": 3}, "open": {"duration": "30s"}"#))
        .filter("ls", shed)
        .start(&upstream)
        .await;
    let client = fresh_connections();
    let burst: Vec<_> = (0..10).map(|_| client.get(envoy.url("/")).send()).collect();
    let responses = join_all(burst).await;
    let shed_count = responses
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_ok_and(|r| r.status() == 503 && r.headers().contains_key("x-load-shed"))
        })
        .count();
    assert_eq!(
        shed_count, 9,
        "one admitted, nine shed by the second instance"
    );
    upstream.set_delay(Duration::ZERO);
    for _ in 0..5 {
        let response = get(&client, &envoy.url("/")).await;
        assert!(
            from_upstream(&response) && response.status() == 200,
            "the breaker stayed closed"
        );
    }
    assert_eq!(stat(&envoy, "transitions_to_open").await, Some(0));
    assert_eq!(transitions(&envoy, "closed", "open"), 0);
}
