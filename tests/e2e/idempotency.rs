//! Idempotency keys through real Envoy with several workers.

use super::envoy::{envoy, Envoy};
use super::upstream::{Upstream, DELAY_HEADER, H2_ROUTE_HEADER, RESPOND_HEADER, TRAILER_HEADER};
use super::wire::{http1, http2};
use super::{fresh_connections, join_all};
use bytes::Bytes;
use reqwest::{Client, Response};
use std::time::Duration;

async fn post(envoy: &Envoy, key: Option<&str>, body: &str, auth: &str) -> Response {
    let mut request = fresh_connections()
        .post(envoy.url("/charges?currency=eur"))
        .header("authorization", auth)
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

async fn problem_type(response: Response) -> String {
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let json: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    let kind = json["type"].as_str().unwrap();
    kind.strip_prefix("urn:envoy-resilience:idempotency:")
        .unwrap()
        .to_owned()
}

async fn counter(envoy: &Envoy, name: &str) -> Option<u64> {
    envoy
        .stat(&format!("wasmcustom.resilience.idem.idempotency.{name}"))
        .await
}

const CONFIG: &str = r#"{"idempotency": {"lease": "1s", "max_body_bytes": 1024}}"#;

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_duplicates_execute_once_and_replays_are_byte_for_byte() {
    let upstream = Upstream::start().await;
    upstream.set_status(201);
    upstream.set_delay(Duration::from_millis(500));
    let config = r#"{"idempotency": {"lease": "10s"}}"#;
    let envoy = envoy()
        .filter("idem", config)
        .concurrency(4)
        .start(&upstream)
        .await;

    let requests: Vec<_> = (0..50)
        .map(|_| {
            let client = fresh_connections();
            let url = envoy.url("/charges?currency=eur");
            async move {
                let response = client
                    .post(url)
                    .header("authorization", "Bearer alice")
                    .header("idempotency-key", "\"charge-1\"")
                    .body(r#"{"amount": 100}"#)
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let retry_after = header(&response, "retry-after");
                (status, retry_after, response.text().await.unwrap())
            }
        })
        .collect();
    let results = join_all(requests).await;
    assert_eq!(upstream.count(), 1, "executed once");
    let originals: Vec<&String> = results
        .iter()
        .filter(|(s, _, _)| *s == 201)
        .map(|(_, _, body)| body)
        .collect();
    assert!(!originals.is_empty());
    assert!(
        originals.iter().all(|body| *body == originals[0]),
        "every 201 is the same response"
    );
    for (status, retry_after, _) in &results {
        assert!(*status == 201 || *status == 409, "{results:?}");
        if *status == 409 {
            assert!(retry_after.is_some(), "409 carries Retry-After");
        }
    }
    let original = originals[0].clone();

    let replay = post(
        &envoy,
        Some("\"charge-1\""),
        r#"{"amount": 100}"#,
        "Bearer alice",
    )
    .await;
    assert_eq!(replay.status(), 201);
    assert_eq!(
        header(&replay, "idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(
        header(&replay, "content-type").as_deref(),
        Some("application/octet-stream"),
        "stored headers come back"
    );
    assert!(
        header(&replay, "x-upstream-seq").is_none(),
        "not an allow-listed header"
    );
    assert_eq!(
        replay.bytes().await.unwrap(),
        original.as_bytes(),
        "byte for byte"
    );
    assert_eq!(upstream.count(), 1, "the upstream still saw one request");
    assert_eq!(counter(&envoy, "claims").await, Some(1));
    assert!(
        counter(&envoy, "conflicts").await.unwrap() + counter(&envoy, "replays").await.unwrap()
            >= 50
    );
}

/// An upstream 429 means "not executed": the key is freed, and the client that waits it
/// out and retries with the same key executes (issue 16: it was replayed the 429 for ten
/// minutes).
#[tokio::test(flavor = "multi_thread")]
async fn a_429_from_the_upstream_frees_the_key_for_the_retry() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    upstream.set_status(429);
    assert_eq!(post(&envoy, Some("k"), "a", "alice").await.status(), 429);
    upstream.set_status(200);
    let retried = post(&envoy, Some("k"), "a", "alice").await;
    assert_eq!(retried.status(), 200);
    assert_eq!(header(&retried, "idempotent-replayed"), None);
    assert_eq!(upstream.count(), 2, "the retry executed");
    let again = post(&envoy, Some("k"), "a", "alice").await;
    assert_eq!(
        header(&again, "idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(upstream.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_with_another_request_is_refused_with_422() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    assert_eq!(post(&envoy, Some("k"), "a", "alice").await.status(), 200);
    let changed = post(&envoy, Some("k"), "b", "alice").await;
    assert_eq!(changed.status(), 422);
    assert_eq!(problem_type(changed).await, "key-reused");
    assert_eq!(upstream.count(), 1);
    assert_eq!(counter(&envoy, "mismatches").await, Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_required_key_or_a_bad_key_gets_400() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("idem", r#"{"idempotency": {"required": true}}"#)
        .start(&upstream)
        .await;
    let missing = post(&envoy, None, "a", "alice").await;
    assert_eq!(missing.status(), 400);
    assert_eq!(problem_type(missing).await, "key-missing");
    let bad = post(&envoy, Some("not a key"), "a", "alice").await;
    assert_eq!(bad.status(), 400);
    assert_eq!(problem_type(bad).await, "key-invalid");
    let get = fresh_connections()
        .get(envoy.url("/charges"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200, "GET is not covered");
    assert_eq!(upstream.count(), 1);
    assert_eq!(counter(&envoy, "rejected_keys").await, Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn different_clients_with_the_same_key_each_execute() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    let alice = post(&envoy, Some("shared-key"), "a", "Bearer alice").await;
    let bob = post(&envoy, Some("shared-key"), "a", "Bearer bob").await;
    assert!(header(&alice, "x-upstream-seq").is_some() && header(&bob, "x-upstream-seq").is_some());
    assert_ne!(alice.text().await.unwrap(), bob.text().await.unwrap());
    assert_eq!(upstream.count(), 2);
}

/// A client that gives up while its request is upstream: the upstream may still execute it,
/// so a retry gets 409 until the claim's lease runs out, never a second execution alongside
/// the first (found in review: the claim used to be freed, and the retry ran at once).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_abort_keeps_the_key_until_its_lease() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("idem", r#"{"idempotency": {"lease": "2s"}}"#)
        .start(&upstream)
        .await;
    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .no_proxy()
        .build()
        .unwrap();
    let claimed = std::time::Instant::now();
    let aborted = impatient
        .post(envoy.url("/charges"))
        .header("authorization", "alice")
        .header("idempotency-key", "k")
        .header(DELAY_HEADER, "1000")
        .body("a")
        .send()
        .await;
    assert!(aborted.is_err_and(|e| e.is_timeout()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retry = || {
        fresh_connections()
            .post(envoy.url("/charges"))
            .header("authorization", "alice")
            .header("idempotency-key", "k")
            .body("a")
            .send()
    };
    let early = retry().await.unwrap();
    assert_eq!(early.status(), 409, "the first may still be executing");
    assert!(header(&early, "retry-after").is_some());
    assert_eq!(problem_type(early).await, "in-flight");
    assert_eq!(upstream.count(), 1);
    assert_eq!(counter(&envoy, "unanswered").await, Some(1));
    tokio::time::sleep(Duration::from_millis(2_100).saturating_sub(claimed.elapsed())).await;
    let later = retry().await.unwrap();
    assert_eq!(
        later.status(),
        200,
        "claimable again once the lease ran out"
    );
    assert!(header(&later, "x-upstream-seq").is_some());
    assert_eq!(upstream.count(), 2);
}

/// Found in review: a local timeout that carries no "reached the upstream" flag (a stream idle
/// timeout, a max stream duration) freed the key while the upstream was still executing, and
/// the duplicate ran alongside. The router had picked a host: the key stays claimed.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_idle_timeout_keeps_the_key_while_the_upstream_runs() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("idem", r#"{"idempotency": {"lease": "5s"}}"#)
        .start(&upstream)
        .await;
    let post = || {
        fresh_connections()
            .post(envoy.url("/idle/charges"))
            .header("authorization", "alice")
            .header("idempotency-key", "k")
            .header(DELAY_HEADER, "1500")
            .body("a")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 504, "Envoy's idle timeout");
    let duplicate = post().await.unwrap();
    assert_eq!(duplicate.status(), 409);
    assert_eq!(problem_type(duplicate).await, "in-flight");
    assert_eq!(upstream.count(), 1);
    assert_eq!(counter(&envoy, "unanswered").await, Some(1));
}

/// A request that never reached the upstream frees its key at once: a retry proceeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_connect_failure_frees_the_key_at_once() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    for _ in 0..2 {
        let response = fresh_connections()
            .post(envoy.url("/dead/charges"))
            .header("authorization", "alice")
            .header("idempotency-key", "k")
            .body("a")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "Envoy's connect failure, not a 409");
        assert!(header(&response, "x-upstream-seq").is_none());
    }
    assert_eq!(counter(&envoy, "claims").await, Some(2));
    assert_eq!(counter(&envoy, "released").await, Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_upstream_leaves_the_key_claimable_after_the_lease() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    let url = envoy.url("/charges?currency=eur");
    let hung = tokio::spawn(async move {
        fresh_connections()
            .post(url)
            .header("authorization", "alice")
            .header("idempotency-key", "k")
            .header(DELAY_HEADER, "4000")
            .body("a")
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = post(&envoy, Some("k"), "a", "alice").await;
    assert_eq!(during.status(), 409, "in flight");
    assert_eq!(problem_type(during).await, "in-flight");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let after_lease = post(&envoy, Some("k"), "a", "alice").await;
    assert_eq!(
        after_lease.status(),
        200,
        "claimable again once the 1 s lease ran out"
    );
    assert_eq!(upstream.count(), 2);
    hung.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_gets_413() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    let large = post(&envoy, Some("k"), &"x".repeat(2048), "alice").await;
    assert_eq!(large.status(), 413);
    assert_eq!(problem_type(large).await, "body-too-large");
    assert_eq!(
        post(&envoy, Some("k2"), &"x".repeat(1000), "alice")
            .await
            .status(),
        200
    );
    assert_eq!(upstream.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_5xx_releases_the_key_so_the_client_may_retry() {
    let upstream = Upstream::start().await;
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    upstream.set_status(503);
    assert_eq!(post(&envoy, Some("k"), "a", "alice").await.status(), 503);
    upstream.set_status(201);
    let retry = post(&envoy, Some("k"), "a", "alice").await;
    assert_eq!(retry.status(), 201);
    assert!(header(&retry, "idempotent-replayed").is_none());
    let replay = post(&envoy, Some("k"), "a", "alice").await;
    assert_eq!(
        header(&replay, "idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(upstream.count(), 2);
}

/// Without `allow_on_headers_stop_iteration`, Envoy holds request bodies back from the filter.
/// Such a request never goes upstream undecided: it waits `body_timeout`, gets 408, and the
/// log names the missing setting once.
#[tokio::test(flavor = "multi_thread")]
async fn without_allow_on_headers_stop_iteration_requests_get_408_and_the_setting_is_named() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("idem", r#"{"idempotency": {"body_timeout": "1s"}}"#)
        .without_headers_stop_iteration()
        .start(&upstream)
        .await;
    for key in ["k1", "k2"] {
        let started = std::time::Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            post(&envoy, Some(key), "a", "alice"),
        )
        .await
        .expect("no hang");
        let waited = started.elapsed();
        assert_eq!(response.status(), 408);
        assert!(
            (Duration::from_millis(900)..Duration::from_millis(2_500)).contains(&waited),
            "{waited:?}"
        );
        assert_eq!(problem_type(response).await, "body-timeout");
    }
    assert_eq!(upstream.count(), 0, "nothing went upstream undecided");
    assert_eq!(counter(&envoy, "body_timeouts").await, Some(2));
    let named = envoy
        .log()
        .matches("set `allow_on_headers_stop_iteration: true`")
        .count();
    assert!(
        (1..=2).contains(&named),
        "the missing setting is named once per worker: {named}"
    );
}

/// Issue 15, defect 2: a request that ends in trailers has no body chunk marked last; it is
/// decided at its trailers, so its duplicate is a replay, not a second execution.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_request_ending_in_trailers_executes_once() {
    let upstream = Upstream::start().await;
    upstream.set_status(201);
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    let send = |key: &'static str, body: &'static str| {
        let port = envoy.port;
        async move {
            http2(
                port,
                "POST",
                "/charges",
                &[
                    ("authorization", b"alice"),
                    ("idempotency-key", key.as_bytes()),
                ],
                vec![(Duration::ZERO, Bytes::from(body))],
                &[("x-checksum", "abc")],
            )
            .await
        }
    };
    let first = send("t1", r#"{"amount": 1}"#).await;
    assert_eq!(first.status, 201);
    assert!(first.header("x-upstream-seq").is_some(), "executed");
    let duplicate = send("t1", r#"{"amount": 1}"#).await;
    assert_eq!(duplicate.status, 201);
    assert_eq!(duplicate.header("idempotent-replayed"), Some(&b"true"[..]));
    assert_eq!(duplicate.body, first.body, "byte for byte");
    let changed = send("t1", r#"{"amount": 2}"#).await;
    assert_eq!(changed.status, 422);
    assert_eq!(upstream.count(), 1, "the upstream saw one request");
    let received = upstream.received();
    assert_eq!(received[0].body, r#"{"amount": 1}"#.as_bytes());
}

/// Issue 15, defect 2: a response that ends in trailers completes its capture and is replayed;
/// a gRPC response, whose status lives in its trailers, is never replayed without them, and
/// never executed twice either.
#[tokio::test(flavor = "multi_thread")]
async fn responses_ending_in_trailers_are_captured() {
    let upstream = Upstream::start().await;
    upstream.set_status(201);
    let envoy = envoy().filter("idem", CONFIG).start(&upstream).await;
    let post = |key: &'static str, grpc: bool| {
        let mut request = fresh_connections()
            .post(envoy.url("/charges"))
            .header("authorization", "alice")
            .header("idempotency-key", key)
            .header(H2_ROUTE_HEADER, "h2")
            .header(TRAILER_HEADER, "x-checksum: abc")
            .body("{}");
        if grpc {
            request = request
                .header(RESPOND_HEADER, "content-type: application/grpc")
                .header(TRAILER_HEADER, "grpc-status: 0");
        }
        request.send()
    };
    let first = post("plain", false).await.unwrap();
    assert_eq!(first.status(), 201);
    let original = first.text().await.unwrap();
    let replay = post("plain", false).await.unwrap();
    assert_eq!(
        header(&replay, "idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(replay.text().await.unwrap(), original);
    assert_eq!(upstream.count(), 1);

    assert_eq!(post("grpc", true).await.unwrap().status(), 201);
    let again = post("grpc", true).await.unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(problem_type(again).await, "not-replayable");
    assert_eq!(upstream.count(), 2, "each executed once");
}

/// Issue 15, defect 7: a duplicate whose body arrives 1.5 s after its headers is answered
/// from the record; before, its headers were forwarded after a second, and the upstream saw a
/// second request.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_body_is_waited_for_and_never_forwarded_undecided() {
    let upstream = Upstream::start().await;
    upstream.set_status(201);
    let envoy = envoy()
        .filter("idem", r#"{"idempotency": {"body_timeout": "3s"}}"#)
        .start(&upstream)
        .await;
    let head = |key: &str| {
        format!(
            "POST /charges HTTP/1.1\r\nhost: example\r\nauthorization: alice\r\n\
             idempotency-key: {key}\r\ncontent-length: 2"
        )
    };
    let first = http1(envoy.port, &head("slow"), &[(Duration::ZERO, b"{}")]).await;
    assert_eq!(first.status, 201);
    let slow = http1(
        envoy.port,
        &head("slow"),
        &[(Duration::from_millis(1_500), b"{}")],
    )
    .await;
    assert_eq!(slow.status, 201);
    assert_eq!(slow.header("idempotent-replayed"), Some(&b"true"[..]));
    assert_eq!(slow.body, first.body);
    assert_eq!(
        upstream.count(),
        1,
        "the duplicate's headers never went upstream"
    );

    let started = std::time::Instant::now();
    let stalled = http1(envoy.port, &head("stalled"), &[(Duration::ZERO, b"{")]).await;
    assert_eq!(stalled.status, 408, "{}", stalled.text());
    assert!(stalled.text().contains("idempotency:body-timeout"));
    assert!(
        (Duration::from_millis(2_900)..Duration::from_millis(4_500)).contains(&started.elapsed()),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.count(), 1, "nor did the stalled request's");
    assert!(
        !envoy.log().contains("allow_on_headers_stop_iteration"),
        "bodies reach the filter: the log must not blame the setting"
    );
}

/// A chained instance's refusal passes back through this one; it is not the upstream's
/// response, so it is never stored and replayed.
#[tokio::test(flavor = "multi_thread")]
async fn a_chained_instances_refusal_is_never_stored() {
    let upstream = Upstream::start().await;
    let limit = r#"{"rate_limit": {"rules": [{"name": "r", "match": {"headers": [{"name": "x-limited", "present": true}]},
        "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}}"#;
    let envoy = envoy()
        .filter("idem", CONFIG)
        .filter("rl", limit)
        .start(&upstream)
        .await;
    let post = |key: &'static str, limited: bool| {
        let mut request = fresh_connections()
            .post(envoy.url("/charges"))
            .header("authorization", "alice")
            .header("idempotency-key", key)
            .body("{}");
        if limited {
            request = request.header("x-limited", "1");
        }
        request.send()
    };
    assert_eq!(post("k1", true).await.unwrap().status(), 200);
    assert_eq!(post("k2", true).await.unwrap().status(), 429);
    let retry = post("k2", false).await.unwrap();
    assert_eq!(retry.status(), 200, "executed, not a replayed 429");
    assert!(header(&retry, "idempotent-replayed").is_none());
    assert_eq!(upstream.count(), 2);
}

/// Found in review: 320 requests whose bodies stalled on one worker fell due in the same
/// tick, and sending all their 408s at once overflowed the VM's stack (every later request on
/// the worker got 503). They are now answered a few dozen per tick.
#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_stalled_bodies_each_get_408_and_the_worker_stays_up() {
    const STALLED: usize = 400;
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter(
            "idem",
            r#"{"idempotency": {"body_timeout": "1s", "identity": ["client_address"]}}"#,
        )
        .concurrency(1)
        .start(&upstream)
        .await;
    let started = std::time::Instant::now();
    let stalled: Vec<_> = (0..STALLED)
        .map(|i| {
            let port = envoy.port;
            async move {
                let head = format!(
                    "POST /charges HTTP/1.1\r\nhost: example\r\nidempotency-key: k{i}\r\ncontent-length: 2"
                );
                http1(port, &head, &[(Duration::ZERO, b"{")]).await.status
            }
        })
        .collect();
    let statuses = join_all(stalled).await;
    assert!(statuses.iter().all(|&s| s == 408), "{statuses:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let after = post(&envoy, Some("after"), "{}", "alice").await;
    assert_eq!(after.status(), 200, "the worker still serves");
    assert_eq!(counter(&envoy, "body_timeouts").await, Some(STALLED as u64));
    assert!(!envoy.log().contains("Uncaught"), "{}", envoy.log());
    assert_eq!(upstream.count(), 1);
}

/// Issue 16: `max_body_bytes` holds across its range, up to 8 MiB. Envoy buffers the body
/// while the filter fingerprints it, up to the listener's `per_connection_buffer_limit_bytes`
/// (1 MiB by default, when Envoy answers a larger body 413 itself): set above
/// `max_body_bytes`, bodies of 2 MiB and of the whole 8 MiB execute once and replay, over
/// HTTP/1.1 and HTTP/2, and one byte more gets the filter's own 413 problem.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_up_to_8_mib_execute_once_with_the_buffer_limit_above_max_body_bytes() {
    const MAX: usize = 8 << 20;
    let upstream = Upstream::start().await;
    let config = format!(r#"{{"idempotency": {{"max_body_bytes": {MAX}}}}}"#);
    let large = envoy()
        .filter("idem", &config)
        .buffer_limit(u32::try_from(MAX + (1 << 20)).unwrap())
        .start(&upstream)
        .await;
    for (protocol, client) in super::clients() {
        for size in [2 << 20, MAX] {
            let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let key = format!("{protocol}-{size}");
            let send = || {
                client
                    .post(large.url("/charges"))
                    .header("idempotency-key", &key)
                    .header("authorization", "alice")
                    .body(body.clone())
                    .send()
            };
            let first = send().await.unwrap();
            assert_eq!(first.status(), 200, "{protocol}, {size} bytes");
            let replay = send().await.unwrap();
            assert_eq!(replay.status(), 200, "{protocol}, {size} bytes");
            assert_eq!(
                header(&replay, "idempotent-replayed").as_deref(),
                Some("true"),
                "{protocol}, {size} bytes"
            );
        }
        let over = client
            .post(large.url("/charges"))
            .header("idempotency-key", format!("{protocol}-over"))
            .header("authorization", "alice")
            .body(vec![b'x'; MAX + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(over.status(), 413, "{protocol}");
        assert_eq!(problem_type(over).await, "body-too-large", "{protocol}");
    }
    let mut sizes: Vec<usize> = upstream.received().iter().map(|r| r.body.len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [2 << 20, 2 << 20, MAX, MAX], "each body once, whole");

    // Without the buffer limit, Envoy refuses a 2 MiB body before the filter decides.
    let default_limit = envoy().filter("idem", &config).start(&upstream).await;
    let refused = fresh_connections()
        .post(default_limit.url("/charges"))
        .header("idempotency-key", "default-limit")
        .header("authorization", "alice")
        .body(vec![b'x'; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    assert_ne!(
        header(&refused, "content-type").as_deref(),
        Some("application/problem+json"),
        "Envoy's own 413, not the filter's"
    );
    assert_eq!(upstream.count(), 4);
}
