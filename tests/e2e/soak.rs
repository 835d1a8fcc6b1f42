//! The chaos soak: real Envoy with 4 workers and all four policies in one instance, mixed
//! traffic over HTTP/1.1 and HTTP/2 with faults (clients that leave mid-request and
//! mid-response, an upstream that resets after taking a request, upstream timeouts, connect
//! failures, a failing upstream behind a breaker, bodies that arrive late), then the
//! invariants, from what clients and the upstream saw and
//! from the gauges. `SOAK_REQUESTS` requests (3,000 in `make test`; `make soak` runs 50,000).

use super::envoy::{envoy, Envoy};
use super::upstream::{Upstream, DELAY_HEADER, RESET_HEADER, STATUS_HEADER};
use super::wire::http1;
use super::{clients, METRICS_FLUSHED};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"{
    "load_shedding": {
        "pools": [{"name": "all", "max_in_flight": 40}],
        "priority": {"header": "x-priority", "trusted_sources": ["127.0.0.1"],
                     "rules": [{"match": {"path_prefix": "/batch/"}, "class": "low"}]}
    },
    "rate_limit": {"rules": [
        {"name": "limited", "match": {"path_prefix": "/limited/"}, "capacity": 50,
         "refill": {"tokens": 10, "interval": "1s"}},
        {"name": "per-key", "match": {"path_prefix": "/keyed/"}, "key": [{"header": "x-api-key"}],
         "capacity": 5, "refill": {"tokens": 1, "interval": "1s"}, "table_size": 64}
    ]},
    "idempotency": {"match": {"path_prefix": "/orders/"}, "lease": "10m", "body_timeout": "2s"},
    "circuit_breaker": {"breakers": [
        {"name": "flaky", "scope": {"match": {"path_prefix": "/flaky/"}},
         "trip": {"consecutive_failures": 5}, "open": {"duration": "200ms"},
         "half_open": {"max_probes": 2}}
    ]}
}"#;

/// Distinct API keys on /keyed/, and how many requests share one idempotency key.
const API_KEYS: u64 = 20;
const SENDS_PER_ORDER: u64 = 3;
const KINDS: u64 = 14;

#[derive(Default)]
struct Tally {
    /// Per kind of request: status (0: no response, the client left or the connection
    /// failed) and how many.
    statuses: HashMap<(&'static str, u16), u64>,
    /// Per API key, requests /keyed/ admitted.
    keyed_admitted: HashMap<u64, u64>,
    limited_admitted: u64,
    aborts: u64,
}

fn requests() -> u64 {
    std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3_000)
}

/// Sends request `i` of the mix and records what came back.
async fn send(i: u64, envoy: &Envoy, http: &reqwest::Client, tally: &Mutex<Tally>) {
    let kind = i % KINDS;
    let url = |path: &str| envoy.url(path);
    let (name, request) = match kind {
        0 => ("plain", http.get(url("/plain/"))),
        1 => ("batch", http.get(url("/batch/"))),
        2 => (
            "critical",
            http.get(url("/plain/")).header("x-priority", "critical"),
        ),
        3 => ("limited", http.get(url("/limited/"))),
        4 => (
            "keyed",
            http.get(url("/keyed/"))
                .header("x-api-key", (i / KINDS % API_KEYS).to_string()),
        ),
        5 => (
            "order",
            http.post(url("/orders/"))
                .header(
                    "idempotency-key",
                    format!("o{}", i / KINDS / SENDS_PER_ORDER),
                )
                .header(STATUS_HEADER, "201")
                .header(DELAY_HEADER, "20")
                .body("{\"item\": 1}"),
        ),
        6 => ("unkeyed-order", http.post(url("/orders/")).body("{}")),
        7 => {
            // The upstream fails in bursts of 8 of every 16: the breaker opens and probes.
            let status = if i / KINDS % 16 < 8 { "500" } else { "200" };
            (
                "flaky",
                http.get(url("/flaky/")).header(STATUS_HEADER, status),
            )
        }
        // The route gives up after 500 ms of silence: 504, the upstream had the request.
        8 => (
            "timeout",
            http.get(url("/idle/")).header(DELAY_HEADER, "700"),
        ),
        9 => ("connect-failure", http.get(url("/dead/"))),
        // The upstream takes a keyed POST, then resets: it may have executed, so the key stays
        // claimed and the next two sends of it get 409.
        11 => (
            "reset-order",
            http.post(url("/orders/"))
                .header(
                    "idempotency-key",
                    format!("r{}", i / KINDS / SENDS_PER_ORDER),
                )
                .header(RESET_HEADER, "1")
                .body("{}"),
        ),
        12 => {
            // A keyed POST whose body arrives late, but within body_timeout.
            let head = format!(
                "POST /orders/ HTTP/1.1\r\nhost: soak\r\nidempotency-key: slow{i}\r\nx-upstream-status: 201\r\ncontent-length: 10"
            );
            let parts: &[(Duration, &[u8])] = &[
                (Duration::ZERO, b"{\"a\":"),
                (Duration::from_millis(300), b" 1}  "),
            ];
            let status = http1(envoy.port, &head, parts).await.status;
            *tally
                .lock()
                .unwrap()
                .statuses
                .entry(("slow-body", status))
                .or_default() += 1;
            return;
        }
        10 => {
            // The client leaves while the upstream still works on the response.
            let request = http.get(url("/plain/slow")).header(DELAY_HEADER, "300");
            let left = tokio::time::timeout(Duration::from_millis(50), request.send())
                .await
                .is_err();
            let mut tally = tally.lock().unwrap();
            tally.aborts += u64::from(left);
            *tally.statuses.entry(("left-mid-response", 0)).or_default() += 1;
            return;
        }
        _ => {
            // A keyed POST whose body stops halfway: the client leaves mid-request.
            let head = format!(
                "POST /orders/ HTTP/1.1\r\nhost: soak\r\nidempotency-key: abandoned{i}\r\ncontent-length: 10"
            );
            let parts: &[(Duration, &[u8])] = &[
                (Duration::ZERO, b"{\"a\":"),
                (Duration::from_millis(500), b" 1}  "),
            ];
            let left =
                tokio::time::timeout(Duration::from_millis(100), http1(envoy.port, &head, parts))
                    .await
                    .is_err();
            let mut tally = tally.lock().unwrap();
            tally.aborts += u64::from(left);
            *tally.statuses.entry(("left-mid-request", 0)).or_default() += 1;
            return;
        }
    };
    let status = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
        Err(_) => 0,
    };
    let mut tally = tally.lock().unwrap();
    *tally.statuses.entry((name, status)).or_default() += 1;
    if status == 200 && kind == 3 {
        tally.limited_admitted += 1;
    }
    if status == 200 && kind == 4 {
        *tally
            .keyed_admitted
            .entry(i / KINDS % API_KEYS)
            .or_default() += 1;
    }
}

