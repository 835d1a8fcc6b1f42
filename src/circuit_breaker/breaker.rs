//! The breaker's state machine: closed → open → half-open → closed (or open again).
//!
//! Pure functions of (stored state, now, event). The store functions at the bottom are the
//! only ones that touch shared data: a clean breaker (closed, no failure streak) is answered
//! from the VM's [`Sighting`] of it while the breaker's alarm stays down (a read of an empty
//! value), one still open from its sighting alone, any other read (no write); leaving open,
//! taking a probe slot and recording an outcome that changes the state cost one
//! compare-and-swap.

use super::config::BreakerConfig;
use super::window::{Window, WindowSpec};
use crate::clock::Instant;
use crate::policy::Completion;
use crate::store::{
    self, DecodeError, Namespace, Reader, Record, SharedDataSettings, Store, StoreError,
};
use std::cell::Cell;
use std::num::NonZeroU32;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half-open",
        }
    }
}

/// One breaker's state, shared by all workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerState {
    pub phase: Phase,
    /// Changes at every transition, so outcomes of requests admitted in an earlier phase are
    /// recognised and dropped.
    pub generation: u32,
    /// Trips since the breaker last closed, for the open duration's backoff.
    pub trips: u32,
    /// Open: when the breaker may leave open. Half-open: when the probe slots taken so far
    /// are presumed lost (their streams never reported back).
    pub open_until: Instant,
    pub consecutive_failures: u32,
    pub probes_in_flight: u32,
    pub probe_successes: u32,
    pub window: Window,
}

impl Record for BreakerState {
    const FORMAT: u8 = 0x21;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        out.push(self.phase as u8);
        for n in [self.generation, self.trips] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.open_until.as_nanos().to_le_bytes());
        for n in [
            self.consecutive_failures,
            self.probes_in_flight,
            self.probe_successes,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        self.window.encode(out);
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let phase = match fields.u8()? {
            0 => Phase::Closed,
            1 => Phase::Open,
            2 => Phase::HalfOpen,
            _ => return Err(DecodeError::Invalid),
        };
        Ok(BreakerState {
            phase,
            generation: fields.u32()?,
            trips: fields.u32()?,
            open_until: Instant::from_nanos(fields.u64()?),
            consecutive_failures: fields.u32()?,
            probes_in_flight: fields.u32()?,
            probe_successes: fields.u32()?,
            window: Window::decode(fields)?,
        })
    }
}

impl BreakerState {
    fn closed(window: WindowSpec, generation: u32) -> BreakerState {
        BreakerState {
            phase: Phase::Closed,
            generation,
            trips: 0,
            open_until: Instant::default(),
            consecutive_failures: 0,
            probes_in_flight: 0,
            probe_successes: 0,
            window: Window::new(window),
        }
    }
}

/// What a request holds after it was let through, to report its outcome with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    Closed { generation: u32 },
    Probe { generation: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Pass(Permit),
    Reject { retry_after: Duration },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success {
        slow: bool,
    },
    Failure {
        slow: bool,
    },
    /// The client went away before an answer: says nothing about the upstream.
    Ignored,
}

/// While half-open with every probe slot taken, come back after this.
const PROBES_BUSY_RETRY: Duration = Duration::from_secs(1);

impl BreakerConfig {
    /// What a finished request says about the upstream. Only the upstream's own answers and
    /// Envoy's failures to get one count; a local reply (from this filter, a chained instance,
    /// or any other filter) and a request the client abandoned say nothing about it.
    pub fn classify(&self, completion: &Completion) -> Outcome {
        let limit = if completion.long_lived {
            self.long_lived_slow_call
        } else {
            self.slow_call
        };
        let slow = limit.is_some_and(|limit| completion.duration > limit);
        if completion.upstream_failed() {
            return if self.local_failures {
                Outcome::Failure { slow }
            } else {
                Outcome::Ignored
            };
        }
        if completion.downstream_gone() || !completion.via_upstream {
            return Outcome::Ignored;
        }
        let failed = match (completion.grpc_status, completion.status) {
            (Some(grpc), _) => self.failure_grpc_statuses.contains(grpc),
            (None, Some(status)) => self.failure_statuses.contains(status),
            (None, None) => return Outcome::Ignored,
        };
        if failed {
            Outcome::Failure { slow }
        } else {
            Outcome::Success { slow }
        }
    }

