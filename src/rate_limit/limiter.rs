//! The rate-limit policy: every matching rule applies, and a request refused by one rule
//! takes no tokens from the others.

use super::config::{KeyPart, MissingKey, RateLimitConfig, Rule};
use super::table::{admit, refund, Slot};
use crate::clock::{ceil_secs, retry_after_secs};
use crate::hashing::KeyHasher;
use crate::policy::{Completion, Env, Needs, Policy};
use crate::reply::Reply;
use crate::request::{Field, KeyBuilder, RequestInfo};
use crate::store::{self, Store};
use crate::telemetry::{Catalog, Level, MetricId};

pub struct RateLimit {
    config: RateLimitConfig,
    hasher: KeyHasher,
    /// Per rule, in configuration order.
    metrics: Vec<RuleMetrics>,
}

struct RuleMetrics {
    allowed: MetricId,
    limited: MetricId,
    shadow_limited: MetricId,
}

/// Headers an admitted request carries to its response: the tightest rule's state.
pub type ResponseHeaders = Vec<(String, String)>;

/// A token taken that must be given back if a later rule refuses the request.
struct Taken<'a> {
    rule: &'a Rule,
    allowed: MetricId,
    slot_key: String,
    holder: u64,
}

impl RateLimit {
    pub fn new(config: RateLimitConfig, hasher: KeyHasher, catalog: &mut Catalog) -> Self {
        let metrics = config
            .rules
            .iter()
            .map(|rule| {
                let mut counter =
                    |what: &str| catalog.counter(&format!("rate_limit.{}.{what}", rule.name));
                RuleMetrics {
                    allowed: counter("allowed"),
                    limited: counter("limited"),
                    shadow_limited: counter("shadow_limited"),
                }
            })
            .collect();
        Self {
            config,
            hasher,
            metrics,
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Refunds what earlier rules took for a request that will not go ahead. It retries until
    /// it lands: a lost refund would leave a client with fewer tokens than it is owed.
    fn give_back<S: Store>(&self, env: &mut Env<'_, S>, taken: &[Taken<'_>]) {
        for t in taken {
            let refunded =
                store::settle::<Slot, _>(env.store, env.namespace(), &t.slot_key, |slot| {
                    ((), refund(&t.rule.bucket, slot, t.holder, t.rule.cost))
                });
            match refunded {
                Ok(updated) => env.conflicts(updated.conflicts),
                Err(err) => {
                    env.store_failed(&format!("rate limit rule {:?} refund", t.rule.name), err)
                }
            }
        }
    }

    /// The rule's bucket key for this request. `None`: the rule does not apply.
    ///
    /// A key header sent on several lines is ambiguous (which line would the upstream take?):
    /// every such request shares one bucket of the rule, whatever `on_missing_key` says, so
    /// rotating a first line buys no fresh bucket.
    fn key(&self, rule: &Rule, request: &RequestInfo) -> Option<Vec<u8>> {
        let mut key = KeyBuilder::default();
        for part in &rule.key {
            let address;
            let value = match part {
                KeyPart::ClientAddress => {
                    address = request
                        .client_address(self.config.trusted_hops)
                        .map(|ip| ip.to_string());
                    address.as_deref().map(str::as_bytes)
                }
                KeyPart::Method => Some(request.method.as_bytes()),
                KeyPart::Path => Some(request.path.as_bytes()),
                KeyPart::Header(name) => match request.field(name) {
                    Field::One(value) => Some(value),
                    Field::Missing => None,
                    Field::Repeated => {
                        key.repeated();
                        continue;
                    }
                },
            };
            if value.is_none() && rule.on_missing_key == MissingKey::Skip {
                return None;
            }
            key.part(value);
        }
        Some(key.finish())
    }
}

impl Policy for RateLimit {
    type Loan = ResponseHeaders;

