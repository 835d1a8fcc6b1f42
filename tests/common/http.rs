//! HTTP clients and concurrency helpers shared by the end-to-end and the container tests.

/// Long enough for every VM of the filter to have handed its counters to Envoy (each does
/// every 100 ms, at its tick): wait this before reading a counter a request just moved.
pub const METRICS_FLUSHED: std::time::Duration = std::time::Duration::from_millis(250);

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
