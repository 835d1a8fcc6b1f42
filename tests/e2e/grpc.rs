//! gRPC calls through Envoy, from a real gRPC client to a real gRPC server (grpcio, in the
//! project's virtualenv; see `grpc_peer.py`): outcomes come from `grpc-status`, refusals are
//! gRPC answers a gRPC client acts on.

use super::envoy::{envoy, venv_python, Envoy};
use super::upstream::Upstream;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/grpc_peer.py")
}

/// The gRPC server, and every call it received, in order.
struct GrpcServer {
    port: u16,
    calls: Arc<Mutex<Vec<Value>>>,
    _child: Child,
}

impl GrpcServer {
    async fn start() -> GrpcServer {
        let mut child = Command::new(venv_python())
            .arg(peer_script())
            .arg("serve")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the gRPC server (run `make setup` for grpcio)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next_line().await.unwrap().expect("the server's port");
        let port = serde_json::from_str::<Value>(&first).unwrap()["port"]
            .as_u64()
            .unwrap() as u16;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        GrpcServer {
            port,
            calls,
            _child: child,
        }
    }

    /// How many calls of `method` the server received.
    fn received(&self, method: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c["method"] == method)
            .count()
    }
}

/// One call through Envoy by grpcio's client; `retries`: attempts its retry policy allows on
/// `UNAVAILABLE` (0: none).
async fn call(envoy: &Envoy, method: &str, metadata: &[(&str, &str)], retries: u32) -> Value {
    calls(&target(envoy), method, metadata, retries, 1)
        .await
        .remove(0)
}

/// Envoy's listener as grpcio's client names it: `host:port`.
fn target(envoy: &Envoy) -> String {
    let url = envoy.url("");
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// `count` calls one after another from one client, milliseconds apart.
async fn calls(
    target: &str,
    method: &str,
    metadata: &[(&str, &str)],
    retries: u32,
    count: usize,
) -> Vec<Value> {
    let mut command = Command::new(venv_python());
    command
        .arg(peer_script())
        .arg("call")
        .arg(target)
        .arg(method)
        .args(["--body", "order", "--retries", &retries.to_string()])
        .args(["--count", &count.to_string()]);
    for (name, value) in metadata {
        command.args(["--metadata", &format!("{name}={value}")]);
    }
    let output = command.output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
        .stdout
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).unwrap())
        .collect()
}

async fn start(config: &str) -> (Envoy, GrpcServer, Upstream) {
    let server = GrpcServer::start().await;
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .filter("grpc", config)
        .grpc_upstream(server.port)
        .start(&upstream)
        .await;
    (envoy, server, upstream)
}

/// Issue 17: six `UNAVAILABLE` answers (HTTP 200 every one) left a breaker closed. Now the
/// breaker reads `grpc-status`: codes outside its set (here `NOT_FOUND`) are successes, three
/// `UNAVAILABLE` in a row open it, and the open breaker answers `UNAVAILABLE` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_service_failing_with_unavailable_trips_the_breaker() {
    let (envoy, server, _upstream) = start(
        r#"{"circuit_breaker": {"breakers": [{"name": "orders", "scope": {"match": {}},
            "trip": {"consecutive_failures": 3}, "open": {"duration": "30s"}}]}}"#,
    )
    .await;
    for _ in 0..4 {
        let answer = call(&envoy, "Create", &[("fail", "NOT_FOUND")], 0).await;
        assert_eq!(answer["code"], "NOT_FOUND", "{answer}");
    }
    assert_eq!(call(&envoy, "Create", &[], 0).await["code"], "OK");
    for _ in 0..3 {
        let answer = call(&envoy, "Create", &[("fail", "UNAVAILABLE")], 0).await;
        assert_eq!(answer["details"], "failed on purpose", "{answer}");
    }
    let refused = call(&envoy, "Create", &[], 0).await;
    assert_eq!(
        (&refused["code"], &refused["details"]),
        (
            &Value::from("UNAVAILABLE"),
            &Value::from("circuit breaker orders is open")
        ),
        "{refused}"
    );
    assert_eq!(refused["trailing"]["x-circuit-breaker"], "orders");
    let pushback: u64 = refused["trailing"]["grpc-retry-pushback-ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((20_000..=30_000).contains(&pushback), "{refused}");
    assert_eq!(
        server.received("Create"),
        8,
        "the refused call never reached it"
    );
}

