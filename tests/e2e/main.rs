//! End-to-end tests: real Envoy (from the project's virtualenv), the freshly built `.wasm`,
//! a controllable upstream and real HTTP/1.1 and HTTP/2 clients.
//!
//! Run them with `make e2e`, which builds the filter first.
#![cfg(not(target_arch = "wasm32"))]
// Tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod circuit_breaker;
mod decisions;
mod docs;
mod envoy;
mod grpc;
mod hostile;
mod idempotency;
mod load_shed;
mod metrics;
mod rate_limit;
mod reload;
mod retries;
mod smoke;
mod soak;
mod upstream;
mod vm_failure;
mod wire;

#[path = "../common/http.rs"]
mod http;
#[path = "../common/markdown.rs"]
mod markdown;
pub use http::{clients, fresh_connections, join_all, METRICS_FLUSHED};
