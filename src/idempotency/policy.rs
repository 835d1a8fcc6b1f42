//! The idempotency policy: claim a key once across all workers, store the response, replay
//! it to duplicates, refuse conflicts.

use super::capture::Capture;
use super::config::{IdempotencyConfig, IdentityPart, Overflow};
use super::fleet::{FleetClaim, FleetWrite};
use super::key::{parse_key, KeyError};
use super::record::{Entry, IdempotencyRecord, StoredResponse};
use crate::clock::{retry_after_secs, Instant};
use crate::decision::Decision;
use crate::grpc::GrpcStatus;
use crate::hashing::KeyHasher;
use crate::policy::{Completion, Env, Needs, Policy};
use crate::reply::{Refusal, Reply, PROBLEM_TYPE_BASE};
use crate::request::{Field, KeyBuilder, RequestInfo};
use crate::store::{self, Namespace, SharedDataSettings, Store, StoreError};
use crate::telemetry::{Catalog, Level, MetricId};
use sha2::{Digest, Sha256};
use std::cell::Cell;

pub struct Idempotency {
    config: IdempotencyConfig,
    hasher: KeyHasher,
    pub(super) metrics: Metrics,
    /// A request body has reached this VM's filter: `allow_on_headers_stop_iteration` is set.
    body_seen: Cell<bool>,
    /// The missing setting was named in the log already.
    hint_logged: Cell<bool>,
}

pub(super) struct Metrics {
    claims: MetricId,
    replays: MetricId,
    conflicts: MetricId,
    mismatches: MetricId,
    rejected_keys: MetricId,
    full: MetricId,
    released: MetricId,
    evictions: MetricId,
    body_timeouts: MetricId,
    unanswered: MetricId,
    /// Dry run: requests the policy would have answered itself, let through.
    shadow_passed: MetricId,
    /// Requests decided by `on_store_error`: the fleet store gave no answer in time.
    pub(super) store_unavailable: MetricId,
    /// Fleet writes still failing when their claim's lease ran out.
    pub(super) store_writes_lost: MetricId,
}

/// What an admitted request holds: its claim on the key, and its response so far.
#[derive(Debug)]
pub struct Claim {
    pub id: ClaimId,
    pub capture: Capture,
    /// Its claim in the fleet store, where there is one.
    pub fleet: Option<FleetClaim>,
    /// It holds this Envoy's slot too. Not so when another live key held that slot: with a
    /// fleet store the fleet's table decides alone, and this Envoy's stays as it is.
    pub local: bool,
}

/// A request the policy covers: where its record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub slot: u32,
    pub owner: u64,
    /// Where it lives in the fleet store, where there is one: placed by SHA-256, the same
    /// on every Envoy, where `slot` is placed with this Envoy's secret seed.
    pub fleet: Option<Placement>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub slot: u32,
    pub owner: u64,
}

/// A claim on a key: where the record lives, and which request holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimId {
    pub pending: Pending,
    /// Random per request, so a late report of an expired claim is recognised.
    pub claim: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// The policy does not cover this request.
    Skip,
    /// Answer at once: the key is missing or malformed.
    Refuse(Problem),
    /// Read the body, fingerprint the request, then [`Idempotency::decide`].
    Check(Pending),
}

#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// This request owns the key: send it upstream, then [`Idempotency::finish`].
    Claimed,
    /// Same key, same request, already executed: answer with the stored response.
    Replay(StoredResponse),
    /// Same key, same request, still executing elsewhere.
    InFlight { retry_after_secs: u64 },
    /// Same key, different request.
    Mismatch,
    /// Executed, but its response could not be stored.
    Unreplayable { status: u16 },
    /// Another key holds the slot and is still live, until `retry_after_secs` from now.
    Full { retry_after_secs: u64 },
}

