//! Hostile input in real Envoy (issue 15, defects 1 and 5): a byte ≥ 0x80 in every header the
//! filter reads, from the client and from the upstream, and other spellings of a path.
//!
//! A trap would take the worker's VM down: every later request on that connection (and so on
//! that worker) would get 503. So each hostile request is followed by ordinary ones on the
//! same connection, which must still be served and still be policed.

use super::envoy::{envoy, Envoy};
use super::upstream::{Upstream, RESPOND_HEADER};
use super::wire::http1;
use super::{clients, fresh_connections, join_all};
use reqwest::header::HeaderValue;
use reqwest::{Client, Response};
use std::time::Duration;

fn latin1(text: &str) -> HeaderValue {
    let bytes: Vec<u8> = text.chars().map(|c| c as u32 as u8).collect();
    HeaderValue::from_bytes(&bytes).expect("obs-text is a valid header value")
}

/// No VM trapped: the SDK's panic hook and Envoy both log a trap.
fn assert_no_trap(envoy: &Envoy) {
    let log = envoy.log();
    for sign in ["panicked", "Uncaught RuntimeError", "unreachable"] {
        assert!(!log.contains(sign), "{sign:?} in Envoy's log:\n{log}");
    }
}

async fn statuses(
    client: &Client,
    n: usize,
    request: impl Fn(&Client) -> reqwest::RequestBuilder,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(request(client).send().await.unwrap().status().as_u16());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_key_that_is_not_utf8_is_a_key_and_the_worker_stays_up() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"rules": [{"name": "k", "key": [{"header": "x-api-key"}],
        "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}}"#;
    let envoy = envoy().filter("rl", config).start(&upstream).await;
    for (protocol, client) in clients() {
        let hostile = latin1(&format!("café-{protocol}"));
        let sent = statuses(&client, 3, |c| {
            c.get(envoy.url("/")).header("x-api-key", hostile.clone())
        })
        .await;
        assert_eq!(sent, [200, 200, 429], "{protocol}: a bucket like any other");
        let key = format!("alice-{protocol}");
        let after = statuses(&client, 3, |c| {
            c.get(envoy.url("/")).header("x-api-key", &key)
        })
        .await;
        assert_eq!(
            after,
            [200, 200, 429],
            "{protocol}: the same connection is still policed"
        );
    }
    assert_eq!(upstream.count(), 8);
    assert_no_trap(&envoy);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_header_that_is_not_utf8_scopes_keys_like_any_other() {
    let upstream = Upstream::start().await;
    upstream.set_status(201);
    let envoy = envoy()
        .filter("idem", r#"{"idempotency": {}}"#)
        .start(&upstream)
        .await;
    for (protocol, client) in clients() {
        let post = |authorization: HeaderValue| {
            client
                .post(envoy.url("/charges"))
                .header("authorization", authorization)
                .header("idempotency-key", format!("k-{protocol}"))
                .body("{}")
                .send()
        };
        let first = post(latin1("Bearer café")).await.unwrap();
        assert_eq!(first.status(), 201);
        assert!(first.headers().get("idempotent-replayed").is_none());
        let again = post(latin1("Bearer café")).await.unwrap();
        assert_eq!(
            again
                .headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "{protocol}"
        );
        let other = post(HeaderValue::from_static("Bearer cafe")).await.unwrap();
        assert!(
            other.headers().get("idempotent-replayed").is_none(),
            "{protocol}: another identity"
        );
    }
    assert_eq!(upstream.count(), 4);
    assert_no_trap(&envoy);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_that_is_not_utf8_gets_400() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("idem", r#"{"idempotency": {}}"#)
        .start(&upstream)
        .await;
    for (protocol, client) in clients() {
        let post = |key: HeaderValue| {
            client
                .post(envoy.url("/charges"))
                .header("authorization", "alice")
                .header("idempotency-key", key)
                .body("{}")
                .send()
        };
        let refused = post(latin1("clé-1")).await.unwrap();
        assert_eq!(refused.status(), 400, "{protocol}");
        let problem: serde_json::Value =
            serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
        assert_eq!(
            problem["type"],
            "urn:envoy-resilience:idempotency:key-invalid"
        );
        let fine = post(HeaderValue::from_str(&format!("key-{protocol}")).unwrap())
            .await
            .unwrap();
        assert_eq!(
            fine.status(),
            200,
            "{protocol}: the same connection still works"
        );
    }
    assert_eq!(upstream.count(), 2);
    assert_no_trap(&envoy);
}

/// A priority value that is not a class name (here not even text) is ignored, even from a
/// trusted source: the request keeps the class its route gives it.
#[tokio::test(flavor = "multi_thread")]
async fn a_priority_that_is_not_utf8_is_not_trusted() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(1_500));
    let config = r#"{"load_shedding": {"pools": [{"name": "all", "max_in_flight": 10}],
        "priority": {"header": "x-priority", "trusted_sources": ["127.0.0.1"]}}}"#;
    let envoy = envoy().filter("ls", config).start(&upstream).await;
    let client = fresh_connections();
    let fill: Vec<_> = (0..8).map(|_| client.get(envoy.url("/")).send()).collect();
    let filling = tokio::spawn(join_all(fill));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hostile = client
        .get(envoy.url("/"))
        .header("x-priority", latin1("critical\u{e9}"))
        .send()
        .await
        .unwrap();
    assert_eq!(hostile.status(), 503);
    assert_eq!(
        hostile.headers().get("x-load-shed").map(|v| v.as_bytes()),
        Some(&b"pool=all; class=normal"[..])
    );
    let critical = client
        .get(envoy.url("/"))
        .header("x-priority", "critical")
        .send()
        .await
        .unwrap();
    assert_eq!(critical.status(), 200, "the real class still passes");
    let filled = filling.await.unwrap();
    assert!(filled
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)));
    assert_no_trap(&envoy);
}

