//! A pool's shared state: requests in flight, the current limit and the adaptive
//! controller's latency samples, all in one record so that admitting is one
//! compare-and-swap and releasing (with the request's latency) is another.
//!
//! A slot is counted in the epoch it was admitted in, and an epoch's slots expire with it:
//! a slot whose release never comes (its worker's VM failed, and a reloaded VM knows nothing
//! of it) stops counting after `slot_lease`, so a pool never shrinks for good.

use super::config::{Adaptive, PoolConfig};
use crate::clock::{nanos_saturating, Instant};
use crate::store::{DecodeError, Reader, Record};

/// Epochs a slot can be counted in: admitted during one, it expires when the fourth after it
/// begins, so it lives between `slot_lease` (three epochs) and 4/3 of it.
pub const EPOCHS: usize = 4;

/// The slots admitted during one epoch (`now / epoch length`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    pub number: u64,
    pub slots: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Slots in flight, by epoch of admission; entry `number % EPOCHS` holds epoch `number`.
    pub epochs: [Epoch; EPOCHS],
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

impl PoolState {
    /// Requests in flight (every slot that has not expired, once [`PoolConfig::current`] ran).
    pub fn in_flight(&self) -> u32 {
        self.epochs
            .iter()
            .fold(0u32, |sum, epoch| sum.saturating_add(epoch.slots))
    }
}

impl Record for PoolState {
    const FORMAT: u8 = 0x32;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        for epoch in &self.epochs {
            out.extend_from_slice(&epoch.number.to_le_bytes());
            out.extend_from_slice(&epoch.slots.to_le_bytes());
        }
        out.extend_from_slice(&self.limit.to_le_bytes());
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
        let mut epochs = [Epoch::default(); EPOCHS];
        for epoch in &mut epochs {
            *epoch = Epoch {
                number: fields.u64()?,
                slots: fields.u32()?,
            };
        }
        Ok(PoolState {
            epochs,
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

/// The pool after an admission attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The state to write; `None` when the request is shed and nothing expired.
    pub next: Option<PoolState>,
    /// The epoch the admitted slot is counted in; `None` when the request is shed.
    pub epoch: Option<u64>,
    /// Slots that expired unreleased.
    pub expired: u32,
}

/// The pool after a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    pub next: PoolState,
    /// The slot was still counted (it had not expired) and is now free.
    pub released: bool,
    /// Slots that expired unreleased.
    pub expired: u32,
    pub change: Option<LimitChange>,
}

impl PoolConfig {
    /// The epoch `now` falls in.
    pub fn epoch(&self, now: Instant) -> u64 {
        now.as_nanos() / self.epoch_ns
    }

    /// The state to start from (stored, or empty with the configured cap) with its expired
    /// slots dropped, and how many those were.
    pub fn current(&self, stored: Option<PoolState>, now: Instant) -> (PoolState, u32) {
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
        let oldest_live = self.epoch(now).saturating_sub(EPOCHS as u64 - 1);
        let mut expired = 0u32;
        for epoch in &mut state.epochs {
            // An epoch ahead of now (the clock stepped back) stays: counting longer is stricter.
            if epoch.number < oldest_live {
                expired = expired.saturating_add(epoch.slots);
                *epoch = Epoch::default();
            }
        }
        (state, expired)
    }

    /// Admits a request whose class sheds at `shed_at` millionths of the limit.
    pub fn admit(&self, stored: Option<PoolState>, now: Instant, shed_at: u32) -> Admission {
        let (mut state, expired) = self.current(stored, now);
        if state.in_flight() >= threshold(state.limit, shed_at) {
            return Admission {
                next: (expired > 0).then_some(state),
                epoch: None,
                expired,
            };
        }
        let now_epoch = self.epoch(now);
        let entry = &mut state.epochs[(now_epoch % EPOCHS as u64) as usize];
        // The entry is free or holds this epoch; only a clock that stepped back leaves a later
        // epoch there, and the slot then joins it (and lives longer, never shorter).
        if entry.slots == 0 {
            entry.number = now_epoch;
        }
        entry.slots = entry.slots.saturating_add(1);
        let epoch = entry.number;
        Admission {
            next: Some(state),
            epoch: Some(epoch),
            expired,
        }
    }

    /// Releases a slot counted in `epoch`; adaptive pools take its `latency`, if it is a
    /// sample. A slot that already expired is not released twice.
    pub fn release(
        &self,
        stored: Option<PoolState>,
        now: Instant,
        epoch: u64,
        latency: Option<std::time::Duration>,
    ) -> Release {
        let (mut state, expired) = self.current(stored, now);
        let entry = &mut state.epochs[(epoch % EPOCHS as u64) as usize];
        let released = entry.number == epoch && entry.slots > 0;
        if released {
            entry.slots -= 1;
        }
        let change = match (&self.adaptive, latency) {
            (Some(adaptive), Some(latency)) => {
                state.period_latency_ns = state
                    .period_latency_ns
                    .saturating_add(nanos_saturating(latency));
                state.period_samples = state.period_samples.saturating_add(1);
                adapt(adaptive, self.max_in_flight, &mut state, now)
            }
            _ => None,
        };
        Release {
            next: state,
            released,
            expired,
            change,
        }
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
/// Netflix's Gradient2 do): with `g = clamp(tolerance × min / sample, 0.5, 1)`, the limit
/// becomes `limit × g + √limit × (2g − 1)`.
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
    // Gradient2's headroom of √L, scaled down to nothing as the gradient falls to its floor
    // of 0.5: full headroom under congestion holds the limit at the fixed point of L/2 + √L,
    // 4, above any lower `min_limit`; none at all would let a latency just above tolerance
    // that no limit can improve (a slow upstream, not a loaded one) drive it to the floor.
    let headroom = limit.sqrt() * (2.0 * gradient - 1.0);
    let next = (limit * gradient + headroom).floor();
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
