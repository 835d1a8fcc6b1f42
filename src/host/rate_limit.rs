//! Rate limiting, as Envoy sees it: decisions into metrics, log lines and local replies.

use super::metrics::{Counter, Metrics};
use super::shared_data::SharedData;
use super::{Instance, LocalReply};
use crate::clock::Instant;
use crate::hashing::KeyHasher;
use crate::rate_limit::{RateLimitConfig, RateLimiter, RuleOutcome, Verdict};
use crate::request::RequestInfo;
use proxy_wasm::types::LogLevel;

pub struct RateLimitPolicy {
    limiter: RateLimiter,
    /// Per rule, in configuration order.
    rules: Vec<RuleMetrics>,
}

struct RuleMetrics {
    name: String,
    allowed: Counter,
    limited: Counter,
    shadow_limited: Counter,
}

impl RateLimitPolicy {
    pub fn new(config: RateLimitConfig, hasher: KeyHasher, metrics: &Metrics) -> Self {
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                let counter =
                    |what: &str| metrics.counter(&format!("rate_limit.{}.{what}", rule.name));
                RuleMetrics {
                    name: rule.name.clone(),
                    allowed: counter("allowed"),
                    limited: counter("limited"),
                    shadow_limited: counter("shadow_limited"),
                }
            })
            .collect();
        Self {
            limiter: RateLimiter::new(config, hasher),
            rules,
        }
    }

    /// The headers to add to the upstream's response, or the reply that refuses the request.
    pub fn check(
        &self,
        instance: &Instance,
        request: &RequestInfo,
        now: Instant,
    ) -> Result<Vec<(String, String)>, LocalReply> {
        let decision = self.limiter.decide(
            &SharedData,
            &instance.namespace,
            request,
            now,
            instance.shared_data,
        );
        for (outcome, rule) in decision.outcomes.iter().zip(&self.rules) {
            match outcome {
                RuleOutcome::NotApplied => {}
                RuleOutcome::Allowed => rule.allowed.increment(),
                RuleOutcome::Limited => rule.limited.increment(),
                RuleOutcome::ShadowLimited => {
                    rule.shadow_limited.increment();
                    instance.log(
                        LogLevel::Info,
                        &format!(
                            "shadow rule {:?} would refuse {} {}",
                            rule.name, request.method, request.path
                        ),
                    );
                }
                RuleOutcome::Failed(err) => {
                    instance.store_error(&format!("rate limit rule {:?}", rule.name), *err)
                }
            }
        }
        instance.store_conflicts.add(u64::from(decision.conflicts));
        match decision.verdict {
            Verdict::Allow { headers } => Ok(headers),
            Verdict::Limited {
                status,
                body,
                headers,
            } => Err(LocalReply {
                status,
                headers,
                body: body.into_bytes(),
            }),
            Verdict::Unavailable => Err(LocalReply::unavailable("rate limit")),
        }
    }
}
