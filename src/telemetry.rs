//! What the core reports besides its answers: metric changes and log lines, as events the host
//! turns into Envoy stats and log calls, and the refusals dry-run policies would have made.
//!
//! Each policy declares its metrics once, at configuration, in a [`Catalog`]; the host defines
//! one Envoy stat per entry, under `resilience.<instance>.<name>`, and applies the events a
//! request produced. Tests apply them to a map instead.

use crate::decision::Decision;

/// How often the host hands counters to Envoy: they trail the requests by at most this.
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
        self.metrics.push((kind, self.full_name(name)));
        id
    }

    /// `name` under the instance's prefix: `resilience.<instance>.<name>`.
    pub fn full_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
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
    /// Refusals a dry-run (`shadow`) policy would have made; the pipeline takes them for the
    /// stream's decisions.
    shadow_decisions: Vec<Decision>,
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

    /// A dry-run policy would have refused the request with `decision`.
    pub fn would_refuse(&mut self, decision: Decision) {
        self.shadow_decisions.push(decision.shadow());
    }

    pub fn take_shadow_decisions(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.shadow_decisions)
    }
}

/// What a VM owes Envoy's counters since its last flush. Handing each increment over at once
/// would cost a hostcall per counter per request; a flush costs one per counter that moved.
///
/// Only counters wait. A gauge change goes at once: a value set by one worker must not land
/// after a newer one another worker set, and a gauge moved up and later down must not drift
/// when the VM that held the move fails before its flush. A VM that fails loses at most its
/// last interval of counts.
#[derive(Debug)]
pub struct Counts {
    kinds: Vec<MetricKind>,
    owed: Vec<u64>,
}

impl Counts {
    /// For the metrics of `catalog`.
    pub fn new(catalog: &Catalog) -> Counts {
        Counts {
            kinds: catalog.metrics().iter().map(|(kind, _)| *kind).collect(),
            owed: vec![0; catalog.metrics().len()],
        }
    }

    /// Keeps a counter's increment; any other event is handed back, to be applied now.
    pub fn absorb(&mut self, event: Event) -> Option<Event> {
        if let Event::Add(id, n) = &event {
            let index = id.0 as usize;
            if let (Some(MetricKind::Counter), Some(owed), Ok(n)) = (
                self.kinds.get(index),
                self.owed.get_mut(index),
                u64::try_from(*n),
            ) {
                *owed = owed.saturating_add(n);
                return None;
            }
        }
        Some(event)
    }

    /// The increments owed, each counter once; afterwards nothing is owed.
    pub fn take(&mut self) -> Vec<(MetricId, u64)> {
        self.owed
            .iter_mut()
            .enumerate()
            .filter(|(_, owed)| **owed > 0)
            .map(|(index, owed)| (MetricId(index as u32), std::mem::take(owed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn counters_wait_for_the_flush_and_everything_else_goes_at_once() {
        let mut catalog = Catalog::new("t");
        let requests = catalog.counter("requests");
        let in_flight = catalog.gauge("in_flight");
        let state = catalog.gauge("state");
        let mut counts = Counts::new(&catalog);
        for event in [
            Event::Add(requests, 1),
            Event::Add(requests, 2),
            Event::Add(MetricId(99), 1),
        ] {
            let handed_back = counts.absorb(event.clone());
            assert_eq!(
                handed_back.is_some(),
                event == Event::Add(MetricId(99), 1),
                "{event:?}"
            );
        }
        for event in [
            Event::Add(in_flight, 1),
            Event::Add(in_flight, -1),
            Event::Set(state, 2),
            Event::Log(Level::Info, "x".to_owned()),
        ] {
            assert_eq!(counts.absorb(event.clone()), Some(event));
        }
        assert_eq!(counts.take(), vec![(requests, 3)]);
        assert_eq!(counts.take(), vec![], "nothing owed twice");
    }
}
