//! Load shedding through real Envoy with several workers and a slow upstream.

use super::envoy::{envoy, Envoy};
use super::upstream::{Upstream, DELAY_HEADER};
use super::{fresh_connections, join_all};
use reqwest::Client;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Outcome {
    status: u16,
    shed_by: Option<String>,
    retry_after: Option<String>,
    elapsed: Duration,
    /// The body, when it is an RFC 9457 problem.
    problem: Option<serde_json::Value>,
}

/// Sends `n` requests at once to `path` with `headers`; returns what each got.
async fn burst(
    envoy: &Envoy,
    n: usize,
    path: &str,
    headers: &[(&'static str, &'static str)],
) -> Vec<Outcome> {
    let client = fresh_connections();
    let requests: Vec<_> = (0..n)
        .map(|_| {
            let mut request = client.get(envoy.url(path));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            async move {
                let started = Instant::now();
                let response = request.send().await.unwrap();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_owned())
                };
                let elapsed = started.elapsed();
                let (status, shed_by, retry_after) = (
                    response.status().as_u16(),
                    header("x-load-shed"),
                    header("retry-after"),
                );
                let problem = (header("content-type").as_deref()
                    == Some("application/problem+json"))
                .then_some(())
                .map(|()| response.bytes());
                let problem = match problem {
                    Some(body) => serde_json::from_slice(&body.await.unwrap()).ok(),
                    None => None,
                };
                Outcome {
                    status,
                    shed_by,
                    retry_after,
                    elapsed,
                    problem,
                }
            }
        })
        .collect();
    join_all(requests).await
}

fn admitted(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| o.status == 200).count()
}

async fn gauge(envoy: &Envoy, pool: &str, name: &str) -> Option<u64> {
    envoy
        .stat(&format!(
            "wasmcustom.resilience.ls.load_shedding.{pool}.{name}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn with_cap_l_and_3l_requests_the_upstream_never_sees_more_than_l() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(800));
    let config = r#"{"load_shedding": {"pools": [{"name": "all", "max_in_flight": 6}], "shed_at": {"high": 1, "normal": 1}}}"#;
    let envoy = envoy()
        .filter("ls", config)
        .concurrency(4)
        .start(&upstream)
        .await;

    let outcomes = burst(&envoy, 18, "/", &[]).await;
    assert_eq!(admitted(&outcomes), 6, "{outcomes:?}");
    assert_eq!(upstream.max_in_flight(), 6);
    assert_eq!(upstream.count(), 6);
    for shed in outcomes.iter().filter(|o| o.status != 200) {
        assert_eq!(shed.status, 503);
        assert_eq!(shed.shed_by.as_deref(), Some("pool=all; class=normal"));
        assert_eq!(shed.retry_after.as_deref(), Some("1"));
        assert_eq!(
            shed.problem,
            Some(serde_json::json!({
                "type": "urn:envoy-resilience:load-shedding:shed",
                "title": "Shed by load shedding",
                "status": 503,
                "detail": "shed by load shedding pool all, class normal",
            })),
            "an RFC 9457 problem by default"
        );
        assert!(
            shed.elapsed < Duration::from_millis(400),
            "shed at once, not queued: {:?}",
            shed.elapsed
        );
    }
    assert_eq!(gauge(&envoy, "all", "in_flight").await, Some(0));
    assert_eq!(gauge(&envoy, "all", "admitted").await, Some(6));
    assert_eq!(gauge(&envoy, "all", "shed.normal").await, Some(12));
    assert_eq!(gauge(&envoy, "all", "limit").await, Some(6));
}

const PRIORITIES: &str = r#"{"load_shedding": {"pools": [{"name": "all", "max_in_flight": 10}],
    "priority": {"header": "x-priority", "trusted_sources": ["127.0.0.1"]}}}"#;