/// With `trusted_hops`, the client is read from `X-Forwarded-For`; an entry that is not an
/// address (here not even text) was not written by a trusted proxy: the connection's address
/// is used instead, so the request is still limited.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_address_that_is_not_utf8_falls_back_to_the_connection() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"trusted_hops": 1, "rules": [{"name": "c", "key": ["client_address"],
        "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}]}}"#;
    let envoy = envoy().filter("rl", config).start(&upstream).await;
    for (protocol, client) in clients() {
        let forged = statuses(&client, 2, |c| {
            c.get(envoy.url("/"))
                .header("x-forwarded-for", latin1("café"))
        })
        .await;
        let own = statuses(&client, 1, |c| c.get(envoy.url("/"))).await;
        if protocol == "HTTP/1.1" {
            assert_eq!(
                (forged, own),
                (vec![200, 200], vec![429]),
                "{protocol}: one bucket, the peer's"
            );
        } else {
            assert_eq!(
                (forged, own),
                (vec![429, 429], vec![429]),
                "{protocol}: the peer's bucket is empty"
            );
        }
        let elsewhere = statuses(&client, 1, |c| {
            c.get(envoy.url("/"))
                .header("x-forwarded-for", format!("203.0.113.{}", protocol.len()))
        })
        .await;
        assert_eq!(
            elsewhere,
            [200],
            "{protocol}: a real forwarded address has its own bucket"
        );
    }
    assert_no_trap(&envoy);
}

