//! Admission into the pools a request falls in, by its priority class, and release at the
//! end of its stream.

use super::config::{Class, LoadSheddingConfig, PoolConfig};
use super::pool::PoolState;
use crate::clock::retry_after_secs;
use crate::decision::Decision;
use crate::matcher::Scope;
use crate::policy::{Completion, Env, Needs, Policy};
use crate::reply::{Refusal, Reply};
use crate::request::{Field, RequestInfo};
use crate::store::{self, Namespace, Store};
use crate::telemetry::{Catalog, Level, MetricId};
use std::time::Duration;

/// The problem type of a shed request.
pub const SHED: &str = "urn:envoy-resilience:load-shedding:shed";

pub struct LoadShedding {
    config: LoadSheddingConfig,
    /// Per pool, in configuration order.
    metrics: Vec<PoolMetrics>,
    /// Per pool: the shared-data key of its state, built once.
    keys: Vec<String>,
}

struct PoolMetrics {
    admitted: MetricId,
    /// Slots that expired unreleased: their stream's VM failed, or they outlived the lease.
    expired: MetricId,
    /// Per class, in `Class::ALL` order.
    shed: [MetricId; 4],
    /// Per class: what a dry-run pool would have shed.
    shadow_shed: [MetricId; 4],
    in_flight: MetricId,
    limit: MetricId,
}

/// The slots a request holds until its stream ends: each pool's index, and the epoch its slot
/// is counted in.
pub type Slots = Vec<(usize, u64)>;

impl LoadShedding {
    /// Whether releasing `slots` uses the request's latency: only an adaptive pool does.
    pub fn samples_latency(&self, slots: &Slots) -> bool {
        slots.iter().any(|&(index, _)| {
            self.config
                .pools
                .get(index)
                .is_some_and(|pool| pool.adaptive.is_some())
        })
    }

    pub fn new(config: LoadSheddingConfig, catalog: &mut Catalog, namespace: &Namespace) -> Self {
        let metrics = config
            .pools
            .iter()
            .map(|pool| {
                let name = |what: &str| format!("load_shedding.{}.{what}", pool.name);
                PoolMetrics {
                    admitted: catalog.counter(&name("admitted")),
                    expired: catalog.counter(&name("expired")),
                    shed: Class::ALL
                        .map(|class| catalog.counter(&name(&format!("shed.{}", class.name())))),
                    shadow_shed: Class::ALL.map(|class| {
                        catalog.counter(&name(&format!("shadow_shed.{}", class.name())))
                    }),
                    in_flight: catalog.gauge(&name("in_flight")),
                    limit: catalog.gauge(&name("limit")),
                }
            })
            .collect();
        let keys = config
            .pools
            .iter()
            .map(|pool| pool_key(namespace, pool))
            .collect();
        Self {
            config,
            metrics,
            keys,
        }
    }

    pub fn config(&self) -> &LoadSheddingConfig {
        &self.config
    }

    /// The request's class: the priority header if a trusted source sent it, else the first
    /// matching rule, else the default. An untrusted, unknown or non-text header is ignored.
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
            .and_then(|name| match request.field(name) {
                Field::One(value) => Class::parse(value),
                // Which line would count? Neither: an ambiguous class is no class.
                Field::Missing | Field::Repeated => None,
            });
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

    /// Sets every pool's limit gauge from shared data, so a new VM shows the adaptive limit
    /// where the other workers left it.
    pub fn report_limits<S: Store>(&self, env: &mut Env<'_, S>) {
        for ((pool, metrics), key) in self.config.pools.iter().zip(&self.metrics).zip(&self.keys) {
            let stored = store::read::<PoolState>(env.store, key).ok().flatten();
            let (state, _) = pool.current(stored, env.now);
            env.telemetry.set(metrics.limit, u64::from(state.limit));
        }
    }

    /// Gives back the slots of `held`; `latency` feeds adaptive pools. A release retries until
    /// it lands: one that gave up would hold its slot until the lease ran out.
    fn release_slots<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        held: &[(usize, u64)],
        latency: Option<Duration>,
    ) {
        let now = env.now;
        for &(index, epoch) in held {
            let (Some(pool), Some(metrics), Some(key)) = (
                self.config.pools.get(index),
                self.metrics.get(index),
                self.keys.get(index),
            ) else {
                continue;
            };
            let released =
                store::settle::<PoolState, _>(env.store, env.namespace(), key, |state| {
                    let release = pool.release(state, now, epoch, latency);
                    (release, Some(release.next))
                });
            let release = match released {
                Ok(updated) => {
                    env.conflicts(updated.conflicts);
                    updated.decision
                }
                Err(err) => {
                    env.store_failed(&format!("load shedding pool {} release", pool.name), err);
                    continue;
                }
            };
            if release.released {
                env.telemetry.move_gauge(metrics.in_flight, -1);
            }
            self.expired(env, index, release.expired);
            if let Some(change) = release.change.filter(|c| c.from != c.to) {
                env.telemetry.set(metrics.limit, u64::from(change.to));
                env.telemetry.log(
                    Level::Debug,
                    format!(
                        "load shedding pool {}: limit {} -> {} (latency {} µs, minimum {} µs)",
                        pool.name,
                        change.from,
                        change.to,
                        change.sample_rtt_ns / 1_000,
                        change.min_rtt_ns / 1_000
                    ),
                );
            }
        }
    }

    /// Slots that expired unreleased (their VM failed): they leave the in-flight gauge too.
    fn expired<S: Store>(&self, env: &mut Env<'_, S>, pool: usize, expired: u32) {
        if let (Some(metrics), true) = (self.metrics.get(pool), expired > 0) {
            env.telemetry
                .move_gauge(metrics.in_flight, -i64::from(expired));
            env.telemetry.add(metrics.expired, u64::from(expired));
        }
    }
}