/// How the claimed request ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered and the whole response was captured.
    Response(StoredResponse),
    /// The upstream answered, but the response was too large, ended early, or cannot be
    /// replayed: the request was executed, and is never executed again.
    ResponseNotStored { status: u16 },
    /// The upstream may have the request but never answered it (a timeout, a reset, a client
    /// that left while it was in flight): it may be executing still, so the claim stays until
    /// its lease runs out.
    Unanswered,
    /// The request never reached the upstream (a later stage or another filter answered, or
    /// the connection to the upstream failed): the key is free for a retry at once.
    NotSent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    Stored,
    /// The key is free again, so a retry can proceed.
    Released,
    /// The claim stays until its lease runs out: duplicates get 409 meanwhile.
    Kept,
    /// The claim's lease ran out and someone else holds the key now: nothing was written.
    Superseded,
}

/// An RFC 9457 problem, answered as `application/problem+json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    /// The last part of the problem type URI.
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub retry_after_secs: Option<u64>,
    /// What a gRPC call gets instead.
    pub grpc: GrpcStatus,
}

/// Marks a replayed response, as Stripe's `Idempotent-Replayed` does.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

impl Problem {
    /// The problem as a local reply; its type is `urn:envoy-resilience:idempotency:<kind>`,
    /// each listed, with what to do, in filters/idempotency/README.md.
    pub fn reply(&self) -> Reply {
        Reply::problem(
            self.status,
            Refusal {
                problem_type: &format!("{PROBLEM_TYPE_BASE}idempotency:{}", self.kind),
                title: self.title,
                detail: self.detail.clone(),
                violated_policies: &[],
                decision: Decision::new("idempotency", self.kind),
            },
            self.retry_after_secs,
            "resilience_idempotency",
            self.grpc,
        )
    }

    pub(super) fn new(
        status: u16,
        kind: &'static str,
        grpc: GrpcStatus,
        title: &'static str,
        detail: String,
    ) -> Problem {
        Problem {
            status,
            kind,
            title,
            detail,
            retry_after_secs: None,
            grpc,
        }
    }
}

