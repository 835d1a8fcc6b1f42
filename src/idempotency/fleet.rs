//! The fleet tier: the same records, in etcd, shared by every Envoy that names the same
//! store and instance. This Envoy's own table stays the first tier: a duplicate it has
//! already seen is answered from shared data; a key it claims is then claimed in etcd too,
//! with one compare-and-swap transaction, before the request may go upstream.
//!
//! The etcd table is bounded like the local one: `records` keys at most, each holding one
//! record; a slot's expired record is overwritten by the next key placed there.

use super::policy::{
    Claim, ClaimId, Idempotency, KeyCheck, Outcome, Placement, Problem, REPLAYED_HEADER,
};
use super::record::{Entry, IdempotencyRecord};
use crate::clock::Instant;
use crate::etcd::{self, AnswerError, Expected, StoreCall, Swapped};
use crate::grpc::GrpcStatus;
use crate::policy::Env;
use crate::reply::Reply;
use crate::store::{decode, encode, FailureMode, Store};
use crate::telemetry::Level;
use std::time::Duration;

/// A request's claim in the fleet store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetClaim {
    key: Vec<u8>,
    place: Placement,
    fingerprint: [u8; 32],
    /// The record's revision once this claim wrote it.
    revision: Option<i64>,
    /// The record this claim last tried to write, byte for byte.
    claimed: Vec<u8>,
    /// A transaction writing `claimed` failed without a clear answer: it may have landed.
    in_doubt: bool,
    /// A transaction is on its way and its answer not in: it may land after the stream is
    /// gone (the client left while it waited).
    awaiting: bool,
    /// Transactions sent so far for this decision.
    calls: u32,
    /// When the decision started: all its calls together take at most `timeout`.
    started: Instant,
    /// What the last transaction expected to find; with `claimed`, the transaction, sent
    /// again once if it fails early: whether or not it landed, the same transaction then
    /// tells (a landed claim reads back as this claim's own).
    expected: Expected,
}

/// Where a fleet decision stands after an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum FleetStep {
    /// Send this, then hand its answer to [`Idempotency::fleet_answer`].
    Call(StoreCall),
    Decided(KeyCheck),
    /// The store gave no usable answer in time: `on_store_error` decides.
    Unavailable(AnswerError),
}

/// A record write that must land after the stream is gone: the host sends [`FleetWrite::call`]
/// when `next` comes, and again with a doubling backoff until `until`, when the claim would
/// have expired anyway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetWrite {
    /// Where to send it; the body is built when it is sent.
    target: StoreCall,
    key: Vec<u8>,
    expected: Expected,
    /// The record to write, byte for byte.
    value: Vec<u8>,
    /// It frees the slot rather than storing a result: the first to go when the queue is
    /// full, since a lost release costs a wait, a lost result a second execution.
    releases: bool,
    pub until: Instant,
    pub next: Instant,
    backoff: Duration,
}

impl FleetWrite {
    pub fn call(&self) -> StoreCall {
        StoreCall {
            body: etcd::swap(&self.key, &self.expected, &self.value),
            ..self.target.clone()
        }
    }