    /// How long the breaker stays open after its `trips`-th trip in a row.
    pub fn open_for(&self, trips: u32) -> Duration {
        let exponent = i32::try_from(trips.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = self.open_duration.as_secs_f64() * self.backoff_multiplier.powi(exponent);
        Duration::try_from_secs_f64(grown)
            .map_or(self.max_open_duration, |d| d.min(self.max_open_duration))
    }

    /// The state to start from: stored, or closed if missing or laid out for another window.
    fn current(&self, stored: Option<BreakerState>) -> BreakerState {
        match stored {
            Some(state) if state.window.spec() == self.window => state,
            Some(state) => BreakerState {
                window: Window::new(self.window),
                ..state
            },
            None => BreakerState::closed(self.window, 0),
        }
    }

    fn trip(
        &self,
        state: &BreakerState,
        now: Instant,
        from: Phase,
        reason: String,
    ) -> (BreakerState, Transition) {
        let trips = state.trips.saturating_add(1);
        let open = BreakerState {
            phase: Phase::Open,
            generation: state.generation.wrapping_add(1),
            trips,
            open_until: now.saturating_add(self.open_for(trips)),
            ..BreakerState::closed(self.window, 0)
        };
        let reason = format!(
            "{reason}; open for {}",
            humantime::format_duration(self.open_for(trips))
        );
        (
            open,
            Transition {
                from,
                to: Phase::Open,
                reason,
            },
        )
    }

    /// Admission for a breaker that is not plainly closed or still open.
    pub fn admit(
        &self,
        stored: Option<BreakerState>,
        now: Instant,
    ) -> (Admission, Option<BreakerState>, Option<Transition>) {
        let state = self.current(stored);
        match state.phase {
            Phase::Closed => (
                Admission::Pass(Permit::Closed {
                    generation: state.generation,
                }),
                None,
                None,
            ),
            Phase::Open if now < state.open_until => (
                Admission::Reject {
                    retry_after: state.open_until.saturating_since(now),
                },
                None,
                None,
            ),
            Phase::Open => {
                let generation = state.generation.wrapping_add(1);
                let half_open = BreakerState {
                    phase: Phase::HalfOpen,
                    generation,
                    open_until: now.saturating_add(self.probe_timeout),
                    probes_in_flight: 1,
                    probe_successes: 0,
                    ..state
                };
                let transition = Transition {
                    from: Phase::Open,
                    to: Phase::HalfOpen,
                    reason: format!(
                        "open duration of {} elapsed",
                        humantime::format_duration(self.open_for(half_open.trips))
                    ),
                };
                (
                    Admission::Pass(Permit::Probe { generation }),
                    Some(half_open),
                    Some(transition),
                )
            }
            Phase::HalfOpen if state.probes_in_flight < self.max_probes => {
                let generation = state.generation;
                let probes_in_flight = state.probes_in_flight + 1;
                let open_until = now.saturating_add(self.probe_timeout);
                (
                    Admission::Pass(Permit::Probe { generation }),
                    Some(BreakerState {
                        probes_in_flight,
                        open_until,
                        ..state
                    }),
                    None,
                )
            }
            // Every slot taken and none reported back within the probe timeout: the probes'
            // streams are presumed lost. Start over with a new generation, so their late
            // outcomes, if any, are dropped.
            Phase::HalfOpen if now >= state.open_until => {
                let generation = state.generation.wrapping_add(1);
                let restarted = BreakerState {
                    generation,
                    open_until: now.saturating_add(self.probe_timeout),
                    probes_in_flight: 1,
                    probe_successes: 0,
                    ..state
                };
                (
                    Admission::Pass(Permit::Probe { generation }),
                    Some(restarted),
                    None,
                )
            }
            Phase::HalfOpen => (
                Admission::Reject {
                    retry_after: PROBES_BUSY_RETRY,
                },
                None,
                None,
            ),
        }
    }

    /// Records a permitted request's outcome. Returns the state to write (none when nothing
    /// changed or the permit belongs to an earlier phase) and the transition it caused.
    pub fn record(
        &self,
        stored: Option<BreakerState>,
        permit: Permit,
        outcome: Outcome,
        now: Instant,
    ) -> (Option<BreakerState>, Option<Transition>) {
        let state = self.current(stored);
        match (permit, state.phase) {
            (Permit::Closed { generation }, Phase::Closed) if generation == state.generation => {
                self.record_closed(state, outcome, now)
            }
            (Permit::Probe { generation }, Phase::HalfOpen) if generation == state.generation => {
                self.record_probe(state, outcome, now)
            }
            _ => (None, None),
        }
    }

    fn record_closed(
        &self,
        mut state: BreakerState,
        outcome: Outcome,
        now: Instant,
    ) -> (Option<BreakerState>, Option<Transition>) {
        let (failed, slow) = match outcome {
            Outcome::Ignored => return (None, None),
            Outcome::Success { slow } => (false, slow),
            Outcome::Failure { slow } => (true, slow),
        };
        let had_failures = state.consecutive_failures > 0;
        state.consecutive_failures = if failed {
            state.consecutive_failures.saturating_add(1)
        } else {
            0
        };
        if !failed && !had_failures && state.window.spec() == WindowSpec::None {
            return (None, None);
        }
        state.window.record(now, failed, slow);

        if let Some(limit) = self
            .consecutive_failures
            .filter(|&n| state.consecutive_failures >= n)
        {
            let (open, t) = self.trip(
                &state,
                now,
                Phase::Closed,
                format!("{limit} consecutive failures"),
            );
            return (Some(open), Some(t));
        }
        let totals = state.window.totals(now);
        if totals.calls >= self.minimum_calls {
            let over = |count: u32, percent: Option<u8>| {
                percent
                    .filter(|&p| u64::from(count) * 100 >= u64::from(p) * u64::from(totals.calls))
            };
            if let Some(p) = over(totals.failures, self.failure_rate_percent) {
                let reason = format!(
                    "failure rate {}/{} calls reached {p}%",
                    totals.failures, totals.calls
                );
                let (open, t) = self.trip(&state, now, Phase::Closed, reason);
                return (Some(open), Some(t));
            }
            if let Some(p) = over(totals.slow, self.slow_call_rate_percent) {
                let reason = format!(
                    "slow-call rate {}/{} calls reached {p}%",
                    totals.slow, totals.calls
                );
                let (open, t) = self.trip(&state, now, Phase::Closed, reason);
                return (Some(open), Some(t));
            }
        }
        (Some(state), None)
    }

    fn record_probe(
        &self,
        mut state: BreakerState,
        outcome: Outcome,
        now: Instant,
    ) -> (Option<BreakerState>, Option<Transition>) {
        state.probes_in_flight = state.probes_in_flight.saturating_sub(1);
        let failed = match outcome {
            Outcome::Ignored => return (Some(state), None),
            Outcome::Failure { .. } => true,
            Outcome::Success { slow } => slow && self.slow_call_rate_percent.is_some(),
        };
        if failed {
            let (open, t) = self.trip(&state, now, Phase::HalfOpen, "a probe failed".to_owned());
            return (Some(open), Some(t));
        }
        state.probe_successes = state.probe_successes.saturating_add(1);
        if state.probe_successes >= self.successes_to_close {
            let closed = BreakerState::closed(self.window, state.generation.wrapping_add(1));
            let transition = Transition {
                from: Phase::HalfOpen,
                to: Phase::Closed,
                reason: format!("{} probes succeeded", state.probe_successes),
            };
            return (Some(closed), Some(transition));
        }
        (Some(state), None)
    }
}

/// What the store functions report besides their answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub transition: Option<Transition>,
    pub conflicts: u32,
}

