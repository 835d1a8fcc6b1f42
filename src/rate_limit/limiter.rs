//! The rate-limit policy: every matching rule applies, and a request refused by one rule
//! takes no tokens from the others.

use super::config::{KeyPart, MissingKey, RateLimitConfig, Rule};
use super::table::{admit, refund, Slot};
use crate::clock::{ceil_secs, retry_after_secs, Instant};
use crate::config::{FailureMode, SharedDataSettings};
use crate::hashing::KeyHasher;
use crate::request::RequestInfo;
use crate::store::{self, Namespace, Store, StoreError};
use std::net::IpAddr;

pub struct RateLimiter {
    config: RateLimitConfig,
    hasher: KeyHasher,
}

/// What happened to each rule, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleOutcome {
    NotApplied,
    Allowed,
    Limited,
    /// A shadow rule that would have refused the request.
    ShadowLimited,
    Failed(StoreError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the request through; the headers go on its response.
    Allow { headers: Vec<(String, String)> },
    /// Answer locally: the configured limited response plus the rate-limit headers.
    Limited {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Shared data failed and `shared_data.on_error` is `deny`.
    Unavailable,
}

#[derive(Debug)]
pub struct Decision {
    pub verdict: Verdict,
    /// One per rule evaluated, in configuration order; rules after a refusal are not.
    pub outcomes: Vec<RuleOutcome>,
    /// Compare-and-swap attempts lost to other workers.
    pub conflicts: u32,
}

/// A token taken that must be given back if a later rule refuses the request.
struct Taken<'a> {
    rule: &'a Rule,
    slot_key: String,
    holder: u64,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig, hasher: KeyHasher) -> Self {
        Self { config, hasher }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    pub fn decide(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        request: &RequestInfo,
        now: Instant,
        shared_data: SharedDataSettings,
    ) -> Decision {
        let mut outcomes = Vec::with_capacity(self.config.rules.len());
        let mut conflicts = 0;
        let mut taken: Vec<Taken<'_>> = Vec::new();
        // The admitted rule with the fewest tokens left speaks for the response.
        let mut tightest: Option<(u64, String)> = None;

        for rule in &self.config.rules {
            let key = rule
                .matcher
                .matches(request)
                .then(|| self.key(rule, request))
                .flatten();
            let Some(key) = key else {
                outcomes.push(RuleOutcome::NotApplied);
                continue;
            };
            let placement = self.hasher.place(&key, rule.table_size);
            let slot_key = namespace.key(&format!("rl/{}/{}", rule.name, placement.index));
            let updated = store::update::<Slot, _>(
                store,
                namespace,
                &slot_key,
                shared_data.max_attempts,
                |slot| {
                    let (check, holder, next) =
                        admit(&rule.bucket, slot, placement.owner, now, rule.cost);
                    ((check, holder), next)
                },
            );
            let (check, holder) = match updated {
                Ok(updated) => {
                    conflicts += updated.conflicts;
                    updated.decision
                }
                Err(err) => {
                    outcomes.push(RuleOutcome::Failed(err));
                    if shared_data.on_error == FailureMode::Deny {
                        conflicts += self.give_back(store, namespace, &taken, shared_data);
                        return Decision {
                            verdict: Verdict::Unavailable,
                            outcomes,
                            conflicts,
                        };
                    }
                    continue;
                }
            };
            if check.admitted {
                outcomes.push(RuleOutcome::Allowed);
                if tightest
                    .as_ref()
                    .is_none_or(|(remaining, _)| check.remaining < *remaining)
                {
                    let state = format!(
                        "\"{}\";r={};t={}",
                        rule.name,
                        check.remaining,
                        ceil_secs(check.full_in)
                    );
                    tightest = Some((check.remaining, state));
                }
                taken.push(Taken {
                    rule,
                    slot_key,
                    holder,
                });
            } else if rule.shadow {
                outcomes.push(RuleOutcome::ShadowLimited);
            } else {
                outcomes.push(RuleOutcome::Limited);
                conflicts += self.give_back(store, namespace, &taken, shared_data);
                let response = &self.config.limited_response;
                let headers = response.headers_with(vec![
                    (
                        "retry-after".to_owned(),
                        retry_after_secs(check.retry_after).to_string(),
                    ),
                    ("ratelimit-policy".to_owned(), rule.policy_item.clone()),
                    (
                        "ratelimit".to_owned(),
                        format!(
                            "\"{}\";r={};t={}",
                            rule.name,
                            check.remaining,
                            ceil_secs(check.full_in)
                        ),
                    ),
                ]);
                return Decision {
                    verdict: Verdict::Limited {
                        status: response.status,
                        body: response.body.clone(),
                        headers,
                    },
                    outcomes,
                    conflicts,
                };
            }
        }
        let headers = match (tightest, self.config.headers_on_allowed) {
            (Some((_, state)), true) => {
                let policies: Vec<&str> =
                    taken.iter().map(|t| t.rule.policy_item.as_str()).collect();
                vec![
                    ("ratelimit-policy".to_owned(), policies.join(", ")),
                    ("ratelimit".to_owned(), state),
                ]
            }
            _ => Vec::new(),
        };
        Decision {
            verdict: Verdict::Allow { headers },
            outcomes,
            conflicts,
        }
    }

    /// Refunds what earlier rules took for a request that will not go ahead. Best effort: a
    /// refund that fails leaves the bucket stricter than it should be, never looser.
    fn give_back(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        taken: &[Taken<'_>],
        shared_data: SharedDataSettings,
    ) -> u32 {
        let mut conflicts = 0;
        for t in taken {
            let refunded = store::update::<Slot, _>(
                store,
                namespace,
                &t.slot_key,
                shared_data.max_attempts,
                |slot| ((), refund(&t.rule.bucket, slot, t.holder, t.rule.cost)),
            );
            conflicts += refunded.map_or(0, |updated| updated.conflicts);
        }
        conflicts
    }

    /// The rule's bucket key for this request: each part length-prefixed, so no choice of
    /// header values can make two different part lists collide. `None`: the rule does not apply.
    fn key(&self, rule: &Rule, request: &RequestInfo) -> Option<Vec<u8>> {
        let mut key = Vec::new();
        for part in &rule.key {
            let address;
            let value = match part {
                KeyPart::ClientAddress => {
                    address =
                        client_address(request, self.config.trusted_hops).map(|ip| ip.to_string());
                    address.as_deref()
                }
                KeyPart::Method => Some(request.method.as_str()),
                KeyPart::Path => Some(request.path.as_str()),
                KeyPart::Header(name) => request.header(name),
            };
            match (value, rule.on_missing_key) {
                (Some(value), _) => {
                    key.extend_from_slice(&(value.len() as u32).to_le_bytes());
                    key.extend_from_slice(value.as_bytes());
                }
                (None, MissingKey::Shared) => key.extend_from_slice(&u32::MAX.to_le_bytes()),
                (None, MissingKey::Skip) => return None,
            }
        }
        Some(key)
    }
}

/// The client's address, for an Envoy whose connection manager has `use_remote_address:
/// true` (without it Envoy itself takes the downstream address from `X-Forwarded-For`, and
/// any client can choose it).
///
/// With `trusted_hops` = 0 it is the connection's peer, and `X-Forwarded-For` is ignored.
/// With N > 0 trusted proxies in front of Envoy, each appending the address it saw, the
/// client is the N-th entry from the right of the header as it arrived; the last entry, which
/// Envoy appended itself, is skipped. A header with too few entries did not come through
/// those proxies, so the peer is used. An entry that is not an IP address counts as missing.
pub fn client_address(request: &RequestInfo, trusted_hops: u32) -> Option<IpAddr> {
    if trusted_hops == 0 {
        return request.peer;
    }
    let Some(forwarded) = request.header("x-forwarded-for") else {
        return request.peer;
    };
    let entries: Vec<&str> = forwarded.split(',').map(str::trim).collect();
    let arrived = &entries[..entries.len().saturating_sub(1)];
    match arrived.len().checked_sub(trusted_hops as usize) {
        Some(index) => arrived[index].parse().ok(),
        None => request.peer,
    }
}

#[cfg(test)]
mod tests;
