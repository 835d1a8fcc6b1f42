//! The circuit-breaking policy: every breaker in scope admits the request or refuses it, and
//! hears how it ended.

use super::breaker::{self, phase_value, Admission, Effects, Outcome, Permit, Phase, Sighting};
use super::config::{BreakerConfig, CircuitBreakerConfig};
use crate::clock::retry_after_secs;
use crate::decision::Decision;
use crate::matcher::Scope;
use crate::policy::{Completion, Env, Needs, Policy};
use crate::reply::{Refusal, Reply};
use crate::request::RequestInfo;
use crate::store::Namespace;
use crate::store::Store;
use crate::telemetry::{Catalog, Level, MetricId};
use std::cell::Cell;

/// The problem type of a refusal by an open breaker (or one whose probes are all taken).
pub const CIRCUIT_OPEN: &str = "urn:envoy-resilience:circuit-breaker:open";

pub struct CircuitBreaker {
    config: CircuitBreakerConfig,
    /// Per breaker, in configuration order.
    metrics: Vec<BreakerMetrics>,
    /// Per breaker: its shared-data keys, built once.
    keys: Vec<breaker::Keys>,
    /// Per breaker: what this VM last read of its state.
    seen: Vec<Cell<Option<Sighting>>>,
}

struct BreakerMetrics {
    state: MetricId,
    rejected: MetricId,
    shadow_rejected: MetricId,
    to_open: MetricId,
    to_half_open: MetricId,
    to_closed: MetricId,
}

/// A breaker that let the request through, and what it lent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    breaker: usize,
    permit: Permit,
}

/// The breakers a request passed, to be told how it ended.
pub type Permits = Vec<Held>;

impl CircuitBreaker {
    pub fn new(config: CircuitBreakerConfig, catalog: &mut Catalog, namespace: &Namespace) -> Self {
        let metrics = config
            .breakers
            .iter()
            .map(|breaker| {
                let name = |what: &str| format!("circuit_breaker.{}.{what}", breaker.name);
                BreakerMetrics {
                    state: catalog.gauge(&name("state")),
                    rejected: catalog.counter(&name("rejected")),
                    shadow_rejected: catalog.counter(&name("shadow_rejected")),
                    to_open: catalog.counter(&name("transitions_to_open")),
                    to_half_open: catalog.counter(&name("transitions_to_half_open")),
                    to_closed: catalog.counter(&name("transitions_to_closed")),
                }
            })
            .collect();
        let keys = config
            .breakers
            .iter()
            .map(|breaker| breaker::keys(namespace, breaker))
            .collect();
        let seen = config.breakers.iter().map(|_| Cell::new(None)).collect();
        Self {
            config,
            metrics,
            keys,
            seen,
        }
    }

    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    fn record<S: Store>(&self, env: &mut Env<'_, S>, held: Held, outcome: Outcome) {
        let (Some(breaker), Some(key), Some(seen)) = (
            self.config.breakers.get(held.breaker),
            self.keys.get(held.breaker),
            self.seen.get(held.breaker),
        ) else {
            return;
        };
        match breaker::record(
            env.store,
            env.namespace(),
            key,
            breaker,
            held.permit,
            outcome,
            env.now,
            seen,
        ) {
            Ok(effects) => self.apply(env, held.breaker, effects),
            Err(err) => env.store_failed(&format!("circuit breaker {:?}", breaker.name), err),
        }
    }

    /// Logs and counts a transition: only the worker whose compare-and-swap made it sees it.
    fn apply<S: Store>(&self, env: &mut Env<'_, S>, index: usize, effects: Effects) {
        env.conflicts(effects.conflicts);
        let (Some(transition), Some(breaker), Some(metrics)) = (
            effects.transition,
            self.config.breakers.get(index),
            self.metrics.get(index),
        ) else {
            return;
        };
        env.telemetry.log(
            Level::Info,
            format!(
                "circuit breaker {:?}: {} -> {}: {}",
                breaker.name,
                transition.from.name(),
                transition.to.name(),
                transition.reason
            ),
        );
        env.telemetry.set(metrics.state, phase_value(transition.to));
        let counter = match transition.to {
            Phase::Open => metrics.to_open,
            Phase::HalfOpen => metrics.to_half_open,
            Phase::Closed => metrics.to_closed,
        };
        env.telemetry.increment(counter);
    }
}