/// The longest a VM answers from one [`Sighting`]: never longer than the breaker's open
/// duration (see there).
pub const MAX_SIGHTING: Duration = Duration::from_millis(100);

/// A breaker's two shared-data keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// Its [`BreakerState`].
    pub state: String,
    /// Empty (or absent) while the breaker is *clean*: closed with no failure streak. A
    /// writer about to make it anything else sets it to one byte first, and one that made it
    /// clean again empties it after, with a compare-and-swap against the version it read
    /// before the state, so that it never empties an alarm another writer raised meanwhile.
    /// So whenever the alarm is empty, the state is clean. Reading an empty value copies
    /// nothing into the VM, which makes checking it a few µs cheaper than reading the state.
    pub alarm: String,
}

pub fn keys(namespace: &Namespace, breaker: &BreakerConfig) -> Keys {
    Keys {
        state: namespace.key(&format!("cb/{}", breaker.name)),
        alarm: namespace.key(&format!("cb-alarm/{}", breaker.name)),
    }
}

/// Closed with no failure streak: what an empty alarm vouches for.
fn clean(state: Option<&BreakerState>) -> bool {
    state.is_none_or(|s| s.phase == Phase::Closed && s.consecutive_failures == 0)
}

/// The alarm as read: `Some(version)` while it is down (empty; `None` inside for a breaker
/// never raised), `None` while it is raised.
fn alarm_down(store: &impl Store, keys: &Keys) -> Result<Option<Option<NonZeroU32>>, StoreError> {
    Ok(match store.get(&keys.alarm)? {
        None => Some(None),
        Some(value) if value.bytes.is_empty() => Some(Some(value.version)),
        Some(_) => None,
    })
}

