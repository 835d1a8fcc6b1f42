//! Admission into the pools a request falls in, by its priority class, and release at the
//! end of its stream.

use super::config::{Class, LoadSheddingConfig, PoolConfig};
use super::pool::{LimitChange, PoolState};
use crate::clock::Instant;
use crate::config::{FailureMode, SharedDataSettings};
use crate::request::RequestInfo;
use crate::store::{self, Namespace, Store, StoreError};
use std::time::Duration;

pub struct LoadShedder {
    config: LoadSheddingConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// The pool at this index is full for the request's class.
    Shed {
        pool: usize,
    },
    /// Shared data failed and `shared_data.on_error` is `deny`.
    Unavailable,
}

#[derive(Debug)]
pub struct Decision {
    pub class: Class,
    pub verdict: Verdict,
    /// Pools that counted the request: each must be released exactly once, when its stream
    /// ends, whatever the verdict.
    pub held: Vec<usize>,
    pub errors: Vec<(usize, StoreError)>,
    pub conflicts: u32,
}

/// A pool's state right after a release.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub pool: usize,
    pub in_flight: u32,
    pub change: Option<LimitChange>,
}

impl LoadShedder {
    pub fn new(config: LoadSheddingConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &LoadSheddingConfig {
        &self.config
    }

    /// The request's class: the priority header if a trusted source sent it, else the first
    /// matching rule, else the default. An untrusted or unknown header value is ignored.
    pub fn classify(&self, request: &RequestInfo) -> Class {
        let trusted = request.peer.is_some_and(|peer| {
            self.config
                .trusted_sources
                .iter()
                .any(|cidr| cidr.contains(peer))
        });
        let from_header = self
            .config
            .priority_header
            .as_deref()
            .filter(|_| trusted)
            .and_then(|name| request.header(name))
            .and_then(Class::parse);
        from_header
            .or_else(|| {
                self.config
                    .class_rules
                    .iter()
                    .find(|(m, _)| m.matches(request))
                    .map(|(_, class)| *class)
            })
            .unwrap_or(self.config.default_class)
    }

    pub fn shed_at(&self, class: Class) -> f64 {
        let index = Class::ALL.iter().position(|c| *c == class).unwrap_or(0);
        self.config.shed_at[index]
    }

    pub fn admit(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        request: &RequestInfo,
        now: Instant,
        settings: SharedDataSettings,
    ) -> Decision {
        let class = self.classify(request);
        let shed_at = self.shed_at(class);
        let mut decision = Decision {
            class,
            verdict: Verdict::Admit,
            held: Vec::new(),
            errors: Vec::new(),
            conflicts: 0,
        };
        for (index, pool) in self.config.pools.iter().enumerate() {
            if pool
                .scope
                .as_ref()
                .is_some_and(|scope| !scope.contains(request))
            {
                continue;
            }
            let admitted = store::update::<PoolState, _>(
                store,
                namespace,
                &pool_key(namespace, pool),
                settings.max_attempts,
                |state| {
                    let next = pool.admit(state, now, shed_at);
                    (next.is_some(), next)
                },
            );
            match admitted {
                Ok(updated) => {
                    decision.conflicts += updated.conflicts;
                    if !updated.decision {
                        decision.verdict = Verdict::Shed { pool: index };
                        return decision;
                    }
                    decision.held.push(index);
                }
                Err(err) => {
                    decision.errors.push((index, err));
                    if settings.on_error == FailureMode::Deny {
                        decision.verdict = Verdict::Unavailable;
                        return decision;
                    }
                }
            }
        }
        decision
    }

    /// Releases the pools a request held. `latency` is a sample for adaptive pools: give it
    /// only for requests that went upstream and were not abandoned.
    pub fn release(
        &self,
        store: &impl Store,
        namespace: &Namespace,
        held: &[usize],
        now: Instant,
        latency: Option<Duration>,
        settings: SharedDataSettings,
    ) -> Vec<Result<Released, StoreError>> {
        held.iter()
            .filter_map(|&index| Some((index, self.config.pools.get(index)?)))
            .map(|(index, pool)| {
                let updated = store::update::<PoolState, _>(
                    store,
                    namespace,
                    &pool_key(namespace, pool),
                    settings.max_attempts,
                    |state| {
                        let (next, change) = match latency {
                            Some(latency) => pool.release(state, now, latency),
                            None => {
                                let mut next = pool.current(state, now);
                                next.in_flight = next.in_flight.saturating_sub(1);
                                (next, None)
                            }
                        };
                        ((next.in_flight, change), Some(next))
                    },
                )?;
                let (in_flight, change) = updated.decision;
                Ok(Released {
                    pool: index,
                    in_flight,
                    change,
                })
            })
            .collect()
    }
}

fn pool_key(namespace: &Namespace, pool: &PoolConfig) -> String {
    namespace.key(&format!("ls/{}", pool.name))
}

#[cfg(test)]
mod tests;
