//! End-to-end tests: real Envoy (from the project's virtualenv), the freshly built `.wasm`,
//! a controllable upstream and real HTTP/1.1 and HTTP/2 clients.
//!
//! Run them with `make e2e`, which builds the filter first.
#![cfg(not(target_arch = "wasm32"))]
// Tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod circuit_breaker;
mod envoy;
mod hostile;
mod idempotency;
mod load_shed;
mod rate_limit;
mod smoke;
mod upstream;
mod wire;

/// HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) clients, as real clients reach Envoy.
pub fn clients() -> [(&'static str, reqwest::Client); 2] {
    let build = |builder: reqwest::ClientBuilder| builder.no_proxy().build().expect("HTTP client");
    [
        ("HTTP/1.1", build(reqwest::Client::builder().http1_only())),
        (
            "HTTP/2",
            build(reqwest::Client::builder().http2_prior_knowledge()),
        ),
    ]
}

/// An HTTP/1.1 client that opens a new connection for every request, so Envoy spreads the
/// requests over its workers.
pub fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .expect("HTTP client")
}

/// Runs the futures concurrently on the runtime's threads and returns their outputs in order.
pub async fn join_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task panicked"));
    }
    outputs
}