#[tokio::test(flavor = "multi_thread")]
async fn critical_requests_pass_while_low_ones_are_shed() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(1_000));
    let envoy = envoy().filter("ls", PRIORITIES).start(&upstream).await;

    let low = burst(&envoy, 10, "/", &[("x-priority", "low")]);
    let critical = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        burst(&envoy, 5, "/", &[("x-priority", "critical")]).await
    };
    let (low, critical) = tokio::join!(low, critical);
    assert_eq!(admitted(&low), 5, "low is shed from half the cap");
    assert!(low
        .iter()
        .filter(|o| o.status == 503)
        .all(|o| o.shed_by.as_deref() == Some("pool=all; class=low")));
    assert_eq!(
        admitted(&critical),
        5,
        "critical passes while low is shed: {critical:?}"
    );
    assert_eq!(upstream.max_in_flight(), 10);
    assert_eq!(gauge(&envoy, "all", "shed.low").await, Some(5));
    assert_eq!(gauge(&envoy, "all", "shed.critical").await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_cannot_promote_themselves_from_untrusted_addresses() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(600));
    let untrusted = PRIORITIES.replace("127.0.0.1", "10.0.0.0/8");
    let envoy = envoy().filter("ls", &untrusted).start(&upstream).await;
    let outcomes = burst(&envoy, 12, "/", &[("x-priority", "critical")]).await;
    assert_eq!(
        admitted(&outcomes),
        8,
        "treated as normal: shed from 80% of 10"
    );
    assert!(outcomes
        .iter()
        .filter(|o| o.status == 503)
        .all(|o| o.shed_by.as_deref() == Some("pool=all; class=normal")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_aborted_requests_leave_nothing_in_flight() {
    let upstream = Upstream::start().await;
    let config = r#"{"load_shedding": {"pools": [{"name": "all", "max_in_flight": 100}], "shed_at": {"high": 1, "normal": 1}}}"#;
    let envoy = envoy()
        .filter("ls", config)
        .concurrency(4)
        .start(&upstream)
        .await;

    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .unwrap();
    let aborted: Vec<_> = (0..100)
        .map(|_| {
            impatient
                .get(envoy.url("/"))
                .header(DELAY_HEADER, "5000")
                .send()
        })
        .collect();
    let results = join_all(aborted).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.is_timeout())),
        "all 100 aborted mid-flight"
    );
    assert_eq!(
        upstream.count(),
        100,
        "all were admitted and reached the upstream before the clients gave up"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(gauge(&envoy, "all", "in_flight").await, Some(0));
    // The shared count is back to zero too: a full cap's worth is admitted again.
    upstream.set_delay(Duration::from_millis(300));
    assert_eq!(admitted(&burst(&envoy, 100, "/", &[]).await), 100);
    assert_eq!(gauge(&envoy, "all", "in_flight").await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_bulkhead_does_not_shed_another_pool() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(800));
    let config = r#"{"load_shedding": {"shed_at": {"high": 1, "normal": 1}, "pools": [
        {"name": "slow", "scope": {"match": {"path_prefix": "/slow/"}}, "max_in_flight": 3},
        {"name": "other", "scope": {"match": {"path_prefix": "/other/"}}, "max_in_flight": 3}]}}"#;
    let envoy = envoy().filter("ls", config).start(&upstream).await;
    let slow = burst(&envoy, 8, "/slow/x", &[]);
    let other = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        burst(&envoy, 3, "/other/x", &[]).await
    };
    let (slow, other) = tokio::join!(slow, other);
    assert_eq!(admitted(&slow), 3);
    assert!(slow
        .iter()
        .filter(|o| o.status == 503)
        .all(|o| o.shed_by.as_deref() == Some("pool=slow; class=normal")));
    assert_eq!(admitted(&other), 3, "the other pool has its own cap");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_adaptive_limit_falls_when_latency_rises_and_recovers_when_it_falls() {
    let upstream = Upstream::start().await;
    let config = r#"{"load_shedding": {"pools": [{"name": "api", "max_in_flight": 40,
        "adaptive": {"min_limit": 2, "sample_interval": "200ms", "min_rtt_window": "1h", "tolerance": 1.5}}]}}"#;
    let envoy = envoy().filter("ls", config).start(&upstream).await;
    let limit = || gauge(&envoy, "api", "limit");
    assert_eq!(limit().await, Some(40));

    // Eight clients keep requests going for `seconds` at the upstream's current delay.
    let load = |seconds: u64| {
        let url = envoy.url("/");
        async move {
            let client = Client::builder().no_proxy().build().unwrap();
            let clients: Vec<_> = (0..8)
                .map(|_| {
                    let (client, url) = (client.clone(), url.clone());
                    async move {
                        let until = Instant::now() + Duration::from_secs(seconds);
                        while Instant::now() < until {
                            let response = client.get(&url).send().await.unwrap();
                            if response.status() == 503 {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
                .collect();
            join_all(clients).await;
        }
    };
    upstream.set_delay(Duration::from_millis(5));
    load(2).await;
    let healthy = limit().await.unwrap();
    assert!(healthy >= 35, "fast upstream: limit {healthy}");

    upstream.set_delay(Duration::from_millis(250));
    load(3).await;
    let slow = limit().await.unwrap();
    assert_eq!(
        slow, 2,
        "slow upstream: the limit falls to min_limit (it stopped at 4)"
    );

    upstream.set_delay(Duration::from_millis(5));
    load(4).await;
    let recovered = limit().await.unwrap();
    assert!(
        recovered >= 30,
        "fast again: limit recovered to {recovered}"
    );
    eprintln!("adaptive limit: {healthy} (5 ms) -> {slow} (250 ms) -> {recovered} (5 ms)");
}

/// A slot expires with `slot_lease`: what a failed VM held comes back (found in review: after
/// a trap and a reload, 320 slots stayed taken until Envoy restarted). Shown here with a
/// request that outlives a 1 s lease: the pool has its slot back, and the late release frees
/// nothing twice, so the gauge ends at zero.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_expires_with_its_lease_and_the_gauge_stays_exact() {
    let upstream = Upstream::start().await;
    let config = r#"{"load_shedding": {"pools": [{"name": "all", "max_in_flight": 1}],
        "shed_at": {"high": 1, "normal": 1}, "slot_lease": "1s"}}"#;
    let envoy = envoy().filter("ls", config).start(&upstream).await;
    let url = envoy.url("/");
    let long = tokio::spawn(async move {
        fresh_connections()
            .get(url)
            .header(DELAY_HEADER, "3000")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        admitted(&burst(&envoy, 1, "/", &[]).await),
        0,
        "the slot is taken"
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(
        admitted(&burst(&envoy, 1, "/", &[]).await),
        1,
        "the lease ran out"
    );
    assert_eq!(long.await.unwrap().unwrap(), 200);
    assert_eq!(gauge(&envoy, "all", "expired").await, Some(1));
    assert_eq!(gauge(&envoy, "all", "in_flight").await, Some(0));
}

/// An `Upgrade` header is the client's to send, and Istio lets WebSocket upgrades through on
/// every route: a request carrying one, to an upstream that ignores it and answers 200, is
/// counted by the pool like any other. Only the requests `long_lived` names step out.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_header_does_not_take_a_request_out_of_a_pool() {
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(600));
    let envoy = envoy()
        .websocket_upgrades()
        .filter(
            "ls",
            r#"{"long_lived": {"match": [{"path": "/ws"}]},
                "load_shedding": {"pools": [{"name": "all", "max_in_flight": 2}],
                "shed_at": {"high": 1, "normal": 1, "low": 1}}}"#,
        )
        .start(&upstream)
        .await;
    let upgrade = [("connection", "upgrade"), ("upgrade", "websocket")];
    let outcomes = burst(&envoy, 6, "/", &upgrade).await;
    assert_eq!(admitted(&outcomes), 2, "{outcomes:?}");
    assert_eq!(
        outcomes.iter().filter(|o| o.status == 503).count(),
        4,
        "{outcomes:?}"
    );
    assert_eq!(upstream.count(), 2);
}