impl Idempotency {
    pub fn new(config: IdempotencyConfig, hasher: KeyHasher, catalog: &mut Catalog) -> Self {
        let mut counter = |what: &str| catalog.counter(&format!("idempotency.{what}"));
        let metrics = Metrics {
            claims: counter("claims"),
            replays: counter("replays"),
            conflicts: counter("conflicts"),
            mismatches: counter("mismatches"),
            rejected_keys: counter("rejected_keys"),
            full: counter("full"),
            released: counter("released"),
            evictions: counter("evictions"),
            body_timeouts: counter("body_timeouts"),
            unanswered: counter("unanswered"),
            shadow_passed: counter("shadow_passed"),
            store_unavailable: counter("store_unavailable"),
            store_writes_lost: counter("store_writes_lost"),
        };
        Self {
            config,
            hasher,
            metrics,
            body_seen: Cell::new(false),
            hint_logged: Cell::new(false),
        }
    }

    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    /// The request's key: `Ok(None)` when the policy does not cover the request, `Err` when
    /// its key is missing (and required) or malformed. No hashing: cheap enough to ask twice.
    fn key<'r>(&self, request: &'r RequestInfo) -> Result<Option<&'r str>, Problem> {
        if !self.config.methods.contains(&request.method) || !self.config.matcher.matches(request) {
            return Ok(None);
        }
        let header = &self.config.header;
        let invalid = |why: &str| {
            Problem::new(
                400,
                "key-invalid",
                GrpcStatus::INVALID_ARGUMENT,
                "Invalid idempotency key",
                format!("The `{header}` header {why}."),
            )
        };
        let value = match request.field(header) {
            Field::One(value) => value,
            // Two keys for one request: no answer could be right for both.
            Field::Repeated => return Err(invalid("was sent more than once")),
            Field::Missing if self.config.required => {
                return Err(Problem::new(
                    400,
                    "key-missing",
                    GrpcStatus::INVALID_ARGUMENT,
                    "Idempotency key required",
                    format!("Send a unique `{header}` header with this {} request, and the same one when you retry it.", request.method),
                ))
            }
            Field::Missing => return Ok(None),
        };
        parse_key(value, self.config.max_key_length)
            .map(Some)
            .map_err(|err| match err {
                KeyError::Empty => invalid("is empty"),
                KeyError::TooLong => invalid(&format!(
                    "is longer than {} characters",
                    self.config.max_key_length
                )),
                KeyError::BadCharacter => {
                    invalid("may only hold letters, digits and - _ . : ~ + / =")
                }
                KeyError::Malformed => {
                    invalid("must be a token or a quoted string without escapes or parameters")
                }
            })
    }

    /// Whether the pipeline must hold this request until its body is in: the policy covers
    /// it and its key is well formed. A request refused for its key is answered at once.
    pub fn awaits_body(&self, request: &RequestInfo) -> bool {
        matches!(self.key(request), Ok(Some(_)))
    }

    pub fn begin(&self, request: &RequestInfo) -> Begin {
        let key = match self.key(request) {
            Ok(Some(key)) => key,
            Ok(None) => return Begin::Skip,
            Err(problem) => return Begin::Refuse(problem),
        };
        // Identity headers are hashed as the bytes they are, text or not.
        let mut scoped = KeyBuilder::default();
        for part in &self.config.identity {
            let (address, joined);
            let value = match part {
                IdentityPart::ClientAddress => {
                    address = request.peer.map(|ip| ip.to_string());
                    address.as_deref().map(str::as_bytes)
                }
                // Every line of an identity header, as one list: a client is its whole value.
                IdentityPart::Header(name) => {
                    joined = request.joined(name);
                    joined.as_deref()
                }
            };
            scoped.part(value);
        }
        scoped.part(Some(key.as_bytes()));
        let scoped = scoped.finish();
        let placement = self.hasher.place(&scoped, self.config.records);
        Begin::Check(Pending {
            slot: placement.index,
            owner: placement.owner,
            fleet: self
                .config
                .store
                .is_some()
                .then(|| self.fleet_place(&scoped)),
        })
    }

    /// SHA-256 over the method, the path with its query (as received), and the body.
    pub fn fingerprint(method: &str, path_and_query: &[u8], body: &[u8]) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [method.as_bytes(), path_and_query, body] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }

    /// The refusal for a body over `max_body_bytes`, or `None` to let it through unprotected.
    pub fn body_too_large(&self) -> Option<Problem> {
        (self.config.on_large_body == Overflow::Reject).then(|| {
            Problem::new(
                413,
                "body-too-large",
                GrpcStatus::RESOURCE_EXHAUSTED,
                "Request too large for an idempotent request",
                format!(
                    "Requests with an idempotency key may carry at most {} bytes of body.",
                    self.config.max_body_bytes
                ),
            )
        })
    }

    /// The answer to a decision other than a claim (for `Full`, `None` means: pass unprotected).
    pub fn problem(&self, decision: &KeyCheck) -> Option<Problem> {
        let header = &self.config.header;
        Some(match decision {
            KeyCheck::Claimed | KeyCheck::Replay(_) => return None,
            KeyCheck::InFlight { retry_after_secs } => Problem {
                retry_after_secs: Some(*retry_after_secs),
                ..Problem::new(409, "in-flight", GrpcStatus::ABORTED, "Request in progress", format!("A request with this `{header}` is still being processed. Retry it later with the same key to get its response."))
            },
            KeyCheck::Mismatch => Problem::new(
                422,
                "key-reused",
                GrpcStatus::INVALID_ARGUMENT,
                "Idempotency key reused",
                format!("This `{header}` was used for a different request (method, path, query or body). Use a new key for a new request."),
            ),
            KeyCheck::Unreplayable { status } => Problem::new(
                409,
                "not-replayable",
                GrpcStatus::ALREADY_EXISTS,
                "Request already executed",
                format!("The request with this `{header}` was executed and answered {status}, but its response could not be stored (too large, cut short, or not replayable). It will not be executed again."),
            ),
            KeyCheck::Full { .. } if self.config.when_full == Overflow::Pass => return None,
            KeyCheck::Full { retry_after_secs } => Problem {
                retry_after_secs: Some(*retry_after_secs),
                ..Problem::new(503, "store-full", GrpcStatus::RESOURCE_EXHAUSTED, "Idempotency store full", "The idempotency store has no room for this key right now. Retry later.".to_owned())
            },
        })
    }

    fn slot_key(&self, namespace: &Namespace, slot: u32) -> String {
        namespace.key(&format!("idem/{slot}"))
    }

    /// Claims the key for `claim`, or says why not. Also reports whether an expired record
    /// was evicted to make room.
    pub fn decide(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        id: ClaimId,
        fingerprint: [u8; 32],
        now: Instant,
        settings: SharedDataSettings,
    ) -> Result<(KeyCheck, bool), StoreError> {
        let (pending, claim) = (id.pending, id.claim);
        let key = self.slot_key(namespace, pending.slot);
        let updated = store::update::<IdempotencyRecord, _>(
            store,
            namespace,
            &key,
            settings.max_attempts,
            |record| self.judge(record, pending.owner, fingerprint, claim, now),
        )?;
        Ok(updated.decision)
    }

    /// What a record means for a request, in either tier: the decision, whether an expired
    /// record was evicted, and the record to write.
    pub(super) fn judge(
        &self,
        record: Option<IdempotencyRecord>,
        owner: u64,
        fingerprint: [u8; 32],
        claim: u64,
        now: Instant,
    ) -> ((KeyCheck, bool), Option<IdempotencyRecord>) {
        let record = record.unwrap_or_else(IdempotencyRecord::free);
        if !record.is_live(now) {
            let evicted = record.entry != Entry::Free;
            let claimed = IdempotencyRecord {
                owner,
                fingerprint,
                deadline: now.saturating_add(self.config.lease),
                entry: Entry::InFlight { claim },
            };
            return ((KeyCheck::Claimed, evicted), Some(claimed));
        }
        let live_for = retry_after_secs(record.deadline.saturating_since(now));
        let decision = if record.owner != owner {
            KeyCheck::Full {
                retry_after_secs: live_for,
            }
        } else if record.fingerprint != fingerprint {
            KeyCheck::Mismatch
        } else {
            match record.entry {
                Entry::InFlight { .. } => KeyCheck::InFlight {
                    retry_after_secs: live_for,
                },
                Entry::Completed(response) => KeyCheck::Replay(response),
                Entry::Unreplayable { status } => KeyCheck::Unreplayable { status },
                Entry::Free => KeyCheck::Full {
                    retry_after_secs: live_for,
                },
            }
        };
        ((decision, false), None)
    }

    /// The record a finished claim leaves: the stored response or its status for as long as
    /// it is kept, or a free record; `None`: the claim stays until its lease runs out.
    pub(super) fn settled(
        &self,
        mut record: IdempotencyRecord,
        outcome: &Outcome,
        now: Instant,
    ) -> Option<(Finished, IdempotencyRecord)> {
        let kept = match outcome {
            Outcome::Response(response) => self
                .config
                .keep_for(response.status)
                .map(|ttl| (ttl, Entry::Completed(response.clone()))),
            Outcome::ResponseNotStored { status } => self
                .config
                .keep_for(*status)
                .map(|ttl| (ttl, Entry::Unreplayable { status: *status })),
            Outcome::Unanswered => return None,
            Outcome::NotSent => None,
        };
        Some(match kept {
            Some((ttl, entry)) => {
                record.entry = entry;
                record.deadline = now.saturating_add(ttl);
                (Finished::Stored, record)
            }
            None => (Finished::Released, IdempotencyRecord::free()),
        })
    }

    /// Records how the claimed request ended: stores the response, or frees the key. It
    /// retries until it lands: a lost result would hold the key until its lease ran out.
    pub fn finish(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        id: ClaimId,
        outcome: Outcome,
        now: Instant,
    ) -> Result<Finished, StoreError> {
        let (pending, claim) = (id.pending, id.claim);
        let key = self.slot_key(namespace, pending.slot);
        let updated = store::settle::<IdempotencyRecord, _>(store, namespace, &key, |record| {
            let Some(record) =
                record.filter(|r| r.owner == pending.owner && r.entry == Entry::InFlight { claim })
            else {
                return (Finished::Superseded, None);
            };
            match self.settled(record, &outcome, now) {
                Some((finished, record)) => (finished, Some(record)),
                None => (Finished::Kept, None),
            }
        })?;
        Ok(updated.decision)
    }

    /// Frees up to `count` expired records from slot `start` on, so their bytes go back to
    /// Envoy; returns how many it freed and where to go on next time.
    pub fn sweep(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        start: u32,
        count: u32,
        now: Instant,
        settings: SharedDataSettings,
    ) -> (u32, u32) {
        let mut freed = 0;
        let records = self.config.records;
        for i in 0..count.min(records) {
            let slot = (start + i) % records;
            let key = self.slot_key(namespace, slot);
            // A slot that is missing, unreadable, free or live decides to write nothing.
            let swept = store::update::<IdempotencyRecord, _>(
                store,
                namespace,
                &key,
                settings.max_attempts,
                |record| match record {
                    Some(r) if r.entry != Entry::Free && !r.is_live(now) => {
                        (true, Some(IdempotencyRecord::free()))
                    }
                    _ => (false, None),
                },
            );
            freed += u32::from(swept.is_ok_and(|u| u.decision));
        }
        (freed, (start + count.min(records)) % records)
    }
}

