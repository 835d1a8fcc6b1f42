//! Idempotency keys, as Envoy sees them: the decision waits for the request body, the
//! response is captured as it streams back, and the outcome is recorded when the stream ends.

use super::metrics::{Counter, Metrics};
use super::shared_data::SharedData;
use super::{Instance, LocalReply};
use crate::clock::Instant;
use crate::hashing::KeyHasher;
use crate::idempotency::{
    ClaimId, Decision, Finished, Idempotency, IdempotencyConfig, Outcome, Pending, Problem,
    StoredResponse, REPLAYED_HEADER,
};
use proxy_wasm::types::LogLevel;

pub struct IdempotencyPolicy {
    policy: Idempotency,
    claims: Counter,
    replays: Counter,
    conflicts: Counter,
    mismatches: Counter,
    rejected_keys: Counter,
    full: Counter,
    released: Counter,
    evictions: Counter,
}

/// A request holding a claim, and what has been seen of its response so far.
pub struct Claim {
    pending: Pending,
    id: u64,
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    body_complete: bool,
    too_large: bool,
}

impl IdempotencyPolicy {
    pub fn new(config: IdempotencyConfig, hasher: KeyHasher, metrics: &Metrics) -> Self {
        let counter = |what: &str| metrics.counter(&format!("idempotency.{what}"));
        Self {
            policy: Idempotency::new(config, hasher),
            claims: counter("claims"),
            replays: counter("replays"),
            conflicts: counter("conflicts"),
            mismatches: counter("mismatches"),
            rejected_keys: counter("rejected_keys"),
            full: counter("full"),
            released: counter("released"),
            evictions: counter("evictions"),
        }
    }

    pub fn policy(&self) -> &Idempotency {
        &self.policy
    }

    pub fn refuse_key(&self, problem: &Problem) -> LocalReply {
        self.rejected_keys.increment();
        problem_reply(problem)
    }

    /// For a body over the limit: the refusal, or `None` to let the request through unprotected.
    pub fn body_too_large(&self) -> Option<LocalReply> {
        self.policy
            .body_too_large()
            .map(|problem| problem_reply(&problem))
    }

    /// Decides a fingerprinted request: `Ok(Some(claim))` goes upstream holding the claim,
    /// `Ok(None)` goes upstream unprotected, `Err` is the local answer.
    pub fn decide(
        &self,
        instance: &Instance,
        pending: Pending,
        fingerprint: [u8; 32],
        now: Instant,
    ) -> Result<Option<Claim>, LocalReply> {
        let id = random_u64();
        let (decision, evicted) = match self.policy.decide(
            &SharedData,
            &instance.namespace,
            ClaimId { pending, claim: id },
            fingerprint,
            now,
            instance.shared_data,
        ) {
            Ok(decided) => decided,
            Err(err) => {
                instance.store_error("idempotency", err);
                return match instance.shared_data.on_error {
                    crate::config::FailureMode::Allow => Ok(None),
                    crate::config::FailureMode::Deny => Err(LocalReply::unavailable("idempotency")),
                };
            }
        };
        if evicted {
            self.evictions.increment();
        }
        match &decision {
            Decision::Claimed => {
                self.claims.increment();
                return Ok(Some(Claim {
                    pending,
                    id,
                    status: None,
                    headers: Vec::new(),
                    body: Vec::new(),
                    body_complete: false,
                    too_large: false,
                }));
            }
            Decision::Replay(stored) => {
                self.replays.increment();
                let mut headers = stored.headers.clone();
                headers.push((REPLAYED_HEADER.to_owned(), "true".to_owned()));
                return Err(LocalReply {
                    status: stored.status,
                    headers,
                    body: stored.body.clone(),
                });
            }
            Decision::InFlight { .. } | Decision::Unreplayable { .. } => self.conflicts.increment(),
            Decision::Mismatch => self.mismatches.increment(),
            Decision::Full => self.full.increment(),
        }
        match self.policy.problem(&decision) {
            Some(problem) => Err(problem_reply(&problem)),
            None => Ok(None),
        }
    }

    /// Notes the response's status and the headers worth storing.
    pub fn response_headers(
        &self,
        claim: &mut Claim,
        status: Option<u16>,
        header: impl Fn(&str) -> Option<String>,
        end_of_stream: bool,
    ) {
        claim.status = status;
        claim.headers = self
            .policy
            .config()
            .stored_headers
            .iter()
            .filter_map(|name| Some((name.clone(), header(name)?)))
            .collect();
        claim.body_complete = end_of_stream;
    }

    pub fn response_body(&self, claim: &mut Claim, chunk: &[u8], end_of_stream: bool) {
        if !claim.too_large {
            if claim.body.len() + chunk.len() > self.policy.config().max_response_bytes {
                claim.too_large = true;
                claim.body = Vec::new();
            } else {
                claim.body.extend_from_slice(chunk);
            }
        }
        claim.body_complete = end_of_stream;
    }

    /// Records how the claimed request ended (a later policy's refusal ends it with no response).
    pub fn finish(&self, instance: &Instance, claim: Claim, responded: bool, now: Instant) {
        let outcome = match claim.status.filter(|_| responded) {
            None => Outcome::NoResponse,
            Some(status) if claim.too_large || !claim.body_complete => {
                Outcome::ResponseNotStored { status }
            }
            Some(status) => Outcome::Response(StoredResponse {
                status,
                headers: claim.headers,
                body: claim.body,
            }),
        };
        match self.policy.finish(&SharedData, &instance.namespace, ClaimId { pending: claim.pending, claim: claim.id }, outcome, now, instance.shared_data) {
            Ok(Finished::Released) => self.released.increment(),
            Ok(Finished::Stored) => {}
            Ok(Finished::Superseded) => instance.log(LogLevel::Info, "idempotency: a claim finished after its lease had run out; its result was not stored"),
            Err(err) => instance.store_error("idempotency", err),
        }
    }

    /// Frees expired records from `cursor` on; returns where to go on next time.
    pub fn sweep(&self, instance: &Instance, cursor: u32, now: Instant) -> u32 {
        let (freed, next) = self.policy.sweep(
            &SharedData,
            &instance.namespace,
            cursor,
            SWEEP_PER_TICK,
            now,
            instance.shared_data,
        );
        self.evictions.add(u64::from(freed));
        next
    }
}

/// Slots each VM checks per second for expired records.
pub const SWEEP_PER_TICK: u32 = 256;

fn problem_reply(problem: &Problem) -> LocalReply {
    let mut headers = vec![(
        "content-type".to_owned(),
        "application/problem+json".to_owned(),
    )];
    if let Some(seconds) = problem.retry_after_secs {
        headers.push(("retry-after".to_owned(), seconds.to_string()));
    }
    LocalReply {
        status: problem.status,
        headers,
        body: problem.body().into_bytes(),
    }
}

/// A claim id no other stream will have: a fresh `RandomState` draws new keys from the VM's
/// randomness (WASI `random_get`).
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8)
}
