//! Token-bucket rate limiting, exact across Envoy's workers.
//!
//! Each rule's bucket is GCRA state (one timestamp) in shared data, changed only by
//! compare-and-swap, so one bucket of C tokens admits C requests per Envoy, not per worker.
//! Keyed buckets live in a fixed-size table per rule (`table.rs` states the eviction rule).
//! A request costs one read and one compare-and-swap per matching rule; a refusal writes
//! nothing.

mod bucket;
mod config;
mod global;
mod limiter;
mod table;

pub use bucket::{Bucket, Check, Grant, Tat};
pub use config::{KeyPart, MissingKey, RateLimitConfig, RawRateLimit, Rule};
pub use global::Lease;
pub use limiter::{Admission, RateLimit, RateStep, ResponseHeaders};
pub use table::Slot;