/// An upstream's `location: /orders/caf\xe9` is stored and replayed byte for byte; before,
/// it trapped the VM after the request already held its slot, claim and probe.
#[tokio::test(flavor = "multi_thread")]
async fn a_stored_response_header_that_is_not_utf8_is_replayed_byte_for_byte() {
    let upstream = Upstream::start().await;
    upstream.set_status(201);
    let config = r#"{"idempotency": {},
        "load_shedding": {"pools": [{"name": "all", "max_in_flight": 10}]},
        "circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}}, "trip": {"consecutive_failures": 1}}]}}"#;
    let envoy = envoy().filter("idem", config).start(&upstream).await;
    for (protocol, client) in clients() {
        let post = || {
            client
                .post(envoy.url("/orders"))
                .header("authorization", "alice")
                .header("idempotency-key", format!("order-{protocol}"))
                .header(RESPOND_HEADER, "location: /orders/caf%E9")
                .body("{}")
                .send()
        };
        let created: Response = post().await.unwrap();
        assert_eq!(created.status(), 201);
        let location = created
            .headers()
            .get("location")
            .map(|v| v.as_bytes().to_vec());
        assert_eq!(
            location.as_deref(),
            Some(&b"/orders/caf\xe9"[..]),
            "{protocol}"
        );
        let replay = post().await.unwrap();
        assert_eq!(replay.status(), 201);
        assert_eq!(
            replay
                .headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        assert_eq!(
            replay
                .headers()
                .get("location")
                .map(|v| v.as_bytes().to_vec()),
            location,
            "{protocol}"
        );
    }
    assert_eq!(upstream.count(), 2, "each order executed once");
    assert_eq!(
        envoy
            .stat("wasmcustom.resilience.idem.load_shedding.all.in_flight")
            .await,
        Some(0),
        "every slot came back"
    );
    assert_no_trap(&envoy);
}

/// Issue 15, defect 5: Envoy does not normalize paths unless told to, and an upstream that
/// does serves `/reports/` for every one of these.
#[tokio::test(flavor = "multi_thread")]
async fn other_spellings_of_a_path_meet_the_rule_written_for_it() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"rules": [{"name": "reports", "match": {"path_prefix": "/reports/"},
        "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}}"#;
    let envoy = envoy().filter("rl", config).start(&upstream).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: example");
    assert_eq!(http1(envoy.port, &get("/reports/a"), &[]).await.status, 200);
    for spelling in [
        "//reports/a",
        "/%72eports/a",
        "/x/../reports/a",
        "/x/%2e%2e/reports/a",
        "/reports%2Fa",
        "/./reports/a",
    ] {
        let response = http1(envoy.port, &get(spelling), &[]).await;
        assert_eq!(response.status, 429, "{spelling}: {}", response.text());
    }
    assert_eq!(http1(envoy.port, &get("/other"), &[]).await.status, 200);
    assert_eq!(
        upstream.count(),
        2,
        "only /reports/a and /other reached the upstream"
    );
    assert_no_trap(&envoy);
}

/// Found in review: only a header's first line was read. A rate-limit key sent on two lines is
/// ambiguous (which would the upstream take?): all such requests share one bucket, so rotating
/// the first line buys nothing; an idempotency key sent twice is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_header_sent_on_two_lines_buys_no_fresh_bucket_and_no_second_key() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"rules": [{"name": "k", "key": [{"header": "x-api-key"}],
        "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}, "idempotency": {}}"#;
    let envoy = envoy().filter("rl", config).start(&upstream).await;
    for (protocol, client) in clients() {
        let mut statuses = Vec::new();
        for i in 0..3 {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.append(
                "x-api-key",
                HeaderValue::from_str(&format!("rotate{i}-{protocol}")).unwrap(),
            );
            headers.append("x-api-key", HeaderValue::from_static("alice"));
            let response = client
                .get(envoy.url("/"))
                .headers(headers)
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        let first_try = if protocol == "HTTP/1.1" { 200 } else { 429 };
        assert_eq!(statuses, [first_try, 429, 429], "{protocol}");
        let mut keys = reqwest::header::HeaderMap::new();
        keys.append("idempotency-key", HeaderValue::from_static("a"));
        keys.append("idempotency-key", HeaderValue::from_static("b"));
        let twice = client
            .post(envoy.url("/charges"))
            .header("x-api-key", format!("bob-{protocol}"))
            .headers(keys)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(twice.status(), 400, "{protocol}");
    }
    assert_eq!(upstream.count(), 1);
    assert_no_trap(&envoy);
}