    fn needs(&self) -> Needs {
        let keyed = self.config.rules.iter().flat_map(|rule| {
            rule.key.iter().filter_map(|part| match part {
                KeyPart::Header(name) => Some(name.as_str()),
                _ => None,
            })
        });
        let matched = self
            .config
            .rules
            .iter()
            .flat_map(|rule| rule.matcher.header_names());
        let forwarded = (self.config.trusted_hops > 0).then_some("x-forwarded-for");
        Needs {
            request: true,
            headers: keyed
                .chain(matched)
                .chain(forwarded)
                .map(str::to_owned)
                .collect(),
            peer: self
                .config
                .rules
                .iter()
                .any(|rule| rule.key.contains(&KeyPart::ClientAddress)),
            cluster: false,
        }
    }

    fn admit<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
    ) -> Result<ResponseHeaders, Reply> {
        let mut taken: Vec<Taken<'_>> = Vec::new();
        // The admitted rule with the fewest tokens left speaks for the response.
        let mut tightest: Option<(u64, String)> = None;
        for (rule, metrics) in self.config.rules.iter().zip(&self.metrics) {
            let key = rule
                .matcher
                .matches(request)
                .then(|| self.key(rule, request))
                .flatten();
            let Some(key) = key else {
                continue;
            };
            let placement = self.hasher.place(&key, rule.table_size);
            let slot_key = env
                .namespace()
                .key(&format!("rl/{}/{}", rule.name, placement.index));
            let now = env.now;
            let updated = store::update::<Slot, _>(
                env.store,
                env.namespace(),
                &slot_key,
                env.settings().max_attempts,
                |slot| {
                    let (check, holder, next) =
                        admit(&rule.bucket, slot, placement.owner, now, rule.cost);
                    ((check, holder), next)
                },
            );
            let (check, holder) = match updated {
                Ok(updated) => {
                    env.conflicts(updated.conflicts);
                    updated.decision
                }
                Err(err) => {
                    let what = format!("rate limit rule {:?}", rule.name);
                    if let Err(reply) = env.admission_failed("rate limit", &what, err) {
                        self.give_back(env, &taken);
                        return Err(reply);
                    }
                    continue;
                }
            };
            let state = format!(
                "\"{}\";r={};t={}",
                rule.name,
                check.remaining,
                ceil_secs(check.full_in)
            );
            if check.admitted {
                if tightest
                    .as_ref()
                    .is_none_or(|(remaining, _)| check.remaining < *remaining)
                {
                    tightest = Some((check.remaining, state));
                }
                taken.push(Taken {
                    rule,
                    allowed: metrics.allowed,
                    slot_key,
                    holder,
                });
            } else if rule.shadow {
                env.telemetry.increment(metrics.shadow_limited);
                env.telemetry.log(
                    Level::Info,
                    format!(
                        "shadow rule {:?} would refuse {} {}",
                        rule.name, request.method, request.path
                    ),
                );
            } else {
                env.telemetry.increment(metrics.limited);
                self.give_back(env, &taken);
                let own = vec![
                    (
                        "retry-after".to_owned(),
                        retry_after_secs(check.retry_after).to_string(),
                    ),
                    ("ratelimit-policy".to_owned(), rule.policy_item.clone()),
                    ("ratelimit".to_owned(), state),
                ];
                return Err(Reply::configured(
                    &self.config.limited_response,
                    own,
                    "resilience_rate_limited",
                ));
            }
        }
        // Counted once the request passed every rule: a token refunded was not an admission.
        for t in &taken {
            env.telemetry.increment(t.allowed);
        }
        Ok(match (tightest, self.config.headers_on_allowed) {
            (Some((_, state)), true) => {
                let policies: Vec<&str> =
                    taken.iter().map(|t| t.rule.policy_item.as_str()).collect();
                vec![
                    ("ratelimit-policy".to_owned(), policies.join(", ")),
                    ("ratelimit".to_owned(), state),
                ]
            }
            _ => Vec::new(),
        })
    }

    /// Tokens are spent, not lent: a request that a later stage refuses still counted against
    /// its client's rate, as with Envoy's `local_ratelimit`.
    fn release<S: Store>(&self, _: &mut Env<'_, S>, _: ResponseHeaders, _: &Completion) {}
}

#[cfg(test)]
mod tests;
