//! What the core reports besides its answers: metric changes and log lines, as events the host
//! turns into Envoy stats and log calls.
//!
//! Each policy declares its metrics once, at configuration, in a [`Catalog`]; the host defines
//! one Envoy stat per entry, under `resilience.<instance>.<name>`, and applies the events a
//! request produced. Tests apply them to a map instead.

/// How often the host hands metric changes to Envoy: stats trail the requests by at most this.
pub const METRICS_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

/// A metric declared in a [`Catalog`]: its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MetricId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// Every metric of one filter instance, with its full name.
#[derive(Debug)]
pub struct Catalog {
    prefix: String,
    metrics: Vec<(MetricKind, String)>,
}

impl Catalog {
    pub fn new(instance: &str) -> Catalog {
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
        Catalog {
            prefix: format!("resilience.{instance}."),
            metrics: Vec::new(),
        }
    }

    pub fn counter(&mut self, name: &str) -> MetricId {
        self.declare(MetricKind::Counter, name)
    }

    pub fn gauge(&mut self, name: &str) -> MetricId {
        self.declare(MetricKind::Gauge, name)
    }

    fn declare(&mut self, kind: MetricKind, name: &str) -> MetricId {
        let id = MetricId(self.metrics.len() as u32);
        self.metrics.push((kind, format!("{}{name}", self.prefix)));
        id
    }

    /// Every metric, in [`MetricId`] order.
    pub fn metrics(&self) -> &[(MetricKind, String)] {
        &self.metrics
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Add to a counter, or move a gauge up or down.
    Add(MetricId, i64),
    /// Set a gauge.
    Set(MetricId, u64),
    Log(Level, String),
}

/// The events of one call into the core, in order.
#[derive(Debug, Default)]
pub struct Telemetry {
    events: Vec<Event>,
}

impl Telemetry {
    pub fn increment(&mut self, metric: MetricId) {
        self.add(metric, 1);
    }

    pub fn add(&mut self, metric: MetricId, n: u64) {
        if n > 0 {
            self.events
                .push(Event::Add(metric, i64::try_from(n).unwrap_or(i64::MAX)));
        }
    }

    pub fn move_gauge(&mut self, metric: MetricId, delta: i64) {
        self.events.push(Event::Add(metric, delta));
    }

    pub fn set(&mut self, metric: MetricId, value: u64) {
        self.events.push(Event::Set(metric, value));
    }

    pub fn log(&mut self, level: Level, message: String) {
        self.events.push(Event::Log(level, message));
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }
}