/// A rate-limited gRPC call gets `RESOURCE_EXHAUSTED`, which gRPC clients do not retry, with
/// the wait in `grpc-retry-pushback-ms`; the same refusal configured as `UNAVAILABLE` is
/// retried by the same client (its retry policy names `UNAVAILABLE`) after the pushback, and
/// then admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_grpc_call_gets_resource_exhausted_and_is_not_retried() {
    let rule =
        r#""rules": [{"name": "calls", "capacity": 1, "refill": {"tokens": 1, "interval": "3s"}}]"#;
    let (envoy, server, _upstream) = start(&format!(r#"{{"rate_limit": {{{rule}}}}}"#)).await;
    let answers = calls(&target(&envoy), "Create", &[], 5, 2).await;
    assert_eq!(answers[0]["code"], "OK");
    let refused = &answers[1];
    assert_eq!(
        (&refused["code"], &refused["details"]),
        (
            &Value::from("RESOURCE_EXHAUSTED"),
            &Value::from("rate limited by rule calls")
        ),
        "{refused}"
    );
    assert_eq!(refused["trailing"]["grpc-retry-pushback-ms"], "3000");
    assert!(refused["trailing"]["ratelimit"].is_string(), "{refused}");
    assert!(refused["elapsed_ms"].as_u64().unwrap() < 1000, "{refused}");
    assert_eq!(server.received("Create"), 1);
    let limited = envoy
        .stat("wasmcustom.resilience.grpc.rate_limit.calls.limited")
        .await;
    assert_eq!(limited, Some(1), "one attempt: the client did not retry");

    let (envoy, server, _upstream) = start(&format!(
        r#"{{"rate_limit": {{{rule}, "limited_response": {{"grpc_status": "UNAVAILABLE"}}}}}}"#
    ))
    .await;
    let answers = calls(&target(&envoy), "Create", &[], 5, 2).await;
    assert_eq!(answers[0]["code"], "OK");
    let retried = &answers[1];
    assert_eq!(retried["code"], "OK", "{retried}");
    assert!(
        retried["elapsed_ms"].as_u64().unwrap() >= 2500,
        "retried after the pushback: {retried}"
    );
    let limited = envoy
        .stat("wasmcustom.resilience.grpc.rate_limit.calls.limited")
        .await;
    assert_eq!(limited, Some(1));
    assert_eq!(server.received("Create"), 2);
}

/// A unary call retried with the same `idempotency-key` metadata reaches the server once.
/// Its response cannot be replayed (a Wasm filter's local reply to a gRPC call is
/// trailers-only: no message), so the retry gets `ALREADY_EXISTS`; a retry while the first
/// is still running gets `ABORTED`, with the wait as pushback. A call that failed
/// (`UNAVAILABLE`) frees its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unary_call_with_an_idempotency_key_executes_once() {
    let (envoy, server, _upstream) =
        start(r#"{"idempotency": {"match": {"path_prefix": "/demo.Orders/Create"}}}"#).await;
    let slow = {
        let target = target(&envoy);
        tokio::spawn(async move {
            let metadata = [("idempotency-key", "o-1"), ("delay-ms", "3000")];
            calls(&target, "Create", &metadata, 0, 1).await.remove(0)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.received("Create") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first call never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let in_flight = call(&envoy, "Create", &[("idempotency-key", "o-1")], 0).await;
    assert_eq!(in_flight["code"], "ABORTED", "{in_flight}");
    assert!(in_flight["trailing"]["grpc-retry-pushback-ms"].is_string());
    let first = slow.await.unwrap();
    assert_eq!(
        (&first["code"], &first["messages"][0]),
        (&Value::from("OK"), &Value::from("created:order")),
        "{first}"
    );
    let again = call(&envoy, "Create", &[("idempotency-key", "o-1")], 0).await;
    assert_eq!(again["code"], "ALREADY_EXISTS", "{again}");
    assert!(
        again["details"]
            .as_str()
            .unwrap()
            .starts_with("idempotency:not-replayable"),
        "{again}"
    );
    assert_eq!(server.received("Create"), 1);
    // A call the server failed frees its key, as a 5xx does: the retry executes.
    let key = ("idempotency-key", "o-2");
    let failed = call(&envoy, "Create", &[key, ("fail", "UNAVAILABLE")], 0).await;
    assert_eq!(failed["code"], "UNAVAILABLE", "{failed}");
    let retried = call(&envoy, "Create", &[key], 0).await;
    assert_eq!(retried["code"], "OK", "{retried}");
    assert_eq!(server.received("Create"), 3);
    let missing = call(&envoy, "Create", &[], 0).await;
    assert_eq!(
        missing["code"], "OK",
        "a key is not required unless configured"
    );
}

/// A server-streaming call held open for 10 s, named long-lived: the pool of calls it would
/// have filled (one slot) keeps serving unary calls, a pool of its own caps open streams at
/// one, the breaker's slow-call rule (1 s; one slow call in ten trips it) does not count it,
/// and its slot is back when it ends. A 1.5 s unary call, for contrast, trips the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_held_for_10_s_neither_trips_the_slow_call_rule_nor_leaks_its_slot() {
    let (envoy, server, _upstream) = start(
        r#"{"long_lived": {"match": [{"path": "/demo.Orders/Watch"}]},
            "load_shedding": {"pools": [
                {"name": "calls", "max_in_flight": 1},
                {"name": "streams", "max_in_flight": 1, "long_lived": "only"}],
              "shed_at": {"high": 1, "normal": 1, "low": 1}},
            "circuit_breaker": {"breakers": [{"name": "orders", "scope": {"match": {}},
              "failure": {"slow_call": "1s"},
              "trip": {"slow_call_rate_percent": 10, "minimum_calls": 1, "window": {"calls": 10}}}]}}"#,
    )
    .await;
    let stat = |name: &str| {
        let envoy = &envoy;
        let name = format!("wasmcustom.resilience.grpc.{name}");
        async move { envoy.stat(&name).await }
    };
    let stream = {
        let target = target(&envoy);
        tokio::spawn(async move {
            let metadata = [("messages", "10"), ("interval-ms", "1000")];
            calls(&target, "Watch", &metadata, 0, 1).await.remove(0)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.received("Watch") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(stat("load_shedding.streams.in_flight").await, Some(1));
    for answer in calls(&target(&envoy), "Create", &[], 0, 3).await {
        assert_eq!(
            answer["code"], "OK",
            "the stream holds no slot of the calls pool: {answer}"
        );
    }
    let second = call(&envoy, "Watch", &[], 0).await;
    assert_eq!(
        (&second["code"], &second["details"]),
        (
            &Value::from("UNAVAILABLE"),
            &Value::from("shed by load shedding pool streams, class normal")
        ),
        "{second}"
    );

    let stream = stream.await.unwrap();
    assert_eq!(stream["code"], "OK", "{stream}");
    assert_eq!(stream["messages"].as_array().unwrap().len(), 10);
    assert!(stream["elapsed_ms"].as_u64().unwrap() >= 9_500, "{stream}");
    assert_eq!(
        stat("load_shedding.streams.in_flight").await,
        Some(0),
        "no leak"
    );
    assert_eq!(stat("load_shedding.calls.in_flight").await, Some(0));
    assert_eq!(
        stat("circuit_breaker.orders.transitions_to_open").await,
        Some(0),
        "the 10 s stream was not a slow call"
    );
    let again = call(&envoy, "Watch", &[], 0).await;
    assert_eq!(again["code"], "OK", "the stream's slot is back: {again}");

    let slow = call(&envoy, "Create", &[("delay-ms", "1500")], 0).await;
    assert_eq!(slow["code"], "OK", "{slow}");
    assert_eq!(
        stat("circuit_breaker.orders.transitions_to_open").await,
        Some(1),
        "a 1.5 s unary call is slow"
    );
    let refused = call(&envoy, "Watch", &[], 0).await;
    assert_eq!(
        refused["trailing"]["x-circuit-breaker"], "orders",
        "{refused}"
    );
}
