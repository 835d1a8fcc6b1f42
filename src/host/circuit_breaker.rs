//! Circuit breaking, as Envoy sees it: admission at request headers, outcomes at stream end.

use super::metrics::{Counter, Gauge, Metrics};
use super::shared_data::SharedData;
use super::{Instance, LocalReply};
use crate::circuit_breaker::{
    self, phase_value, Admission, BreakerConfig, CircuitBreakerConfig, Completion, Effects,
    Outcome, Permit, Phase,
};
use crate::clock::{retry_after_secs, Instant};
use crate::config::FailureMode;
use crate::request::RequestInfo;
use proxy_wasm::types::LogLevel;

pub struct BreakerPolicy {
    breakers: Vec<(BreakerConfig, BreakerMetrics)>,
}

struct BreakerMetrics {
    state: Gauge,
    rejected: Counter,
    to_open: Counter,
    to_half_open: Counter,
    to_closed: Counter,
}

/// A breaker that let the request through, and what it lent it.
#[derive(Clone, Copy)]
pub struct Held {
    breaker: usize,
    permit: Permit,
}

impl BreakerPolicy {
    pub fn new(config: CircuitBreakerConfig, metrics: &Metrics) -> Self {
        let breakers = config
            .breakers
            .into_iter()
            .map(|breaker| {
                let name = |what: &str| format!("circuit_breaker.{}.{what}", breaker.name);
                let metrics = BreakerMetrics {
                    state: metrics.gauge(&name("state")),
                    rejected: metrics.counter(&name("rejected")),
                    to_open: metrics.counter(&name("transitions_to_open")),
                    to_half_open: metrics.counter(&name("transitions_to_half_open")),
                    to_closed: metrics.counter(&name("transitions_to_closed")),
                };
                (breaker, metrics)
            })
            .collect();
        Self { breakers }
    }

    /// Asks every breaker in scope; a refusal gives back what earlier breakers lent.
    pub fn admit(
        &self,
        instance: &Instance,
        request: &RequestInfo,
        now: Instant,
    ) -> Result<Vec<Held>, LocalReply> {
        let mut held = Vec::new();
        for (index, (breaker, metrics)) in self.breakers.iter().enumerate() {
            if !breaker.scope.contains(request) {
                continue;
            }
            match circuit_breaker::admit(
                &SharedData,
                &instance.namespace,
                breaker,
                now,
                instance.shared_data,
            ) {
                Ok((Admission::Pass(permit), effects)) => {
                    self.apply(instance, index, effects);
                    held.push(Held {
                        breaker: index,
                        permit,
                    });
                }
                Ok((Admission::Reject { retry_after }, effects)) => {
                    self.apply(instance, index, effects);
                    metrics.rejected.increment();
                    self.release(instance, &held, now);
                    let mut headers = vec![
                        (
                            "retry-after".to_owned(),
                            retry_after_secs(retry_after).to_string(),
                        ),
                        ("x-circuit-breaker".to_owned(), breaker.name.clone()),
                    ];
                    if !breaker
                        .response
                        .headers
                        .iter()
                        .any(|(name, _)| name == "content-type")
                    {
                        headers.push(("content-type".to_owned(), "text/plain".to_owned()));
                    }
                    headers.extend(breaker.response.headers.iter().cloned());
                    return Err(LocalReply {
                        status: breaker.response.status,
                        headers,
                        body: breaker.response.body.clone().into_bytes(),
                    });
                }
                Err(err) => {
                    instance.store_error(&format!("circuit breaker {:?}", breaker.name), err);
                    if instance.shared_data.on_error == FailureMode::Deny {
                        self.release(instance, &held, now);
                        return Err(LocalReply::unavailable("circuit breaker"));
                    }
                }
            }
        }
        Ok(held)
    }

    /// Reports how the request ended to every breaker that let it through.
    pub fn finish(
        &self,
        instance: &Instance,
        held: &[Held],
        completion: &Completion,
        now: Instant,
    ) {
        for h in held {
            if let Some((breaker, _)) = self.breakers.get(h.breaker) {
                self.record(instance, h, breaker.classify(completion), now);
            }
        }
    }

    /// Gives back probe slots of a request that will not go upstream after all.
    fn release(&self, instance: &Instance, held: &[Held], now: Instant) {
        for h in held {
            self.record(instance, h, Outcome::Ignored, now);
        }
    }

    fn record(&self, instance: &Instance, held: &Held, outcome: Outcome, now: Instant) {
        let Some((breaker, _)) = self.breakers.get(held.breaker) else {
            return;
        };
        match circuit_breaker::record(
            &SharedData,
            &instance.namespace,
            breaker,
            held.permit,
            outcome,
            now,
            instance.shared_data,
        ) {
            Ok(effects) => self.apply(instance, held.breaker, effects),
            Err(err) => instance.store_error(&format!("circuit breaker {:?}", breaker.name), err),
        }
    }

    /// Logs and counts a transition: only the worker whose compare-and-swap made it sees it.
    fn apply(&self, instance: &Instance, index: usize, effects: Effects) {
        instance.store_conflicts.add(u64::from(effects.conflicts));
        let (Some(transition), Some((breaker, metrics))) =
            (effects.transition, self.breakers.get(index))
        else {
            return;
        };
        instance.log(
            LogLevel::Info,
            &format!(
                "circuit breaker {:?}: {} -> {}: {}",
                breaker.name,
                transition.from.name(),
                transition.to.name(),
                transition.reason
            ),
        );
        metrics.state.set(phase_value(transition.to));
        match transition.to {
            Phase::Open => metrics.to_open.increment(),
            Phase::HalfOpen => metrics.to_half_open.increment(),
            Phase::Closed => metrics.to_closed.increment(),
        }
    }
}