impl Policy for LoadShedding {
    type Loan = Slots;

    fn needs(&self) -> Needs {
        let scopes = self
            .config
            .pools
            .iter()
            .filter_map(|p| p.scope.as_ref())
            .flat_map(Scope::header_names);
        let rules = self
            .config
            .class_rules
            .iter()
            .flat_map(|(m, _)| m.header_names());
        let request_line = self
            .config
            .pools
            .iter()
            .any(|p| p.shadow || p.scope.as_ref().is_some_and(Scope::reads_request_line))
            || self
                .config
                .class_rules
                .iter()
                .any(|(m, _)| m.reads_request_line());
        Needs {
            request: true,
            request_line,
            headers: scopes
                .chain(rules)
                .chain(self.config.priority_header.as_deref())
                .map(str::to_owned)
                .collect(),
            peer: self.config.priority_header.is_some(),
            cluster: self
                .config
                .pools
                .iter()
                .any(|p| p.scope.as_ref().is_some_and(Scope::needs_cluster)),
        }
    }

    fn admit<S: Store>(&self, env: &mut Env<'_, S>, request: &RequestInfo) -> Result<Slots, Reply> {
        let class = self.classify(request);
        let shed_at = self.config.shed_at[class.index()];
        let now = env.now;
        let mut held = Vec::new();
        for (index, ((pool, metrics), key)) in self
            .config
            .pools
            .iter()
            .zip(&self.metrics)
            .zip(&self.keys)
            .enumerate()
        {
            if !pool.counts(request) {
                continue;
            }
            let admitted = store::update::<PoolState, _>(
                env.store,
                env.namespace(),
                key,
                env.settings().max_attempts,
                |state| {
                    let admission = pool.admit(state, now, shed_at);
                    (admission, admission.next)
                },
            );
            let admitted = admitted.map(|updated| {
                env.conflicts(updated.conflicts);
                self.expired(env, index, updated.decision.expired);
                updated.decision.epoch
            });
            match admitted {
                Ok(Some(epoch)) => {
                    env.telemetry.increment(metrics.admitted);
                    env.telemetry.move_gauge(metrics.in_flight, 1);
                    held.push((index, epoch));
                }
                Ok(None) if pool.shadow => {
                    env.telemetry.increment(metrics.shadow_shed[class.index()]);
                    env.telemetry.log(
                        Level::Info,
                        format!(
                            "shadow load shedding pool {} would shed {} {} (class {})",
                            pool.name,
                            request.method,
                            request.path,
                            class.name()
                        ),
                    );
                    env.telemetry.would_refuse(shed_decision(pool, class));
                }
                Ok(None) => {
                    env.telemetry.increment(metrics.shed[class.index()]);
                    self.release_slots(env, &held, None);
                    let own = vec![
                        (
                            "retry-after".to_owned(),
                            retry_after_secs(self.config.retry_after).to_string(),
                        ),
                        (
                            "x-load-shed".to_owned(),
                            format!("pool={}; class={}", pool.name, class.name()),
                        ),
                    ];
                    return Err(Reply::configured(
                        &self.config.response,
                        own,
                        "resilience_load_shed",
                        Refusal {
                            problem_type: SHED,
                            title: "Shed by load shedding",
                            detail: format!(
                                "shed by load shedding pool {}, class {}",
                                pool.name,
                                class.name()
                            ),
                            violated_policies: &[],
                            decision: shed_decision(pool, class),
                        },
                    ));
                }
                Err(err) => {
                    let what = format!("load shedding pool {}", pool.name);
                    if let Err(reply) =
                        env.admission_failed("load_shedding", &what, err, pool.shadow)
                    {
                        self.release_slots(env, &held, None);
                        return Err(reply);
                    }
                }
            }
        }
        Ok(held)
    }

    /// Only a request that measured the upstream (see [`Completion::latency_sample`]) says how
    /// slow it is; every other one just gives its slots back.
    fn release<S: Store>(&self, env: &mut Env<'_, S>, held: Slots, completion: &Completion) {
        self.release_slots(env, &held, completion.latency_sample());
    }
}

fn shed_decision(pool: &PoolConfig, class: Class) -> Decision {
    Decision::new("load_shedding", "shed")
        .of("pool", &pool.name)
        .class(class.name())
}

/// The shared-data key of a pool's state.
fn pool_key(namespace: &Namespace, pool: &PoolConfig) -> String {
    namespace.key(&format!("ls/{}", pool.name))
}

#[cfg(test)]
mod tests;
