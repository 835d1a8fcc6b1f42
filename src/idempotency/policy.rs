//! The idempotency policy: claim a key once across all workers, store the response, replay
//! it to duplicates, refuse conflicts.

use super::config::{IdempotencyConfig, IdentityPart, Overflow};
use super::key::{parse_key, KeyError};
use super::record::{Entry, IdempotencyRecord, StoredResponse};
use crate::clock::{retry_after_secs, Instant};
use crate::config::SharedDataSettings;
use crate::hashing::KeyHasher;
use crate::rate_limit::client_address;
use crate::request::RequestInfo;
use crate::store::{self, Namespace, Store, StoreError};
use sha2::{Digest, Sha256};

pub struct Idempotency {
    config: IdempotencyConfig,
    hasher: KeyHasher,
}

/// A request the policy covers: where its record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
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
pub enum Decision {
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
    /// Another key holds the slot and is still live.
    Full,
}

/// How the claimed request ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered and the whole response was captured.
    Response(StoredResponse),
    /// The upstream answered, but the response was too large or ended early.
    ResponseNotStored { status: u16 },
    /// No response: the client went away, the upstream reset, or a later policy refused.
    NoResponse,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    Stored,
    /// The key is free again, so a retry can proceed.
    Released,
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
}

/// Problem types are URNs; each is listed, with what to do, in filters/idempotency/README.md.
pub const PROBLEM_TYPE_BASE: &str = "urn:envoy-resilience:idempotency:";
/// Marks a replayed response, as Stripe's `Idempotent-Replayed` does.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

impl Problem {
    pub fn body(&self) -> String {
        serde_json::json!({
            "type": format!("{PROBLEM_TYPE_BASE}{}", self.kind),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        })
        .to_string()
    }

    fn new(status: u16, kind: &'static str, title: &'static str, detail: String) -> Problem {
        Problem {
            status,
            kind,
            title,
            detail,
            retry_after_secs: None,
        }
    }
}

impl Idempotency {
    pub fn new(config: IdempotencyConfig, hasher: KeyHasher) -> Self {
        Self { config, hasher }
    }

    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    pub fn begin(&self, request: &RequestInfo) -> Begin {
        if !self.config.methods.contains(&request.method) || !self.config.matcher.matches(request) {
            return Begin::Skip;
        }
        let header = &self.config.header;
        let Some(value) = request.header(header) else {
            return if self.config.required {
                Begin::Refuse(Problem::new(
                    400,
                    "key-missing",
                    "Idempotency key required",
                    format!("Send a unique `{header}` header with this {} request, and the same one when you retry it.", request.method),
                ))
            } else {
                Begin::Skip
            };
        };
        let key = match parse_key(value, self.config.max_key_length) {
            Ok(key) => key,
            Err(err) => {
                let why = match err {
                    KeyError::Empty => "is empty".to_owned(),
                    KeyError::TooLong => {
                        format!("is longer than {} characters", self.config.max_key_length)
                    }
                    KeyError::BadCharacter => {
                        "may only hold letters, digits and - _ . : ~ + / =".to_owned()
                    }
                    KeyError::Malformed => {
                        "must be a token or a quoted string without escapes or parameters"
                            .to_owned()
                    }
                };
                return Begin::Refuse(Problem::new(
                    400,
                    "key-invalid",
                    "Invalid idempotency key",
                    format!("The `{header}` header {why}."),
                ));
            }
        };
        // Length-prefixed parts, so no choice of values makes two identities collide.
        let mut scoped = Vec::new();
        for part in &self.config.identity {
            let address;
            let value = match part {
                IdentityPart::ClientAddress => {
                    address = client_address(request, 0).map(|ip| ip.to_string());
                    address.as_deref()
                }
                IdentityPart::Header(name) => request.header(name),
            };
            match value {
                Some(value) => {
                    scoped.extend_from_slice(&(value.len() as u32).to_le_bytes());
                    scoped.extend_from_slice(value.as_bytes());
                }
                None => scoped.extend_from_slice(&u32::MAX.to_le_bytes()),
            }
        }
        scoped.extend_from_slice(key.as_bytes());
        let placement = self.hasher.place(&scoped, self.config.records);
        Begin::Check(Pending {
            slot: placement.index,
            owner: placement.owner,
        })
    }

