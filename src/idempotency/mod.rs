//! Idempotency keys: a retried request with the same `Idempotency-Key` reaches the upstream
//! once; duplicates get the stored response, conflicts a clear error.
//!
//! Records live in a fixed table of `records` slots in shared data; a (client, key) pair is
//! hashed to one slot, so exactly one request can claim it across all workers (a claim is a
//! compare-and-swap on that one value). With a `store`, the same records also live in etcd,
//! so that every Envoy of a fleet acts as one (`fleet`). See `filters/idempotency/README.md`.

mod capture;
mod config;
mod fleet;
mod key;
mod policy;
mod record;

pub use capture::Capture;
pub use config::{IdempotencyConfig, IdentityPart, Overflow, RawIdempotency, BODY_TIMER};
pub use fleet::{
    FleetClaim, FleetStep, FleetWrite, FleetWrites, MAX_PENDING_BYTES, MAX_PENDING_WRITES,
    MAX_WRITES_IN_FLIGHT,
};
pub use key::{parse_key, KeyError};
pub use policy::{
    Begin, Claim, ClaimId, Finished, Idempotency, KeyCheck, Outcome, Pending, Placement, Problem,
    REPLAYED_HEADER, SWEEP_PER_SECOND,
};
pub use record::{
    Entry, IdempotencyRecord, StoredResponse, HEADER_FRAMING_BYTES, MAX_STORED_HEADERS,
    RECORD_FIXED_BYTES,
};