/// What this VM last read of a breaker.
///
/// A clean breaker's sighting holds while the alarm is down at the version read before the
/// state: the alarm goes up before any write that makes the breaker unclean, so an unmoved,
/// empty alarm means the state is still as read (and its generation the same). An open
/// breaker's sighting needs no alarm before its open duration ends: it changes only then.
/// A clean sighting lasts at most [`MAX_SIGHTING`], and never longer than the open duration: a VM
/// of an older build, which does not raise the alarm, can leave another VM answering from a
/// clean sighting that long after it tripped the breaker, never past its half-open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    state: Option<BreakerState>,
    /// The alarm's version, read down before the state; `None` when it was up.
    alarm: Option<Option<NonZeroU32>>,
    at: Instant,
}

impl Sighting {
    fn look(store: &impl Store, keys: &Keys, now: Instant) -> Result<Sighting, StoreError> {
        let alarm = alarm_down(store, keys)?;
        let state = store::read::<BreakerState>(store, &keys.state)?;
        Ok(Sighting {
            state,
            alarm,
            at: now,
        })
    }

    fn lasts(&self, breaker: &BreakerConfig, now: Instant) -> bool {
        let until = self
            .at
            .saturating_add(MAX_SIGHTING.min(breaker.open_duration));
        self.at <= now && now < until
    }

    /// Still what shared data holds, as far as this VM can tell.
    fn holds(
        &self,
        store: &impl Store,
        keys: &Keys,
        breaker: &BreakerConfig,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let still_open = self
            .state
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Open && now < s.open_until);
        if still_open && self.at <= now {
            return Ok(true);
        }
        if !self.lasts(breaker, now) {
            return Ok(false);
        }
        Ok(self.alarm.is_some()
            && clean(self.state.as_ref())
            && alarm_down(store, keys)? == self.alarm)
    }
}

/// Read, decide, write with compare-and-swap, as [`store::update`] does (`max_attempts`;
/// `None`: until it lands, as [`store::settle`]), keeping the alarm: raised before a write
/// that makes the breaker unclean, lowered after one that makes it clean again.
fn change<R>(
    store: &impl Store,
    namespace: &Namespace,
    keys: &Keys,
    max_attempts: Option<u32>,
    mut decide: impl FnMut(Option<BreakerState>) -> (R, Option<BreakerState>),
) -> Result<store::Updated<R>, StoreError> {
    let mut conflicts: u32 = 0;
    while max_attempts.is_none_or(|max| conflicts < max) {
        let alarm = store.get(&keys.alarm)?;
        let alarm_up = alarm.as_ref().is_some_and(|value| !value.bytes.is_empty());
        let alarm = alarm.map(|value| value.version);
        let current = store.get(&keys.state)?;
        let state = current
            .as_ref()
            .and_then(|c| store::decode::<BreakerState>(&c.bytes).ok());
        let was_clean = clean(state.as_ref());
        let (decision, next) = decide(state);
        let Some(next) = next else {
            // Up over a clean state: its raiser lost its race or failed, or a lowering lost
            // to a newer raise. Writing the state back as read proves no write landed since
            // it was read; then it comes down as after any clean write. Otherwise every
            // reader would read the state until the next failure streak ended.
            if let (true, true, Some(current), Some(version)) =
                (alarm_up, was_clean, &current, alarm)
            {
                if store
                    .set(&keys.state, &current.bytes, Some(current.version))
                    .is_ok()
                {
                    let _ = store.set(&keys.alarm, &[], Some(version));
                }
            }
            return Ok(store::Updated {
                decision,
                conflicts,
                replaced_unreadable: false,
            });
        };
        let goes_clean = clean(Some(&next));
        if was_clean && !goes_clean {
            store.set(&keys.alarm, &[1], None)?;
        }
        let bytes = store::encode(&next);
        if store::write_over(store, namespace, &keys.state, current.as_ref(), &bytes)? {
            // Lowered only if nobody raised it since it was read; otherwise it stays up
            // (readers then read the state) until the next write that makes it clean.
            if goes_clean && (alarm_up || !was_clean) {
                if let Some(version) = alarm {
                    let _ = store.set(&keys.alarm, &[], Some(version));
                }
            }
            return Ok(store::Updated {
                decision,
                conflicts,
                replaced_unreadable: false,
            });
        }
        conflicts = conflicts.saturating_add(1);
    }
    Err(StoreError::Contended {
        attempts: conflicts,
    })
}

