//! The README's retry policies, run as written in a real Envoy in front of the filter (and,
//! for the route to the upstream, in the filter's own Envoy): what each retries, and what it
//! passes through at once.

use super::envoy::{envoy, repo_root, Envoy};
use super::markdown::fenced_blocks;
use super::upstream::{Upstream, DELAY_HEADER, STATUS_HEADER};
use super::{fresh_connections, METRICS_FLUSHED};
use reqwest::Client;
use std::time::{Duration, Instant};

/// The README's `retry_policy` block that contains `marker`.
fn documented_policy(marker: &str) -> serde_json::Value {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let blocks: Vec<&str> = fenced_blocks(&readme)
        .into_iter()
        .filter(|(info, body)| *info == "yaml" && body.starts_with("retry_policy:"))
        .map(|(_, body)| body)
        .filter(|body| body.contains(marker))
        .collect();
    assert_eq!(blocks.len(), 1, "one retry policy with {marker}");
    let document: serde_json::Value = serde_norway::from_str(blocks[0]).unwrap();
    document["retry_policy"].clone()
}

/// A pool of one slot and a bucket of one token a second, both refusing in the filter's
/// default way (503 and 429, each with `Retry-After: 1`), and idempotency keys.
const POLICIES: &str = r#"{
    "load_shedding": {"pools": [{"name": "p", "max_in_flight": 1, "scope": {"match": {"path_prefix": "/pooled/"}}}],
                      "shed_at": {"high": 1, "normal": 1}},
    "rate_limit": {"rules": [{"name": "r", "match": {"path_prefix": "/limited/"},
                              "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}]},
    "idempotency": {}
}"#;

/// How many requests the filter saw: one per attempt the front Envoy made.
async fn attempts(envoy: &Envoy) -> u64 {
    tokio::time::sleep(METRICS_FLUSHED).await;
    envoy
        .stat("wasmcustom.resilience.retries.requests")
        .await
        .unwrap()
}

/// What the client got, and how many attempts reached the filter since `seen`.
async fn attempts_of(
    envoy: &Envoy,
    seen: &mut u64,
    request: reqwest::RequestBuilder,
) -> (u16, u64) {
    let got = status(request).await;
    let now = attempts(envoy).await;
    let made = now - std::mem::replace(seen, now);
    (got, made)
}

async fn status(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

/// Holds the pool's one slot for 1.5 s.
fn occupy_pool(client: &Client, envoy: &Envoy) -> tokio::task::JoinHandle<u16> {
    let request = client
        .get(envoy.url("/pooled/slow"))
        .header(DELAY_HEADER, "1500");
    tokio::spawn(status(request))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_interactive_front_policy_retries_what_is_safe_and_never_a_refusal() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("retries", POLICIES)
        .front_retry_policy(&documented_policy("retriable_status_codes: [502, 504]"))
        .start(&upstream)
        .await;
    let client = fresh_connections();
    let mut seen = attempts(&envoy).await;

    let get = client
        .get(envoy.front_url("/a"))
        .header(STATUS_HEADER, "502");
    assert_eq!(
        attempts_of(&envoy, &mut seen, get).await,
        (502, 3),
        "a GET: retried twice"
    );
    let keyed = client
        .post(envoy.front_url("/a"))
        .header("idempotency-key", "k")
        .header(STATUS_HEADER, "502")
        .body("{}");
    assert_eq!(
        attempts_of(&envoy, &mut seen, keyed).await,
        (502, 3),
        "a keyed POST: retried"
    );
    let unkeyed = client
        .post(envoy.front_url("/a"))
        .header(STATUS_HEADER, "502")
        .body("{}");
    assert_eq!(
        attempts_of(&envoy, &mut seen, unkeyed).await,
        (502, 1),
        "a POST without a key"
    );
    // A keyed POST the upstream got but answered too late (the route's idle timeout: 504):
    // the retry finds its key still claimed and gets 409, so the order executes once.
    let late = client
        .post(envoy.front_url("/idle/order"))
        .header("idempotency-key", "late")
        .header(DELAY_HEADER, "1000")
        .body("{}");
    assert_eq!(attempts_of(&envoy, &mut seen, late).await, (409, 2));
    let executed = upstream
        .received()
        .iter()
        .filter(|r| r.uri == "/idle/order")
        .count();
    assert_eq!(executed, 1, "the retried POST reached the upstream once");
    let failing = client
        .get(envoy.front_url("/a"))
        .header(STATUS_HEADER, "503");
    assert_eq!(
        attempts_of(&envoy, &mut seen, failing).await,
        (503, 1),
        "a 503 is never retried"
    );

    let slow = occupy_pool(&client, &envoy);
    tokio::time::sleep(Duration::from_millis(300)).await;
    seen = attempts(&envoy).await;
    let shed = client
        .get(envoy.front_url("/pooled/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), 503);
    assert_eq!(
        (
            shed.headers()
                .get("x-load-shed")
                .map(|v| v.to_str().unwrap()),
            shed.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap())
        ),
        (Some("pool=p; class=normal"), Some("1")),
        "the client gets the filter's answer"
    );
    assert_eq!(attempts(&envoy).await - seen, 1, "the shed request: once");
    assert_eq!(slow.await.unwrap(), 200);
    seen = attempts(&envoy).await;

    let first = client.get(envoy.front_url("/limited/1"));
    assert_eq!(attempts_of(&envoy, &mut seen, first).await, (200, 1));
    let limited = client.get(envoy.front_url("/limited/2"));
    assert_eq!(
        attempts_of(&envoy, &mut seen, limited).await,
        (429, 1),
        "a 429: passed through"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_batch_front_policy_retries_a_refusal_after_its_retry_after() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("retries", POLICIES)
        .front_retry_policy(&documented_policy("rate_limited_retry_back_off"))
        .start(&upstream)
        .await;
    let client = fresh_connections();
    assert_eq!(status(client.get(envoy.front_url("/limited/1"))).await, 200);
    let started = Instant::now();
    assert_eq!(status(client.get(envoy.front_url("/limited/2"))).await, 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}, before the 1 s Retry-After"
    );
    assert_eq!(
        envoy
            .stat("wasmcustom.resilience.retries.rate_limit.r.limited")
            .await,
        Some(1),
        "refused once, then admitted"
    );
    assert_eq!(upstream.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_route_policy_retries_only_what_never_reached_the_upstream() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("retries", POLICIES)
        .upstream_retry_policy(&documented_policy("reset-before-request"))
        .start(&upstream)
        .await;
    let client = fresh_connections();
    let dead = client.post(envoy.url("/dead/x")).body("{}");
    assert_eq!(status(dead).await, 503);
    assert_eq!(
        envoy.stat("cluster.dead.upstream_rq_retry").await,
        Some(2),
        "a connect failure: retried twice"
    );
    assert_eq!(attempts(&envoy).await, 1, "the filter saw the request once");
    let reached = client
        .post(envoy.url("/a"))
        .header(STATUS_HEADER, "500")
        .body("{}");
    assert_eq!(status(reached).await, 500);
    assert_eq!(
        upstream.count(),
        1,
        "an answer from the upstream: not retried"
    );
}