    /// SHA-256 over the method, the path with its query, and the body.
    pub fn fingerprint(method: &str, path_and_query: &str, body: &[u8]) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [method.as_bytes(), path_and_query.as_bytes(), body] {
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
                "Request too large for an idempotent request",
                format!(
                    "Requests with an idempotency key may carry at most {} bytes of body.",
                    self.config.max_body_bytes
                ),
            )
        })
    }

    /// The answer to a decision other than a claim (for `Full`, `None` means: pass unprotected).
    pub fn problem(&self, decision: &Decision) -> Option<Problem> {
        let header = &self.config.header;
        Some(match decision {
            Decision::Claimed | Decision::Replay(_) => return None,
            Decision::InFlight { retry_after_secs } => Problem {
                retry_after_secs: Some(*retry_after_secs),
                ..Problem::new(409, "in-flight", "Request in progress", format!("A request with this `{header}` is still being processed. Retry it later with the same key to get its response."))
            },
            Decision::Mismatch => Problem::new(
                422,
                "key-reused",
                "Idempotency key reused",
                format!("This `{header}` was used for a different request (method, path, query or body). Use a new key for a new request."),
            ),
            Decision::Unreplayable { status } => Problem::new(
                409,
                "not-replayable",
                "Request already executed",
                format!("The request with this `{header}` was executed and answered {status}, but its response was too large to store. It will not be executed again."),
            ),
            Decision::Full if self.config.when_full == Overflow::Pass => return None,
            Decision::Full => Problem {
                retry_after_secs: Some(retry_after_secs(self.config.lease)),
                ..Problem::new(503, "store-full", "Idempotency store full", "The idempotency store has no room for this key right now. Retry later.".to_owned())
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
    ) -> Result<(Decision, bool), StoreError> {
        let (pending, claim) = (id.pending, id.claim);
        let key = self.slot_key(namespace, pending.slot);
        let updated = store::update::<IdempotencyRecord, _>(
            store,
            namespace,
            &key,
            settings.max_attempts,
            |record| {
                let record = record.unwrap_or_else(IdempotencyRecord::free);
                if !record.is_live(now) {
                    let evicted = record.entry != Entry::Free;
                    let claimed = IdempotencyRecord {
                        owner: pending.owner,
                        fingerprint,
                        deadline: now.saturating_add(self.config.lease),
                        entry: Entry::InFlight { claim },
                    };
                    return ((Decision::Claimed, evicted), Some(claimed));
                }
                let decision = if record.owner != pending.owner {
                    Decision::Full
                } else if record.fingerprint != fingerprint {
                    Decision::Mismatch
                } else {
                    match record.entry {
                        Entry::InFlight { .. } => Decision::InFlight {
                            retry_after_secs: retry_after_secs(
                                record.deadline.saturating_since(now),
                            ),
                        },
                        Entry::Completed(response) => Decision::Replay(response),
                        Entry::Unreplayable { status } => Decision::Unreplayable { status },
                        Entry::Free => Decision::Full,
                    }
                };
                ((decision, false), None)
            },
        )?;
        Ok(updated.decision)
    }

    /// Records how the claimed request ended: stores the response, or frees the key.
    pub fn finish(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        id: ClaimId,
        outcome: Outcome,
        now: Instant,
        settings: SharedDataSettings,
    ) -> Result<Finished, StoreError> {
        let (pending, claim) = (id.pending, id.claim);
        let key = self.slot_key(namespace, pending.slot);
        let updated = store::update::<IdempotencyRecord, _>(
            store,
            namespace,
            &key,
            settings.max_attempts,
            |record| {
                let Some(mut record) = record
                    .filter(|r| r.owner == pending.owner && r.entry == Entry::InFlight { claim })
                else {
                    return (Finished::Superseded, None);
                };
                let kept = match &outcome {
                    Outcome::Response(response) => self
                        .config
                        .keep_for(response.status)
                        .map(|ttl| (ttl, Entry::Completed(response.clone()))),
                    Outcome::ResponseNotStored { status } => self
                        .config
                        .keep_for(*status)
                        .map(|ttl| (ttl, Entry::Unreplayable { status: *status })),
                    Outcome::NoResponse => None,
                };
                match kept {
                    Some((ttl, entry)) => {
                        record.entry = entry;
                        record.deadline = now.saturating_add(ttl);
                        (Finished::Stored, Some(record))
                    }
                    None => (Finished::Released, Some(IdempotencyRecord::free())),
                }
            },
        )?;
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

#[cfg(test)]
mod tests;