/// Slots each VM checks per second for expired records.
pub const SWEEP_PER_SECOND: u32 = 256;

impl Idempotency {
    /// A request body reached the filter: the plugin config lets bodies through.
    /// Dry run: the request goes on although the policy would have answered it with `reply`.
    pub fn shadow_pass<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
        reply: &Reply,
    ) {
        env.telemetry.increment(self.metrics.shadow_passed);
        env.telemetry.log(
            Level::Info,
            format!(
                "shadow idempotency would answer {} {} itself ({} {})",
                request.method, request.path, reply.status, reply.decision.outcome
            ),
        );
    }

    pub fn saw_body(&self) {
        self.body_seen.set(true);
    }

    /// The answer to a request whose body did not arrive within `body_timeout`: it never went
    /// upstream. While no body has reached this VM's filter at all, the likely cause is a
    /// missing setting, which is named once.
    pub fn body_timed_out<S: Store>(&self, env: &mut Env<'_, S>) -> Reply {
        env.telemetry.increment(self.metrics.body_timeouts);
        if !self.body_seen.get() && !self.hint_logged.replace(true) {
            env.telemetry.log(
                Level::Error,
                format!(
                    "idempotency: a request body did not reach the filter within {}, and none has yet. \
                     If every request with a body times out, set `allow_on_headers_stop_iteration: true` \
                     in this Wasm plugin's config: without it Envoy holds bodies back from the filter.",
                    humantime::format_duration(self.config.body_timeout)
                ),
            );
        }
        Problem::new(
            408,
            "body-timeout",
            GrpcStatus::DEADLINE_EXCEEDED,
            "Request body too slow",
            format!(
                "The body of a request with an idempotency key must arrive within {}. Retry with the same key.",
                humantime::format_duration(self.config.body_timeout)
            ),
        )
        .reply()
    }

    /// Frees expired records from `cursor` on; returns where to go on next time.
    pub fn sweep_step<S: Store>(&self, env: &mut Env<'_, S>, cursor: u32) -> u32 {
        let (freed, next) = self.sweep(
            env.store,
            env.namespace(),
            cursor,
            SWEEP_PER_SECOND,
            env.now,
            env.settings(),
        );
        env.telemetry.add(self.metrics.evictions, u64::from(freed));
        next
    }

    pub(super) fn count(&self, env: &mut Env<'_, impl Store>, decision: &KeyCheck) {
        let metric = match decision {
            KeyCheck::Claimed => self.metrics.claims,
            KeyCheck::Replay(_) => self.metrics.replays,
            KeyCheck::InFlight { .. } | KeyCheck::Unreplayable { .. } => self.metrics.conflicts,
            KeyCheck::Mismatch => self.metrics.mismatches,
            KeyCheck::Full { .. } => self.metrics.full,
        };
        env.telemetry.increment(metric);
    }
}

