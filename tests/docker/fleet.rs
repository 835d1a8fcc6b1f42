//! The fleet (envoy/fleet/docker-compose.yaml): three Envoys sharing idempotency keys
//! through a three-member etcd cluster, each asserting what the upstream saw.

use crate::compose::{stat, Project};
use crate::{fresh_connections, join_all};
use std::time::{Duration, Instant};

const FILE: &str = "envoy/fleet/docker-compose.yaml";
const PORTS: &[&str] = &[
    "ENVOY1_PORT",
    "ENVOY2_PORT",
    "ENVOY3_PORT",
    "ADMIN1_PORT",
    "ADMIN2_PORT",
    "ADMIN3_PORT",
];

struct Fleet {
    project: Project,
    /// Each Envoy's listener.
    fronts: Vec<String>,
    admins: Vec<String>,
}

impl Fleet {
    async fn up(test: &str) -> Fleet {
        let project = Project::up(test, FILE, PORTS);
        let services = ["envoy1", "envoy2", "envoy3"];
        let fronts = services.iter().map(|s| project.url(s, 10000)).collect();
        let admins: Vec<String> = services.iter().map(|s| project.url(s, 9901)).collect();
        for admin in &admins {
            project.wait_until_ready(admin).await;
        }
        let fleet = Fleet {
            project,
            fronts,
            admins,
        };
        fleet.wait_for_etcd().await;
        fleet
    }

