//! Resilience policies for Envoy, as one proxy-wasm HTTP filter.
//!
//! The crate is a pure core and a thin host adapter (`host`, compiled only for
//! `wasm32-wasip1`). The core is the shared pieces (`clock`, `store`, `config`, `hashing`,
//! `matcher`, `request`, `response`) and one module per policy (`load_shed`, `rate_limit`,
//! `idempotency`, `circuit_breaker`). It never calls proxy-wasm: it gets the time and a
//! [`store::Store`] as arguments, so the same code is tested natively, under
//! `wasm-bindgen-test`, and run inside Envoy.

pub mod circuit_breaker;
pub mod clock;
pub mod config;
pub mod hashing;
pub mod idempotency;
pub mod load_shed;
pub mod matcher;
pub mod rate_limit;
pub mod request;
pub mod response;
pub mod store;

#[cfg(target_os = "wasi")]
mod host;