/// An open breaker's refusal (or, half-open, one whose probes are all out).
fn open_decision(breaker: &BreakerConfig) -> Decision {
    Decision::new("circuit_breaker", "open").of("breaker", &breaker.name)
}

impl Policy for CircuitBreaker {
    type Loan = Permits;

    fn needs(&self) -> Needs {
        Needs {
            request: true,
            request_line: self
                .config
                .breakers
                .iter()
                .any(|b| b.shadow || b.scope.reads_request_line()),
            headers: self
                .config
                .breakers
                .iter()
                .flat_map(|b| b.scope.header_names())
                .map(str::to_owned)
                .collect(),
            peer: false,
            cluster: self.config.breakers.iter().any(|b| b.scope.needs_cluster()),
        }
    }

    /// Asks every breaker in scope; a refusal gives back at once what earlier breakers lent.
    fn admit<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
    ) -> Result<Permits, Reply> {
        let mut held = Vec::new();
        for (index, (((breaker, metrics), key), seen)) in self
            .config
            .breakers
            .iter()
            .zip(&self.metrics)
            .zip(&self.keys)
            .zip(&self.seen)
            .enumerate()
        {
            if !Scope::contains(&breaker.scope, request) {
                continue;
            }
            let admitted = breaker::admit(
                env.store,
                env.namespace(),
                key,
                breaker,
                env.now,
                env.settings(),
                seen,
            );
            match admitted {
                Ok((Admission::Pass(permit), effects)) => {
                    self.apply(env, index, effects);
                    let held_permit = Held {
                        breaker: index,
                        permit,
                    };
                    if request.long_lived && !breaker.long_lived_counted {
                        // Gated, never counted: a probe slot it took goes back at once.
                        if matches!(permit, Permit::Probe { .. }) {
                            self.record(env, held_permit, Outcome::Ignored);
                        }
                    } else {
                        held.push(held_permit);
                    }
                }
                Ok((Admission::Reject { .. }, effects)) if breaker.shadow => {
                    self.apply(env, index, effects);
                    env.telemetry.increment(metrics.shadow_rejected);
                    env.telemetry.log(
                        Level::Info,
                        format!(
                            "shadow circuit breaker {:?} would refuse {} {}",
                            breaker.name, request.method, request.path
                        ),
                    );
                    env.telemetry.would_refuse(open_decision(breaker));
                }
                Ok((Admission::Reject { retry_after }, effects)) => {
                    self.apply(env, index, effects);
                    env.telemetry.increment(metrics.rejected);
                    for h in held {
                        self.record(env, h, Outcome::Ignored);
                    }
                    let own = vec![
                        (
                            "retry-after".to_owned(),
                            retry_after_secs(retry_after).to_string(),
                        ),
                        ("x-circuit-breaker".to_owned(), breaker.name.clone()),
                    ];
                    return Err(Reply::configured(
                        &breaker.response,
                        own,
                        "resilience_circuit_open",
                        Refusal {
                            problem_type: CIRCUIT_OPEN,
                            title: "Circuit open",
                            detail: format!("circuit breaker {} is open", breaker.name),
                            violated_policies: &[],
                            decision: open_decision(breaker),
                        },
                    ));
                }
                Err(err) => {
                    let what = format!("circuit breaker {:?}", breaker.name);
                    let failed =
                        env.admission_failed("circuit_breaker", &what, err, breaker.shadow);
                    if let Err(reply) = failed {
                        for h in held {
                            self.record(env, h, Outcome::Ignored);
                        }
                        return Err(reply);
                    }
                }
            }
        }
        Ok(held)
    }

    /// Reports how the request ended to every breaker that let it through.
    fn release<S: Store>(&self, env: &mut Env<'_, S>, held: Permits, completion: &Completion) {
        for h in held {
            if let Some(breaker) = self.config.breakers.get(h.breaker) {
                let outcome = breaker.classify(completion);
                self.record(env, h, outcome);
            }
        }
    }
}