    /// The memory it holds while it waits.
    fn bytes(&self) -> usize {
        let expected = match &self.expected {
            Expected::Value(value) => value.len(),
            _ => 0,
        };
        self.key.len() + self.value.len() + expected
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The fleet writes a VM has yet to land, bounded in number and bytes: during a long etcd
/// outage, what does not fit is dropped (and counted), releases before results.
#[derive(Debug, Default)]
pub struct FleetWrites {
    queue: Vec<FleetWrite>,
    bytes: usize,
}

/// The most fleet writes one instance keeps waiting in one VM.
pub const MAX_PENDING_WRITES: usize = 4096;
/// The most memory they may hold.
pub const MAX_PENDING_BYTES: usize = 32 << 20;
/// The most fleet writes one VM has on their way at once.
pub const MAX_WRITES_IN_FLIGHT: usize = 64;

impl FleetWrites {
    /// Queues a write; `false` when a write had to be dropped for it, or it for lack of room.
    pub fn push(&mut self, write: FleetWrite) -> bool {
        let mut dropped = false;
        while self.queue.len() >= MAX_PENDING_WRITES
            || self.bytes + write.bytes() > MAX_PENDING_BYTES
        {
            let victim = self
                .queue
                .iter()
                .position(|w| w.releases && !write.releases);
            match victim {
                Some(i) => {
                    let evicted = self.queue.swap_remove(i);
                    self.bytes -= evicted.bytes();
                    dropped = true;
                }
                None => return false,
            }
        }
        self.bytes += write.bytes();
        self.queue.push(write);
        !dropped
    }

    /// Up to `max` writes due at `now`, taken out of the queue.
    pub fn take_due(&mut self, now: Instant, max: usize) -> Vec<FleetWrite> {
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.queue.len() && due.len() < max {
            if self.queue[i].next <= now {
                let write = self.queue.swap_remove(i);
                self.bytes -= write.bytes();
                due.push(write);
            } else {
                i += 1;
            }
        }
        due
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Transactions one decision may take: a lost race for a slot costs one more.
const MAX_CALLS: u32 = 4;
/// The least time worth giving a call: less, and the decision is `on_store_error`'s.
const MIN_CALL_TIME: Duration = Duration::from_millis(5);

impl Idempotency {
    /// A key's place in the fleet table, from SHA-256 of the scoped key.
    pub(super) fn fleet_place(&self, scoped: &[u8]) -> Placement {
        let place = crate::hashing::fleet_place(scoped, self.config().records);
        Placement {
            slot: place.index,
            owner: place.owner,
        }
    }

    /// A fleet claim for a request this Envoy claimed, if there is a fleet store.
    pub(super) fn fleet_claim(
        &self,
        instance: &str,
        place: Option<Placement>,
        fingerprint: [u8; 32],
    ) -> Option<FleetClaim> {
        let store = self.config().store.as_ref()?;
        let place = place?;
        let key = format!("{}{instance}/idem/{}", store.prefix, place.slot).into_bytes();
        Some(FleetClaim {
            key,
            place,
            fingerprint,
            revision: None,
            claimed: Vec::new(),
            in_doubt: false,
            awaiting: false,
            calls: 0,
            started: Instant::default(),
            expected: Expected::Absent,
        })
    }

    fn store_call(&self, body: Vec<u8>, timeout: Duration) -> Option<StoreCall> {
        let store = self.config().store.as_ref()?;
        Some(StoreCall {
            cluster: store.cluster.clone(),
            authority: store.authority.clone(),
            path: etcd::TXN_PATH,
            body,
            timeout,
        })
    }

    /// What is left of the decision's `timeout` at `now`.
    fn time_left(&self, fleet: &FleetClaim, now: Instant) -> Duration {
        let timeout = self
            .config()
            .store
            .as_ref()
            .map_or(Duration::ZERO, |s| s.timeout);
        timeout.saturating_sub(now.saturating_since(fleet.started))
    }

    fn claimed_record(&self, fleet: &FleetClaim, id: ClaimId, now: Instant) -> IdempotencyRecord {
        IdempotencyRecord {
            owner: fleet.place.owner,
            fingerprint: fleet.fingerprint,
            deadline: now.saturating_add(self.config().lease),
            entry: Entry::InFlight { claim: id.claim },
        }
    }

    /// The first transaction: create the slot's record as this claim's, or read it.
    pub fn fleet_start(&self, fleet: &mut FleetClaim, id: ClaimId, now: Instant) -> FleetStep {
        fleet.started = now;
        fleet.claimed = encode(&self.claimed_record(fleet, id, now));
        fleet.expected = Expected::Absent;
        self.fleet_send(fleet, now)
    }

    /// Sends the last transaction, within what is left of the timeout.
    fn fleet_send(&self, fleet: &mut FleetClaim, now: Instant) -> FleetStep {
        fleet.calls += 1;
        let left = self.time_left(fleet, now);
        let body = etcd::swap(&fleet.key, &fleet.expected, &fleet.claimed);
        match self.store_call(body, left) {
            Some(call) if left >= MIN_CALL_TIME => {
                fleet.awaiting = true;
                FleetStep::Call(call)
            }
            _ => FleetStep::Unavailable(AnswerError::NoAnswer),
        }
    }

    /// etcd's answer to the last transaction: the decision, or the next transaction.
    pub fn fleet_answer(
        &self,
        fleet: &mut FleetClaim,
        id: ClaimId,
        answer: Result<Swapped, AnswerError>,
        now: Instant,
    ) -> FleetStep {
        fleet.awaiting = false;
        match &answer {
            // Never sent: nothing of it can land.
            Err(AnswerError::NotSent) => {}
            // Perhaps committed, its answer lost.
            Err(_) => fleet.in_doubt = true,
            // Whatever an earlier, unanswered transaction did shows in this answer, and it
            // can no longer land: it compared what this one found or changed.
            Ok(_) => fleet.in_doubt = false,
        }
        let found = match answer {
            // A member that refused at once (down, or no leader yet): another may answer.
            Err(_) if fleet.calls == 1 && self.time_left(fleet, now) >= MIN_CALL_TIME => {
                return self.fleet_send(fleet, now);
            }
            Err(err) => return FleetStep::Unavailable(err),
            Ok(Swapped::Written { revision }) => {
                fleet.revision = Some(revision);
                return FleetStep::Decided(KeyCheck::Claimed);
            }
            Ok(Swapped::Found(found)) => found,
        };
        let record = found
            .as_ref()
            .and_then(|f| decode::<IdempotencyRecord>(&f.value).ok());
        // This claim's own write landed, though its answer was lost: a retry finds it.
        if let (Some(record), Some(found)) = (&record, &found) {
            if record.owner == fleet.place.owner
                && record.entry == (Entry::InFlight { claim: id.claim })
            {
                fleet.revision = Some(found.revision);
                return FleetStep::Decided(KeyCheck::Claimed);
            }
        }
        let ((decision, _), write) =
            self.judge(record, fleet.place.owner, fleet.fingerprint, id.claim, now);
        match write {
            None => FleetStep::Decided(decision),
            Some(_) if fleet.calls >= MAX_CALLS => FleetStep::Unavailable(AnswerError::Contended),
            Some(record) => {
                fleet.expected = found.map_or(Expected::Absent, |f| Expected::Revision(f.revision));
                fleet.claimed = encode(&record);
                self.fleet_send(fleet, now)
            }
        }
    }

    /// The write that records how a fleet claim ended, as the local tier does: over the
    /// record's revision when this claim wrote it, over its exact bytes when a write of it
    /// may have landed unanswered; `None` when no record of this claim can be in etcd, or
    /// it stays until its lease runs out.
    pub fn fleet_finish(
        &self,
        fleet: FleetClaim,
        id: ClaimId,
        outcome: &Outcome,
        now: Instant,
    ) -> Option<FleetWrite> {
        let (_, record) = self.settled(self.claimed_record(&fleet, id, now), outcome, now)?;
        let expected = match fleet.revision {
            Some(revision) => Expected::Revision(revision),
            None if fleet.in_doubt || fleet.awaiting => Expected::Value(fleet.claimed),
            None => return None,
        };
        let store = self.config().store.as_ref()?;
        Some(FleetWrite {
            target: self.store_call(Vec::new(), store.timeout)?,
            key: fleet.key,
            expected,
            releases: record.entry == Entry::Free,
            value: encode(&record),
            until: now.saturating_add(self.config().lease),
            next: now,
            backoff: FIRST_BACKOFF,
        })
    }
}

impl Idempotency {
    /// The fleet store decided otherwise than a claim: this Envoy's claim goes back, and the
    /// request gets the fleet's answer (`Ok`: it goes upstream unprotected, as `when_full:
    /// pass` says).
    pub fn fleet_decided<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        claim: &mut Option<Claim>,
        decision: KeyCheck,
    ) -> Result<(), Reply> {
        self.give_back(env, claim.take());
        self.count(env, &decision);
        let decision = match decision {
            // The record may be answered already, its write on the way from another Envoy
            // (sent within a tick): retry soon, not when the claim's lease would end.
            KeyCheck::InFlight { retry_after_secs } => KeyCheck::InFlight {
                retry_after_secs: retry_after_secs.min(1),
            },
            other => other,
        };
        match decision {
            KeyCheck::Replay(stored) => Err(Reply::replay(
                stored.status,
                stored.headers,
                stored.body,
                REPLAYED_HEADER,
            )),
            other => self.problem(&other).map_or(Ok(()), |p| Err(p.reply())),
        }
    }

    /// The fleet store gave no usable answer in time. `deny`: 503; `allow`: the request goes
    /// on under this Envoy's claim alone.
    pub fn fleet_unavailable<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        claim: &Option<Claim>,
        error: AnswerError,
    ) -> Result<(), Reply> {
        env.telemetry.increment(self.metrics.store_unavailable);
        let mode = self
            .config()
            .store
            .as_ref()
            .map_or(FailureMode::Deny, |store| store.on_store_error);
        // Either way the claim stays with the stream: when it ends, this Envoy's record and
        // any fleet record this claim may have written are settled as for any other.
        match mode {
            FailureMode::Allow => {
                if claim.as_ref().is_some_and(|claim| claim.local) {
                    self.count(env, &KeyCheck::Claimed);
                }
                Ok(())
            }
            FailureMode::Deny => {
                Err(Problem {
                    retry_after_secs: Some(1),
                    ..Problem::new(
                        503,
                        "store-unavailable",
                        GrpcStatus::UNAVAILABLE,
                        "Idempotency store unavailable",
                        format!(
                            "The store that keeps idempotency keys across proxies did not answer ({error:?}). Retry with the same key."
                        ),
                    )
                }
                .reply())
            }
        }
    }

    /// etcd granted the claim.
    pub fn fleet_claimed<S: Store>(&self, env: &mut Env<'_, S>) {
        self.count(env, &KeyCheck::Claimed);
    }

    /// A write the full queue dropped.
    pub fn fleet_write_dropped<S: Store>(&self, env: &mut Env<'_, S>) {
        env.telemetry.increment(self.metrics.store_writes_lost);
    }

    /// Frees this Envoy's record of a claim that will not go upstream.
    fn give_back<S: Store>(&self, env: &mut Env<'_, S>, claim: Option<Claim>) {
        if let Some(claim) = claim.filter(|claim| claim.local) {
            let freed = self.finish(
                env.store,
                env.namespace(),
                claim.id,
                Outcome::NotSent,
                env.now,
            );
            if let Err(err) = freed {
                env.store_failed("idempotency", err);
            }
        }
    }

    /// etcd's answer to a [`FleetWrite`]: `true` to send it again at its `next` (it failed,
    /// and its claim has not expired yet).
    pub fn fleet_written<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        write: &mut FleetWrite,
        answer: Option<(u16, &[u8])>,
    ) -> bool {
        let answer = answer.map_or(Err(AnswerError::NoAnswer), |(status, body)| {
            etcd::swapped(status, body)
        });
        let failure = match answer {
            Ok(Swapped::Written { .. }) => return false,
            // Its own earlier attempt landed, the answer lost.
            Ok(Swapped::Found(Some(found))) if found.value == write.value => return false,
            // Nothing there yet: the claim it settles may still commit (etcd can commit a
            // proposal after Envoy gave up waiting), so it is tried again until `until`.
            Ok(Swapped::Found(None)) if matches!(write.expected, Expected::Value(_)) => {
                AnswerError::NoAnswer
            }
            Ok(Swapped::Found(_)) => {
                env.telemetry.log(
                    Level::Info,
                    "idempotency: a fleet claim finished after another had taken its slot; its result was not stored"
                        .to_owned(),
                );
                return false;
            }
            Err(err) => err,
        };
        if env.now < write.until {
            write.next = env.now.saturating_add(write.backoff);
            write.backoff = (write.backoff * 2).min(MAX_BACKOFF);
            return true;
        }
        // A release that never landed costs nothing: the slot frees itself as the claim
        // expires. A result that never landed is lost.
        if !write.releases {
            env.telemetry.increment(self.metrics.store_writes_lost);
            env.telemetry.log(
                Level::Warn,
                format!("idempotency: a fleet record could not be written before its claim expired ({failure:?})"),
            );
        }
        false
    }
}

#[cfg(test)]
mod tests;
