//! Counters and gauges in Envoy's stats, all named `resilience.<instance>.<name>`.
//!
//! Envoy files Wasm metrics under its `wasmcustom` namespace: `/stats` shows
//! `wasmcustom.resilience.<instance>.<name>`, and `/stats/prometheus` shows
//! `resilience_<instance>_<name>`. Every worker VM defines the same names and so shares one
//! Envoy stat per name.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// The metric name prefix of one filter instance.
pub struct Metrics {
    prefix: String,
}

impl Metrics {
    pub fn new(instance: &str) -> Self {
        // Dots would split the name into more stat segments than the documented three.
        let instance: String = instance
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            prefix: format!("resilience.{instance}."),
        }
    }

    pub fn counter(&self, name: &str) -> Counter {
        Counter(self.define(MetricType::Counter, name))
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        Gauge(self.define(MetricType::Gauge, name))
    }

    fn define(&self, kind: MetricType, name: &str) -> Option<u32> {
        hostcalls::define_metric(kind, &format!("{}{name}", self.prefix)).ok()
    }
}

/// A metric that could not be defined is a no-op: stats must never fail a request.
pub struct Counter(Option<u32>);

impl Counter {
    pub fn increment(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        if let Some(id) = self.0 {
            // Ignored: losing one sample is better than failing the request.
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

pub struct Gauge(Option<u32>);

impl Gauge {
    pub fn set(&self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    pub fn add(&self, delta: i64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }
}