impl Policy for Idempotency {
    /// `None`: the request goes upstream unprotected (not covered, or `pass` chose so).
    type Loan = Option<Claim>;

    fn needs(&self) -> Needs {
        let identity = self.config.identity.iter().filter_map(|part| match part {
            IdentityPart::Header(name) => Some(name.as_str()),
            IdentityPart::ClientAddress => None,
        });
        Needs {
            request: true,
            // Its methods, and the fingerprint of every keyed request.
            request_line: true,
            headers: identity
                .chain(self.config.matcher.header_names())
                .chain(std::iter::once(self.config.header.as_str()))
                .map(str::to_owned)
                .collect(),
            peer: self.config.identity.contains(&IdentityPart::ClientAddress),
            cluster: false,
        }
    }

    /// Decides a request whose body is in `request.body` (the pipeline waited for it when
    /// [`Idempotency::awaits_body`] said so).
    fn admit<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
    ) -> Result<Option<Claim>, Reply> {
        let pending = match self.begin(request) {
            Begin::Skip => return Ok(None),
            Begin::Refuse(problem) => {
                env.telemetry.increment(self.metrics.rejected_keys);
                return Err(problem.reply());
            }
            Begin::Check(pending) => pending,
        };
        let fingerprint =
            Self::fingerprint(&request.method, &request.path_and_query, &request.body);
        let id = ClaimId {
            pending,
            claim: (env.random)(),
        };
        let decided = self.decide(
            env.store,
            env.namespace(),
            id,
            fingerprint,
            env.now,
            env.settings(),
        );
        let (decision, evicted) = match decided {
            Ok(decided) => decided,
            Err(err) => {
                // Its dry run is the pipeline's: it lets the refusal through, named.
                env.admission_failed("idempotency", "idempotency", err, false)?;
                return Ok(None);
            }
        };
        if evicted {
            env.telemetry.increment(self.metrics.evictions);
        }
        let fleet = self.fleet_claim(&env.instance.name, pending.fleet, fingerprint);
        // With a fleet store, a claim counts once etcd has granted it too, and a slot full
        // here is no answer yet: the fleet's table may have room, or the stored response.
        let local = match (&decision, fleet.is_some()) {
            (KeyCheck::Claimed, true) => true,
            (KeyCheck::Full { .. }, true) => false,
            _ => {
                self.count(env, &decision);
                decision == KeyCheck::Claimed
            }
        };
        match decision {
            KeyCheck::Claimed | KeyCheck::Full { .. } if fleet.is_some() => Ok(Some(Claim {
                id,
                capture: Capture::default(),
                fleet,
                local,
            })),
            KeyCheck::Claimed => Ok(Some(Claim {
                id,
                capture: Capture::default(),
                fleet: None,
                local: true,
            })),
            KeyCheck::Replay(stored) => Err(Reply::replay(
                stored.status,
                stored.headers,
                stored.body,
                REPLAYED_HEADER,
            )),
            other => self.problem(&other).map_or(Ok(None), |p| Err(p.reply())),
        }
    }

    /// Stores what the upstream answered; frees the key when the request never reached the
    /// upstream; keeps it claimed, until its lease runs out, when the upstream may have the
    /// request and never answered.
    fn release<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        claim: Option<Claim>,
        completion: &Completion,
    ) {
        // The pipeline calls finish_claim itself, to send the fleet write it returns.
        if let Some(claim) = claim {
            let _ = self.finish_claim(env, claim, completion);
        }
    }
}