/// Decides whether a request may pass `breaker`; `seen` is this VM's last [`Sighting`] of
/// it, answered from while it holds and kept up to date.
pub fn admit(
    store: &impl Store,
    namespace: &Namespace,
    keys: &Keys,
    breaker: &BreakerConfig,
    now: Instant,
    settings: SharedDataSettings,
    seen: &Cell<Option<Sighting>>,
) -> Result<(Admission, Effects), StoreError> {
    let sighting = match seen.take() {
        Some(sighting) if sighting.holds(store, keys, breaker, now)? => sighting,
        _ => Sighting::look(store, keys, now)?,
    };
    // The stable states answer from the sighting alone.
    let quick = match &sighting.state {
        None => Some(Admission::Pass(Permit::Closed { generation: 0 })),
        Some(s) if s.phase == Phase::Closed => Some(Admission::Pass(Permit::Closed {
            generation: s.generation,
        })),
        Some(s) if s.phase == Phase::Open && now < s.open_until => Some(Admission::Reject {
            retry_after: s.open_until.saturating_since(now),
        }),
        Some(_) => None,
    };
    if let Some(admission) = quick {
        seen.set(Some(sighting));
        return Ok((admission, Effects::default()));
    }
    let updated = change(
        store,
        namespace,
        keys,
        Some(settings.max_attempts),
        |state| {
            let (admission, next, transition) = breaker.admit(state, now);
            ((admission, transition), next)
        },
    )?;
    let (admission, transition) = updated.decision;
    Ok((
        admission,
        Effects {
            transition,
            conflicts: updated.conflicts,
        },
    ))
}

/// Records the outcome of a request `breaker` let through with `permit`. It retries until
/// it lands: a lost failure would trip the breaker late, and a lost probe would hold its slot
/// until the probe timeout.
///
/// A breaker without a window, whose sighting holds and says the outcome changes nothing (a
/// success with no failure streak), is left as it is without reading its state.
#[allow(clippy::too_many_arguments)]
pub fn record(
    store: &impl Store,
    namespace: &Namespace,
    keys: &Keys,
    breaker: &BreakerConfig,
    permit: Permit,
    outcome: Outcome,
    now: Instant,
    seen: &Cell<Option<Sighting>>,
) -> Result<Effects, StoreError> {
    let mut sighting = seen.take();
    if breaker.window == WindowSpec::None {
        if let Some(held) = sighting.take() {
            if held.holds(store, keys, breaker, now)? {
                let (next, _) = breaker.record(held.state.clone(), permit, outcome, now);
                if next.is_none() {
                    seen.set(Some(held));
                    return Ok(Effects::default());
                }
            }
        }
    }
    let updated = change(store, namespace, keys, None, |state| {
        let before = clean(state.as_ref());
        let (next, transition) = breaker.record(state, permit, outcome, now);
        let stays = next.as_ref().is_none_or(|next| clean(Some(next)) == before);
        ((transition, stays), next)
    })?;
    let (transition, stays) = updated.decision;
    // A write that left a clean breaker clean (a window's count) leaves this VM's sighting,
    // if it still has one, as good as before: the alarm says whether it holds.
    if stays {
        seen.set(sighting);
    }
    Ok(Effects {
        transition,
        conflicts: updated.conflicts,
    })
}

/// The phase to show in the state gauge (0 closed, 1 open, 2 half-open).
pub fn phase_value(phase: Phase) -> u64 {
    phase as u64
}

#[cfg(test)]
mod tests;
