//! What operators get when the filter's VM fails, under each of Envoy's `failure_policy`
//! values: the build with the `fault-injection` feature traps at a request carrying
//! `x-resilience-fault: trap`, on an Envoy with one worker (one VM serves every request).

use super::envoy::{envoy, Envoy};
use super::fresh_connections;
use super::rate_limit::statuses;
use super::upstream::Upstream;
use std::time::{Duration, Instant};

/// A bucket of 5 for everyone, none refilled during a test.
const FIVE: &str = r#"{"rate_limit": {"rules": [{"name": "r", "capacity": 5, "refill": {"tokens": 1, "interval": "1h"}}]}}"#;

async fn start(failure_policy: &'static str, upstream: &Upstream) -> Envoy {
    envoy()
        .concurrency(1)
        .trapping_build(failure_policy)
        .filter("fault", FIVE)
        .start(upstream)
        .await
}

/// The request that makes the VM trap: Envoy answers it itself.
async fn trap(envoy: &Envoy) -> u16 {
    let response = fresh_connections()
        .get(envoy.url("/"))
        .header("x-resilience-fault", "trap")
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_closed_answers_503_until_envoy_restarts() {
    let upstream = Upstream::start().await;
    let envoy = start("FAIL_CLOSED", &upstream).await;
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/"), 2, &[]).await,
        [200, 200]
    );
    assert_eq!(trap(&envoy).await, 503);
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/"), 5, &[]).await,
        [503; 5]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/"), 1, &[]).await,
        [503],
        "still, seconds later"
    );
    assert_eq!(
        upstream.count(),
        2,
        "nothing reached the upstream after the trap"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_open_lets_every_request_through_without_a_policy() {
    let upstream = Upstream::start().await;
    let envoy = start("FAIL_OPEN", &upstream).await;
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/"), 2, &[]).await,
        [200, 200]
    );
    assert_eq!(trap(&envoy).await, 503, "the request the VM failed on");
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/"), 8, &[]).await,
        [200; 8],
        "a bucket of 5 no longer refuses anything"
    );
    assert_eq!(upstream.count(), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_reload_answers_503_briefly_then_a_new_vm_serves_with_the_state_intact() {
    let upstream = Upstream::start().await;
    let envoy = start("FAIL_RELOAD", &upstream).await;
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/"), 3, &[]).await,
        [200; 3]
    );
    assert_eq!(trap(&envoy).await, 503);
    let failed_at = Instant::now();
    let client = fresh_connections();
    let mut refused = 0;
    loop {
        let status = client
            .get(envoy.url("/"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status != 503 {
            assert_eq!(status, 200, "the first request the new VM serves");
            break;
        }
        refused += 1;
        assert!(failed_at.elapsed() < Duration::from_secs(10), "no reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = failed_at.elapsed();
    assert!(
        recovered < Duration::from_secs(5),
        "served again after {recovered:?} ({refused} requests refused meanwhile)"
    );
    // 3 spent before the trap and 1 by the first request after it: shared data outlived the
    // VM, so the bucket has one token left, not five.
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/"), 2, &[]).await,
        [200, 429]
    );
    let reloads: u64 = envoy
        .admin("/stats?filter=vm_reload_success")
        .await
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.rsplit_once(": ")?.1.trim().parse::<u64>().ok())
        .sum();
    assert_eq!(reloads, 1, "Envoy counted the reload");
}