impl Idempotency {
    /// Settles a claim when its stream ends: in this Envoy's table now, and in the fleet
    /// store by the write it returns, which the host sends.
    pub fn finish_claim<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        mut claim: Claim,
        completion: &Completion,
    ) -> Option<FleetWrite> {
        let fleet = claim.fleet.take();
        let outcome = claim.capture.outcome(completion);
        let write = fleet.and_then(|fleet| self.fleet_finish(fleet, claim.id, &outcome, env.now));
        if claim.local {
            self.settle_local(env, claim.id, outcome);
        }
        write
    }

    /// Records in this Envoy's table how a claim ended.
    fn settle_local<S: Store>(&self, env: &mut Env<'_, S>, id: ClaimId, outcome: Outcome) {
        match self.finish(env.store, env.namespace(), id, outcome, env.now) {
            Ok(Finished::Released) => env.telemetry.increment(self.metrics.released),
            Ok(Finished::Kept) => env.telemetry.increment(self.metrics.unanswered),
            Ok(Finished::Stored) => {}
            Ok(Finished::Superseded) => env.telemetry.log(
                Level::Info,
                "idempotency: a claim finished after its lease had run out; its result was not stored"
                    .to_owned(),
            ),
            Err(err) => env.store_failed("idempotency", err),
        }
    }
}

#[cfg(test)]
mod tests;
