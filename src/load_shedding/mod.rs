//! Load shedding: in-flight caps per pool (bulkheads), priority classes, adaptive limits.
//!
//! Each pool's in-flight count and limit live in one shared-data record: admitting a request
//! is one compare-and-swap, and releasing it when its stream ends (`on_log`, once per
//! stream, however it ended) is another, which also carries the request's latency to the
//! adaptive controller. A class is admitted while the pool holds fewer than its share of the
//! limit, so low-priority work is shed first and critical work last.

mod config;
mod pool;
mod shedder;

pub use config::{Adaptive, Class, LoadSheddingConfig, PoolConfig, RawLoadShedding};
pub use pool::{threshold, LimitChange, PoolState};
pub use shedder::{LoadShedding, Slots};
