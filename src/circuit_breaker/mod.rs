//! Circuit breaking on response outcomes: closed, open, half-open, shared by all workers.
//!
//! Each breaker's whole state is one shared-data record. A closed breaker costs a read per
//! request; outcomes are recorded when the stream ends (`on_log`, which Envoy runs for every
//! stream, aborted ones included), and every transition is one compare-and-swap, so it
//! happens once across workers. Half-open admits at most `max_probes` requests at once,
//! counted in the same record.

mod breaker;
mod config;
mod policy;
mod window;

pub use breaker::{
    admit, phase_value, record, Admission, BreakerState, Effects, Outcome, Permit, Phase,
    Transition,
};
pub use config::{BreakerConfig, CircuitBreakerConfig, RawCircuitBreaker};
pub use policy::{CircuitBreaker, Held, Permits};
pub use window::{Totals, Window, WindowSpec};