async fn gauge(envoy: &Envoy, name: &str) -> Option<u64> {
    envoy
        .stat(&format!("wasmcustom.resilience.soak.{name}"))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chaos_soak_keeps_every_invariant() {
    let total = requests();
    let upstream = Upstream::start().await;
    let envoy = Arc::new(
        envoy()
            .concurrency(4)
            .filter("soak", CONFIG)
            .start(&upstream)
            .await,
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let senders: Vec<_> = (0..32)
        .map(|sender| {
            let (envoy, tally, next) = (envoy.clone(), tally.clone(), next.clone());
            // Half the senders speak HTTP/2.
            let http = clients()[sender % 2].1.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        break;
                    }
                    send(i, &envoy, &http, &tally).await;
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    let elapsed = started.elapsed();
    // Let abandoned streams end (the slow upstream answers within 700 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::time::sleep(METRICS_FLUSHED).await;

    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let sent: u64 = tally.statuses.values().sum();
    assert_eq!(sent, total);

    // Nothing left in flight: every slot came back, however its stream ended.
    assert_eq!(gauge(&envoy, "load_shedding.all.in_flight").await, Some(0));

    // No rate limit exceeded: at most the capacity plus what refilled while the soak ran.
    let refilled = |per_second: u64| per_second * (elapsed.as_secs() + 1);
    assert!(
        tally.limited_admitted <= 50 + refilled(10),
        "{} admitted under /limited/ in {elapsed:?}",
        tally.limited_admitted
    );
    for (key, admitted) in &tally.keyed_admitted {
        assert!(
            *admitted <= 5 + refilled(1),
            "API key {key}: {admitted} admitted in {elapsed:?}"
        );
    }

    // One execution per idempotency key: the upstream never saw a key twice.
    let mut executions: HashMap<String, u64> = HashMap::new();
    for received in upstream.received() {
        if let Some(key) = received.header("idempotency-key") {
            *executions.entry(key.to_owned()).or_default() += 1;
        }
    }
    let repeated: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "executed more than once: {repeated:?}");
    assert!(
        !executions.keys().any(|key| key.starts_with("abandoned")),
        "a body that never completed reached the upstream"
    );

    // Every answer is one its kind may get.
    for ((kind, status), n) in &tally.statuses {
        let allowed: &[u16] = match *kind {
            "plain" | "batch" | "critical" | "unkeyed-order" => &[200, 503],
            "limited" | "keyed" => &[200, 429, 503],
            "order" => &[201, 409, 503],
            "reset-order" => &[503, 409],
            "slow-body" => &[201, 503],
            "flaky" => &[200, 500, 503],
            "timeout" => &[504, 503],
            "connect-failure" => &[503],
            _ => &[0],
        };
        assert!(allowed.contains(status), "{n} {kind} requests got {status}");
    }
    assert!(
        !tally.statuses.contains_key(&("critical", 503)),
        "a critical request was shed"
    );

    // The breaker opened and closed again on the flaky upstream.
    assert!(gauge(&envoy, "circuit_breaker.flaky.transitions_to_open").await >= Some(1));

    let rss = envoy.rss_bytes();
    assert!(rss < 300 << 20, "Envoy RSS {} MiB", rss >> 20);
    assert!(!envoy.log().contains("panicked"));
    eprintln!(
        "soak: {sent} requests in {elapsed:?}, {} clients left early, {} keys executed once, RSS {} MiB; statuses {:?}",
        tally.aborts,
        executions.len(),
        rss >> 20,
        tally.statuses
    );
}
