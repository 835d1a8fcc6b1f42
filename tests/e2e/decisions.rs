//! Dry run for every policy, and the decisions operators see: the decision header, and the
//! filter state the demo's access log prints.

use super::envoy::{envoy, Envoy};
use super::upstream::{
    Upstream, DELAY_HEADER, H2_ROUTE_HEADER, RESPOND_HEADER, STATUS_HEADER, TRAILER_HEADER,
};
use super::wire::http2;
use super::{fresh_connections, METRICS_FLUSHED};
use reqwest::{Client, Response};
use std::time::Duration;

const DECISION: &str = "x-resilience-decision";

/// Every policy in dry run, in the instance the demo's access log reads (`demo`).
const ALL_SHADOW: &str = r#"{
    "decision_header": "x-resilience-decision",
    "load_shedding": {"pools": [{"name": "p", "max_in_flight": 1, "shadow": true}],
        "shed_at": {"high": 1, "normal": 1}},
    "rate_limit": {"rules": [{"name": "r", "shadow": true, "match": {"path_prefix": "/limited/"},
        "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]},
    "idempotency": {"shadow": true},
    "circuit_breaker": {"breakers": [{"name": "b", "shadow": true, "scope": {"match": {"path_prefix": "/flaky/"}},
        "trip": {"consecutive_failures": 2}, "open": {"duration": "1m"}}]}
}"#;

/// The status, and the decision header's only value.
async fn seen(response: Response) -> (u16, Option<String>) {
    let values: Vec<String> = response
        .headers()
        .get_all(DECISION)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert!(values.len() <= 1, "one decision header: {values:?}");
    (response.status().as_u16(), values.into_iter().next())
}

async fn get(client: &Client, envoy: &Envoy, path: &str) -> (u16, Option<String>) {
    seen(client.get(envoy.url(path)).send().await.unwrap()).await
}

async fn post(client: &Client, envoy: &Envoy, key: &str) -> (u16, Option<String>) {
    let request = client
        .post(envoy.url("/orders"))
        .header("idempotency-key", key)
        .body("{}");
    seen(request.send().await.unwrap()).await
}

/// The demo access log's lines for `path`, as `(status, details, decision)`.
async fn logged(envoy: &Envoy, path: &str) -> Vec<(String, String, String)> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    envoy
        .log()
        .lines()
        .filter_map(|line| {
            let rest = line
                .split_once(' ')?
                .1
                .strip_prefix(path)?
                .strip_prefix(' ')?;
            let mut fields = rest.splitn(3, ' ');
            let status = fields.next()?.to_owned();
            let details = fields.next()?.to_owned();
            let decision = fields.next()?.strip_prefix("decision=")?.to_owned();
            Some((status, details, decision))
        })
        .collect()
}

#[tokio::test]
async fn every_policy_in_dry_run_refuses_nothing_and_names_what_it_would_have_refused() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("demo", ALL_SHADOW)
        .demo_access_log()
        .start(&upstream)
        .await;
    let client = fresh_connections();
    // An upstream's decision header never reaches the client, in the response's trailers
    // either, where gRPC clients read the filter's decisions.
    let response = http2(
        envoy.port,
        "GET",
        "/trailers",
        &[
            (H2_ROUTE_HEADER, b"h2"),
            (
                TRAILER_HEADER,
                b"x-resilience-decision: circuit_breaker;outcome=open",
            ),
            (TRAILER_HEADER, b"x-checksum: abc"),
        ],
        Vec::new(),
        &[],
    )
    .await;
    let trailers: Vec<&str> = response.trailers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(response.status, 200);
    assert_eq!(
        trailers,
        ["x-checksum"],
        "the upstream's decision trailer is gone"
    );

    // The pool's one slot is taken, and the rule's one token.
    let slow = {
        let request = client
            .get(envoy.url("/limited/slow"))
            .header(DELAY_HEADER, "1500");
        tokio::spawn(async move { seen(request.send().await.unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let would_shed_and_limit = (
        200,
        Some(
            r#"load_shedding;outcome=shed;pool="p";class=normal;shadow, rate_limit;outcome=limited;rule="r";shadow"#
                .to_owned(),
        ),
    );
    assert_eq!(
        get(&client, &envoy, "/limited/second").await,
        would_shed_and_limit
    );
    assert_eq!(slow.await.unwrap(), (200, None));

    assert_eq!(post(&client, &envoy, "k").await, (200, None));
    assert_eq!(
        post(&client, &envoy, "k").await,
        (200, Some("idempotency;outcome=replayed;shadow".to_owned())),
        "the duplicate executed again"
    );

    for _ in 0..2 {
        let request = client
            .get(envoy.url("/flaky/"))
            .header(STATUS_HEADER, "500");
        assert_eq!(seen(request.send().await.unwrap()).await, (500, None));
    }
    let request = client
        .get(envoy.url("/flaky/"))
        .header(STATUS_HEADER, "500");
    assert_eq!(
        seen(request.send().await.unwrap()).await,
        (
            500,
            Some(r#"circuit_breaker;outcome=open;breaker="b";shadow"#.to_owned())
        ),
        "the open breaker let it through to the upstream"
    );

    let paths: Vec<String> = upstream.received().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(
        paths,
        [
            "/trailers",
            "/limited/slow",
            "/limited/second",
            "/orders",
            "/orders",
            "/flaky/",
            "/flaky/",
            "/flaky/"
        ],
        "the upstream saw every request"
    );
    tokio::time::sleep(METRICS_FLUSHED).await;
    for (stat, expected) in [
        ("load_shedding.p.shadow_shed.normal", 1),
        ("load_shedding.p.shed.normal", 0),
        ("rate_limit.r.shadow_limited", 1),
        ("rate_limit.r.limited", 0),
        ("idempotency.shadow_passed", 1),
        ("idempotency.replays", 1),
        ("circuit_breaker.b.shadow_rejected", 1),
        ("circuit_breaker.b.rejected", 0),
        ("circuit_breaker.b.transitions_to_open", 1),
        ("load_shedding.p.in_flight", 0),
    ] {
        let name = format!("wasmcustom.resilience.demo.{stat}");
        assert_eq!(envoy.stat(&name).await, Some(expected), "{name}");
    }
    assert!(envoy.log().contains("would refuse GET /flaky/"));

    assert_eq!(
        logged(&envoy, "/limited/second").await,
        [(
            "200".to_owned(),
            "via_upstream".to_owned(),
            would_shed_and_limit.1.clone().unwrap()
        )]
    );
    let orders = logged(&envoy, "/orders").await;
    assert_eq!(
        orders
            .iter()
            .map(|(_, _, d)| d.as_str())
            .collect::<Vec<_>>(),
        ["-", "idempotency;outcome=replayed;shadow"]
    );
}

#[tokio::test]
async fn an_enforced_refusal_names_its_policy_and_rule_in_the_header_and_the_access_log() {
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter(
            "demo",
            r#"{
                "decision_header": "x-resilience-decision",
                "rate_limit": {"rules": [
                    {"name": "trial", "shadow": true, "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}},
                    {"name": "per-client", "key": ["client_address"], "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}}
                ]},
                "idempotency": {"required": true}
            }"#,
        )
        .demo_access_log()
        .start(&upstream)
        .await;
    let client = fresh_connections();
    // The header is the filter's alone: one an upstream sends never reaches the client.
    let spoofed = client.get(envoy.url("/a")).header(
        RESPOND_HEADER,
        "x-resilience-decision: circuit_breaker;outcome=open",
    );
    assert_eq!(seen(spoofed.send().await.unwrap()).await, (200, None));
    // Two lines of it too (Envoy's replace would keep the second).
    let spoofed = client
        .get(envoy.url("/b"))
        .header(
            RESPOND_HEADER,
            "x-resilience-decision: circuit_breaker;outcome=open",
        )
        .header(
            RESPOND_HEADER,
            "x-resilience-decision: load_shedding;outcome=shed",
        );
    assert_eq!(
        seen(spoofed.send().await.unwrap()).await,
        (
            200,
            Some(r#"rate_limit;outcome=limited;rule="trial";shadow"#.to_owned())
        )
    );
    let refused = (
        429,
        Some(
            r#"rate_limit;outcome=limited;rule="trial";shadow, rate_limit;outcome=limited;rule="per-client""#
                .to_owned(),
        ),
    );
    assert_eq!(get(&client, &envoy, "/c").await, refused);
    assert_eq!(upstream.count(), 2);
    assert_eq!(
        logged(&envoy, "/c").await,
        [(
            "429".to_owned(),
            "resilience_rate_limited".to_owned(),
            refused.1.unwrap()
        )]
    );
    assert_eq!(
        logged(&envoy, "/a").await,
        [("200".to_owned(), "via_upstream".to_owned(), "-".to_owned())]
    );
}
