//! Resilience policies for Envoy, as one proxy-wasm HTTP filter.
//!
//! The crate is a pure core and a thin host adapter (`host`, compiled only for
//! `wasm32-wasip1`). The core never calls proxy-wasm: it gets the time, a [`store::Store`] and
//! a place to report ([`telemetry`]) as arguments, so the same code is tested natively, under
//! `wasm-bindgen-test`, and run inside Envoy.
//!
//! - [`pipeline`]: one filter instance ([`pipeline::Filter`]) and one stream through it
//!   ([`pipeline::Exchange`]): the policies' order, loans and their release, body waits,
//!   response capture.
//! - [`policy`]: the shape every policy has, and what it is given ([`policy::Env`]).
//! - The policies: [`load_shedding`], [`rate_limit`], [`idempotency`], [`circuit_breaker`].
//! - Shared pieces: [`store`] (shared data and compare-and-swap), [`request`] (request parts,
//!   path normalization, keys), [`matcher`], [`reply`], [`hashing`], [`clock`], [`config`]
//!   (errors and checks every section uses), [`telemetry`], [`decision`], [`grpc`].

pub mod circuit_breaker;
pub mod clock;
pub mod config;
pub mod decision;
pub mod etcd;
pub mod grpc;
pub mod hashing;
pub mod idempotency;
pub mod load_shedding;
pub mod matcher;
pub mod pipeline;
pub mod policy;
pub mod rate_limit;
pub mod reply;
pub mod request;
pub mod store;
pub mod telemetry;

#[cfg(test)]
mod testing;

#[cfg(target_os = "wasi")]
mod host;
