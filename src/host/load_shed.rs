//! Load shedding, as Envoy sees it: admission first of all policies, release at stream end.

use super::metrics::{Counter, Gauge, Metrics};
use super::shared_data::SharedData;
use super::{Instance, LocalReply};
use crate::clock::{retry_after_secs, Instant};
use crate::load_shed::{Class, LoadShedder, LoadSheddingConfig, PoolState, Verdict};
use crate::request::RequestInfo;
use crate::store;
use proxy_wasm::types::LogLevel;
use std::time::Duration;

pub struct ShedPolicy {
    shedder: LoadShedder,
    /// Per pool, in configuration order.
    pools: Vec<PoolMetrics>,
}

struct PoolMetrics {
    admitted: Counter,
    /// Per class, in `Class::ALL` order.
    shed: [Counter; 4],
    in_flight: Gauge,
    limit: Gauge,
}

impl ShedPolicy {
    pub fn new(
        config: LoadSheddingConfig,
        metrics: &Metrics,
        instance_namespace: &store::Namespace,
    ) -> Self {
        let pools = config
            .pools
            .iter()
            .map(|pool| {
                let name = |what: &str| format!("load_shedding.{}.{what}", pool.name);
                let limit = metrics.gauge(&name("limit"));
                // A restarted VM finds the adaptive limit where the others left it.
                let key = instance_namespace.key(&format!("ls/{}", pool.name));
                let stored = store::read::<PoolState>(&SharedData, &key).ok().flatten();
                limit.set(u64::from(pool.current(stored, Instant::default()).limit));
                PoolMetrics {
                    admitted: metrics.counter(&name("admitted")),
                    shed: Class::ALL
                        .map(|class| metrics.counter(&name(&format!("shed.{}", class.name())))),
                    in_flight: metrics.gauge(&name("in_flight")),
                    limit,
                }
            })
            .collect();
        Self {
            shedder: LoadShedder::new(config),
            pools,
        }
    }

    /// The pools the request now holds (to release when its stream ends, whatever happens
    /// next), and the reply that sheds it, if it is shed.
    pub fn admit(
        &self,
        instance: &Instance,
        request: &RequestInfo,
        now: Instant,
    ) -> (Vec<usize>, Option<LocalReply>) {
        let decision = self.shedder.admit(
            &SharedData,
            &instance.namespace,
            request,
            now,
            instance.shared_data,
        );
        instance.store_conflicts.add(u64::from(decision.conflicts));
        for (pool, err) in &decision.errors {
            instance.store_error(
                &format!("load shedding pool {}", self.pool_name(*pool)),
                *err,
            );
        }
        for &pool in &decision.held {
            if let Some(metrics) = self.pools.get(pool) {
                metrics.admitted.increment();
                metrics.in_flight.add(1);
            }
        }
        let reply = match decision.verdict {
            Verdict::Admit => None,
            Verdict::Shed { pool } => {
                let class_index = Class::ALL
                    .iter()
                    .position(|c| *c == decision.class)
                    .unwrap_or(0);
                if let Some(metrics) = self.pools.get(pool) {
                    metrics.shed[class_index].increment();
                }
                let config = self.shedder.config();
                Some(LocalReply {
                    status: config.response.status,
                    headers: config.response.headers_with(vec![
                        (
                            "retry-after".to_owned(),
                            retry_after_secs(config.retry_after).to_string(),
                        ),
                        (
                            "x-load-shed".to_owned(),
                            format!(
                                "pool={}; class={}",
                                self.pool_name(pool),
                                decision.class.name()
                            ),
                        ),
                    ]),
                    body: config.response.body.clone().into_bytes(),
                })
            }
            Verdict::Unavailable => Some(LocalReply::unavailable("load shedding")),
        };
        (decision.held, reply)
    }

    /// Gives back the request's slots; `latency` feeds adaptive pools.
    pub fn release(
        &self,
        instance: &Instance,
        held: &[usize],
        now: Instant,
        latency: Option<Duration>,
    ) {
        for result in self.shedder.release(
            &SharedData,
            &instance.namespace,
            held,
            now,
            latency,
            instance.shared_data,
        ) {
            match result {
                Ok(released) => {
                    let Some(metrics) = self.pools.get(released.pool) else {
                        continue;
                    };
                    metrics.in_flight.add(-1);
                    if let Some(change) = released.change.filter(|c| c.from != c.to) {
                        metrics.limit.set(u64::from(change.to));
                        instance.log(
                            LogLevel::Debug,
                            &format!(
                                "load shedding pool {}: limit {} -> {} (latency {} µs, minimum {} µs)",
                                self.pool_name(released.pool),
                                change.from,
                                change.to,
                                change.sample_rtt_ns / 1_000,
                                change.min_rtt_ns / 1_000
                            ),
                        );
                    }
                }
                Err(err) => instance.store_error("load shedding release", err),
            }
        }
    }

    fn pool_name(&self, index: usize) -> &str {
        self.shedder
            .config()
            .pools
            .get(index)
            .map_or("?", |p| p.name.as_str())
    }
}