    /// Until every Envoy has claimed a key through etcd: the cluster has a leader.
    async fn wait_for_etcd(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, front) in self.fronts.iter().enumerate() {
            // A refusal gives the key back, so the same key is tried again.
            let key = format!("warm-up-{i}");
            loop {
                let response = post(front, &key, "{}", None).await;
                if response.status == 200 {
                    break;
                }
                assert!(Instant::now() < deadline, "etcd did not answer in 30 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn metric(&self, envoy: usize, name: &str) -> u64 {
        stat(
            &self.admins[envoy],
            &format!("wasmcustom.resilience.fleet.{name}"),
        )
        .await
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    replayed: bool,
    content_type: Option<String>,
    body: Vec<u8>,
}

async fn post(front: &str, key: &str, body: &str, delay_ms: Option<u64>) -> Answer {
    let mut request = fresh_connections()
        .post(format!("{front}/orders"))
        .header("idempotency-key", key)
        .body(body.to_owned());
    if let Some(delay) = delay_ms {
        request = request.header("x-envoy-fault-delay-request", delay.to_string());
    }
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    Answer {
        status: response.status().as_u16(),
        replayed: header("idempotent-replayed").as_deref() == Some("true"),
        content_type: header("content-type"),
        body: response.bytes().await.unwrap().to_vec(),
    }
}

/// The stored response, once the executing Envoy's write has reached etcd: it goes out
/// within a tick (10 ms) of the response, and until it lands the key is still in flight.
async fn replay(front: &str, key: &str, body: &str) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let answer = post(front, key, body, None).await;
        if answer.replayed || Instant::now() > deadline {
            assert!(answer.replayed, "{answer:?}");
            return answer;
        }
        assert_eq!(answer.status, 409, "{answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 60 identical POSTs at once, 20 through each Envoy, against a slow upstream: one
/// execution; every client gets the stored response or 409; replays afterwards from every
/// Envoy are byte-identical to the first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_identical_posts_over_three_envoys_execute_once() {
    let fleet = Fleet::up("fleet-sixty").await;
    let requests: Vec<_> = (0..60)
        .map(|i| {
            let front = fleet.fronts[i % 3].clone();
            async move { post(&front, "order-60", r#"{"qty": 60}"#, Some(500)).await }
        })
        .collect();
    let answers = join_all(requests).await;
    let executed: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == 200 && !a.replayed)
        .collect();
    assert_eq!(executed.len(), 1, "{answers:#?}");
    for answer in &answers {
        assert!(
            answer.status == 409
                || (answer.status == 200 && (answer.replayed || answer == executed[0])),
            "{answer:?}"
        );
    }
    let first = executed[0];
    for front in &fleet.fronts {
        let replay = replay(front, "order-60", r#"{"qty": 60}"#).await;
        assert_eq!(
            (replay.status, &replay.content_type, &replay.body),
            (first.status, &first.content_type, &first.body)
        );
    }
    let seen = fleet.project.upstream_saw(4).await;
    let orders: Vec<_> = seen
        .iter()
        .filter(|s| s.idempotency_key.as_deref() == Some("order-60"))
        .collect();
    assert_eq!(orders.len(), 1, "the upstream saw {orders:#?}");
}

/// Keys sent twice, each time through another Envoy, while one etcd member is killed and
/// later restarted: no key is ever executed twice, and the fleet keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_killed_mid_run_never_yields_two_executions() {
    let fleet = Fleet::up("fleet-member").await;
    let mut answers = Vec::new();
    for round in 0..3 {
        if round == 1 {
            fleet.project.compose(&["kill", "etcd2"]);
        }
        if round == 2 {
            fleet.project.compose(&["start", "etcd2"]);
        }
        for i in 0..20 {
            let key = format!("member-{round}-{i}");
            for attempt in 0..2 {
                let front = &fleet.fronts[(i + attempt) % 3];
                let mut answer = post(front, &key, "{}", None).await;
                // A key still in flight (its record's write on the way while a member is
                // down): the client retries after Retry-After, as it is told.
                if answer.status == 409 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    answer = post(front, &key, "{}", None).await;
                }
                answers.push((key.clone(), answer));
            }
        }
    }
    let seen = fleet.project.upstream_saw(55).await;
    let mut executions = std::collections::HashMap::<String, usize>::new();
    for s in &seen {
        if let Some(key) = s
            .idempotency_key
            .as_ref()
            .filter(|k| k.starts_with("member-"))
        {
            *executions.entry(key.clone()).or_default() += 1;
        }
    }
    assert!(
        executions.values().all(|n| *n == 1),
        "executed twice: {executions:?}"
    );
    let served = answers.iter().filter(|(_, a)| a.status == 200).count();
    let unavailable = answers.iter().filter(|(_, a)| a.status == 503).count();
    let unexpected: Vec<_> = answers
        .iter()
        .filter(|(_, a)| a.status != 200 && a.status != 503)
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    // A dead member costs at most the calls that reached it before its health check failed.
    assert!(
        served >= 110,
        "{served} of 120 served, {unavailable} refused"
    );
}

/// With etcd stopped, a covered request is refused (deny) within the timeout and never
/// reaches the upstream; once etcd is back, the same request is served, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_etcd_stopped_requests_are_refused_within_the_timeout_then_served() {
    let fleet = Fleet::up("fleet-down").await;
    fleet
        .project
        .compose(&["stop", "-t", "1", "etcd1", "etcd2", "etcd3"]);
    for front in &fleet.fronts {
        let started = Instant::now();
        let answer = post(front, "while-down", "{}", None).await;
        let took = started.elapsed();
        assert_eq!(answer.status, 503, "{answer:?}");
        assert!(String::from_utf8_lossy(&answer.body).contains("store-unavailable"));
        // The store's timeout is 500 ms; the rest is the way there and back.
        assert!(took < Duration::from_millis(800), "refused after {took:?}");
    }
    assert!(fleet.metric(0, "idempotency.store_unavailable").await >= 1);
    fleet.project.compose(&["start", "etcd1", "etcd2", "etcd3"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        let answer = post(&fleet.fronts[0], "while-down", "{}", None).await;
        if answer.status == 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(served.status, 200, "{served:?}");
    replay(&fleet.fronts[1], "while-down", "{}").await;
    let seen = fleet.project.upstream_saw(1).await;
    let executions = seen
        .iter()
        .filter(|s| s.idempotency_key.as_deref() == Some("while-down"))
        .count();
    assert_eq!(executions, 1);
}
