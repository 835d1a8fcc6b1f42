//! Configuration pushed while traffic flows: a listener update from the file Envoy watches,
//! under the same `vm_id`, with rules renamed, a table resized, a policy removed and added
//! back, and a configuration Envoy must refuse.

use super::envoy::{envoy, Envoy, Filter};
use super::fresh_connections;
use super::rate_limit::statuses;
use super::upstream::Upstream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const INSTANCE: &str = "reload";

fn filter(config: &str) -> Filter {
    Filter {
        name: INSTANCE.to_owned(),
        config: config.to_owned(),
    }
}

/// Rule `r` (a bucket of 5 for everyone under /limited/), `keyed` (3 per `x-client` under
/// /keyed/, in a table of `table_size`), a pool, a breaker, and idempotency when `idempotency` is set.
fn config(rule: &str, table_size: u32, idempotency: bool) -> String {
    format!(
        r#"{{
        "rate_limit": {{"rules": [
            {{"name": "{rule}", "match": {{"path_prefix": "/limited/"}}, "capacity": 5, "refill": {{"tokens": 1, "interval": "1h"}}}},
            {{"name": "keyed", "match": {{"path_prefix": "/keyed/"}}, "key": [{{"header": "x-client"}}], "capacity": 3,
              "refill": {{"tokens": 1, "interval": "1h"}}, "table_size": {table_size}}}]}},
        "load_shedding": {{"pools": [{{"name": "p", "max_in_flight": 200}}]}},
        "circuit_breaker": {{"breakers": [{{"name": "b", "scope": {{"match": {{}}}}, "trip": {{"consecutive_failures": 50}}}}]}}
        {idempotency}}}"#,
        idempotency = if idempotency {
            r#", "idempotency": {}"#
        } else {
            ""
        }
    )
}

const CLIENTS: usize = 20;

/// How many of 4 requests under /keyed/ each of the clients got through.
async fn keyed_admissions(envoy: &Envoy) -> Vec<usize> {
    let client = fresh_connections();
    let mut admitted = Vec::new();
    for id in 0..CLIENTS {
        let mut n = 0;
        for _ in 0..4 {
            let request = client
                .get(envoy.url("/keyed/"))
                .header("x-client", id.to_string());
            if request.send().await.unwrap().status() == 200 {
                n += 1;
            }
        }
        admitted.push(n);
    }
    admitted
}

/// How many orders the upstream executed.
fn orders(upstream: &Upstream) -> usize {
    upstream
        .received()
        .iter()
        .filter(|r| r.uri == "/orders")
        .count()
}

/// Posts `/orders` with `key`: the status, and whether it was a replay.
async fn order(envoy: &Envoy, key: &str) -> (u16, bool) {
    let response = fresh_connections()
        .post(envoy.url("/orders"))
        .header("idempotency-key", key)
        .body("{}")
        .send()
        .await
        .unwrap();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (response.status().as_u16(), replayed)
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_pushed_under_traffic_keeps_what_the_docs_say() {
    let upstream = Upstream::start().await;
    let mut envoy = envoy()
        .concurrency(4)
        .dynamic_listener()
        .filter(INSTANCE, &config("r", 100, true))
        .start(&upstream)
        .await;

    // Traffic that flows through every push: each request must get its 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let url = envoy.url("/traffic");
        tokio::spawn(async move {
            let client = fresh_connections();
            while !stop.load(Ordering::SeqCst) {
                let ok = client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                sent.fetch_add(1, Ordering::SeqCst);
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/limited/"), 3, &[]).await,
        [200; 3]
    );
    let spent = keyed_admissions(&envoy).await;
    assert!(spent.iter().all(|&n| n <= 3), "{spent:?}");
    assert_eq!(order(&envoy, "k1").await, (200, false));

    // The same rule, a resized table, idempotency removed.
    envoy
        .push_filters(&[filter(&config("r", 200, false))])
        .await;
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/limited/"), 3, &[]).await,
        [200, 200, 429],
        "rule r kept its name: its bucket, and what was spent, carried over"
    );
    // A resized table places each key again: a key whose slot moved starts from a full
    // bucket (or shares the one it lands on), a key whose slot stayed keeps its spend.
    let after = keyed_admissions(&envoy).await;
    assert!(
        after.iter().all(|&n| n <= 3),
        "at most one capacity more per client across the change: {after:?}"
    );
    assert!(
        after.iter().sum::<usize>() > 0,
        "some slots moved: {after:?}"
    );
    assert_eq!(order(&envoy, "k1").await, (200, false));
    assert_eq!(orders(&upstream), 2, "no idempotency: executed again");

    // Idempotency back, and rule r renamed.
    envoy
        .push_filters(&[filter(&config("r2", 200, true))])
        .await;
    assert_eq!(
        order(&envoy, "k1").await,
        (200, true),
        "the record of k1 outlived the policy's removal: replayed"
    );
    assert_eq!(orders(&upstream), 2, "the replay reached no upstream");
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/limited/"), 6, &[]).await,
        [200, 200, 200, 200, 200, 429],
        "a renamed rule is a new bucket"
    );

    // A configuration the filter refuses: Envoy keeps the listener it had.
    let rejected = envoy.stat("listener_manager.lds.update_rejected").await;
    envoy
        .push_filters_expecting_rejection(&[filter(r#"{"rate_limit": {"rules": "nope"}}"#)])
        .await;
    assert_eq!(
        envoy.stat("listener_manager.lds.update_rejected").await,
        rejected.map(|n| n + 1)
    );
    assert_eq!(
        statuses(&fresh_connections(), &envoy.url("/limited/"), 1, &[]).await,
        [429],
        "the previous configuration still enforces"
    );

    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert!(sent >= 50, "only {sent} requests flowed");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across the pushes"
    );
    let log = envoy.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        log.matches("Wasm VM failed").count(),
        1,
        "no VM failed but the refused configuration's, which Envoy never loaded: {log}"
    );
    assert!(log.contains("invalid configuration at `rate_limit.rules`"));
}
