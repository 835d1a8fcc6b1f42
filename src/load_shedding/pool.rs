//! A pool's shared state: requests in flight, the current limit and the adaptive
//! controller's latency samples, all in one record so that admitting is one
//! compare-and-swap and releasing (with the request's latency) is another.

use super::config::{Adaptive, PoolConfig};
use crate::clock::{nanos_saturating, Instant};
use crate::store::{DecodeError, Reader, Record};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolState {
    pub in_flight: u32,
    /// The limit now in force; the configured cap when the pool is not adaptive.
    pub limit: u32,
    /// Adaptive only: the current sampling period's start, latency sum and count.
    pub period_start: Instant,
    pub period_latency_ns: u64,
    pub period_samples: u32,
    /// Adaptive only: the lowest period latency seen in this and the previous min-RTT window.
    pub min_rtt_ns: u64,
    pub previous_min_rtt_ns: u64,
    pub min_window_start: Instant,
}

impl Record for PoolState {
    const FORMAT: u8 = 0x31;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        for n in [self.in_flight, self.limit] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.period_start.as_nanos().to_le_bytes());
        out.extend_from_slice(&self.period_latency_ns.to_le_bytes());
        out.extend_from_slice(&self.period_samples.to_le_bytes());
        for n in [
            self.min_rtt_ns,
            self.previous_min_rtt_ns,
            self.min_window_start.as_nanos(),
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(PoolState {
            in_flight: fields.u32()?,
            limit: fields.u32()?,
            period_start: Instant::from_nanos(fields.u64()?),
            period_latency_ns: fields.u64()?,
            period_samples: fields.u32()?,
            min_rtt_ns: fields.u64()?,
            previous_min_rtt_ns: fields.u64()?,
            min_window_start: Instant::from_nanos(fields.u64()?),
        })
    }
}

/// What changed when a release closed a sampling period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitChange {
    pub from: u32,
    pub to: u32,
    pub sample_rtt_ns: u64,
    pub min_rtt_ns: u64,
}

impl PoolConfig {
    /// The state to start from: stored, or empty with the configured cap.
    pub fn current(&self, stored: Option<PoolState>, now: Instant) -> PoolState {
        let mut state = stored.unwrap_or(PoolState {
            limit: self.max_in_flight,
            period_start: now,
            min_window_start: now,
            ..PoolState::default()
        });
        // A configuration change takes effect at once; an adaptive limit stays in its bounds.
        state.limit = match &self.adaptive {
            None => self.max_in_flight,
            Some(a) => state.limit.clamp(a.min_limit, self.max_in_flight),
        };
        state
    }

    /// Admits a request whose class sheds at `shed_at` millionths of the limit: the state to
    /// write, or `None` when the request is shed.
    pub fn admit(
        &self,
        stored: Option<PoolState>,
        now: Instant,
        shed_at: u32,
    ) -> Option<PoolState> {
        let state = self.current(stored, now);
        let threshold = threshold(state.limit, shed_at);
        (state.in_flight < threshold).then_some(PoolState {
            in_flight: state.in_flight + 1,
            ..state
        })
    }

    /// Releases one request; adaptive pools take its `latency`, if it is a sample.
    pub fn release(
        &self,
        stored: Option<PoolState>,
        now: Instant,
        latency: Option<std::time::Duration>,
    ) -> (PoolState, Option<LimitChange>) {
        let mut state = self.current(stored, now);
        state.in_flight = state.in_flight.saturating_sub(1);
        let (Some(adaptive), Some(latency)) = (&self.adaptive, latency) else {
            return (state, None);
        };
        state.period_latency_ns = state
            .period_latency_ns
            .saturating_add(nanos_saturating(latency));
        state.period_samples = state.period_samples.saturating_add(1);
        let change = adapt(adaptive, self.max_in_flight, &mut state, now);
        (state, change)
    }
}

/// In-flight count at which a class shedding at `shed_at` millionths of the limit starts
/// being shed: `⌊limit × shed_at⌋`, computed exactly, and never below one, so every class can
/// get through an idle pool.
pub fn threshold(limit: u32, shed_at: u32) -> u32 {
    let share = u64::from(limit) * u64::from(shed_at) / 1_000_000;
    u32::try_from(share).unwrap_or(limit).clamp(1, limit.max(1))
}

/// Closes the sampling period if it has run its length, and moves the limit by the gradient
/// of the minimum latency over the period's mean latency (as Envoy's adaptive_concurrency and
/// Netflix's Gradient2 do): `limit × clamp(tolerance × min / sample, 0.5, 1) + √limit`.
fn adapt(
    adaptive: &Adaptive,
    max_limit: u32,
    state: &mut PoolState,
    now: Instant,
) -> Option<LimitChange> {
    if now.saturating_since(state.period_start) < adaptive.sample_interval
        || state.period_samples == 0
    {
        return None;
    }
    let sample = state.period_latency_ns / u64::from(state.period_samples);
    state.period_start = now;
    state.period_latency_ns = 0;
    state.period_samples = 0;

    // The minimum over a sliding window of two min-RTT windows, so a baseline that moved
    // up for good is learned within two windows.
    if now.saturating_since(state.min_window_start) >= adaptive.min_rtt_window {
        state.previous_min_rtt_ns = state.min_rtt_ns;
        state.min_rtt_ns = 0;
        state.min_window_start = now;
    }
    state.min_rtt_ns = if state.min_rtt_ns == 0 {
        sample
    } else {
        state.min_rtt_ns.min(sample)
    };
    let min_rtt = match state.previous_min_rtt_ns {
        0 => state.min_rtt_ns,
        previous => previous.min(state.min_rtt_ns),
    };

    let gradient = (adaptive.tolerance * min_rtt as f64 / sample.max(1) as f64).clamp(0.5, 1.0);
    let limit = f64::from(state.limit);
    let next = (limit * gradient + limit.sqrt()).floor();
    let next = (next as u32).clamp(adaptive.min_limit, max_limit);
    let change = LimitChange {
        from: state.limit,
        to: next,
        sample_rtt_ns: sample,
        min_rtt_ns: min_rtt,
    };
    state.limit = next;
    Some(change)
}
