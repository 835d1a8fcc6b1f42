//! What the core's tests share: a fixed epoch, stores that fail, and a bench that runs a
//! policy as one worker would, recording what it reports.

use crate::clock::Instant;
use crate::config::ConfigError;
use crate::pipeline::config::Config;
use crate::policy::{Env, Instance};
use crate::store::{MemoryStore, Namespace, Store, StoreError, Versioned};
use crate::telemetry::{Catalog, Event, Level, Telemetry};
use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const T0: Instant = Instant::from_nanos(1_700_000_000_000_000_000);

/// `ms` milliseconds after [`T0`].
pub fn at(ms: u64) -> Instant {
    T0.saturating_add(Duration::from_millis(ms))
}

/// A deterministic stand-in for the host's randomness: a new number on every call.
pub fn counter_random() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// Every call fails with a host error.
pub struct BrokenStore;

impl Store for BrokenStore {
    fn get(&self, _: &str) -> Result<Option<Versioned>, StoreError> {
        Err(StoreError::Host(10))
    }

    fn set(&self, _: &str, _: &[u8], _: Option<NonZeroU32>) -> Result<(), StoreError> {
        Err(StoreError::Host(10))
    }
}

/// Parses a whole configuration document, which the test expects to be valid.
pub fn config(json: &str) -> Config {
    match Config::parse(json.as_bytes()) {
        Ok(config) => config,
        Err(err) => panic!("{err}"),
    }
}

/// One policy as one worker runs it, with the instance it belongs to, an in-memory store,
/// and what it reported (metric totals and log lines).
pub struct Bench<P> {
    pub policy: P,
    pub instance: Instance,
    pub store: MemoryStore,
    catalog: Catalog,
    metrics: RefCell<HashMap<String, i64>>,
    logs: RefCell<Vec<(Level, String)>>,
}

impl<P> Bench<P> {
    /// A bench for instance `t` of the configuration document `json`.
    pub fn new(json: &str, build: impl FnOnce(Config, &mut Catalog, &Namespace) -> P) -> Bench<P> {
        let config = config(json);
        let mut catalog = Catalog::new("t");
        let instance = Instance::new("t", config.shared_data, &mut catalog);
        let policy = build(config, &mut catalog, &instance.namespace);
        Bench {
            policy,
            instance,
            store: MemoryStore::default(),
            catalog,
            metrics: RefCell::default(),
            logs: RefCell::default(),
        }
    }

    /// Runs `f` at `now` against the bench's store.
    pub fn run<R>(&self, now: Instant, f: impl FnOnce(&P, &mut Env<'_, MemoryStore>) -> R) -> R {
        self.run_on(&self.store, now, f)
    }

    /// Runs `f` at `now` against another store (one that fails, or one shared by threads).
    pub fn run_on<S: Store, R>(
        &self,
        store: &S,
        now: Instant,
        f: impl FnOnce(&P, &mut Env<'_, S>) -> R,
    ) -> R {
        let mut telemetry = Telemetry::default();
        let mut env = Env {
            store,
            instance: &self.instance,
            now,
            random: counter_random,
            telemetry: &mut telemetry,
        };
        let result = f(&self.policy, &mut env);
        self.record(&mut telemetry);
        result
    }

    pub fn record(&self, telemetry: &mut Telemetry) {
        record(&self.catalog, telemetry, &self.metrics, &self.logs);
    }

    /// A metric's total, by its name after `resilience.t.`.
    pub fn metric(&self, name: &str) -> i64 {
        self.metrics
            .borrow()
            .get(&format!("resilience.t.{name}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }
}

/// Applies events the way Envoy's stats would: counters add, gauges add or are set.
pub fn record(
    catalog: &Catalog,
    telemetry: &mut Telemetry,
    metrics: &RefCell<HashMap<String, i64>>,
    logs: &RefCell<Vec<(Level, String)>>,
) {
    for event in telemetry.drain() {
        match event {
            Event::Add(id, n) => {
                let name = &catalog.metrics()[id.0 as usize].1;
                *metrics.borrow_mut().entry(name.clone()).or_default() += n;
            }
            Event::Set(id, value) => {
                let name = &catalog.metrics()[id.0 as usize].1;
                metrics
                    .borrow_mut()
                    .insert(name.clone(), i64::try_from(value).unwrap_or(i64::MAX));
            }
            Event::Log(level, message) => logs.borrow_mut().push((level, message)),
        }
    }
}

/// A deterministic stream of cases for property tests (SplitMix64): the same cases run
/// natively and under wasm32, and a failure's message names the case that reproduces it.
pub struct Cases(u64);

impl Cases {
    pub fn new(seed: u64) -> Cases {
        Cases(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`: a quarter of the draws are an edge (`low`, `low + 1`,
    /// `high - 1`, `high`), the rest spread over every order of magnitude of the range, so
    /// that 10 and 10^15 are drawn as often as each other.
    pub fn in_range(&mut self, low: u64, high: u64) -> u64 {
        let span = high - low;
        let pick = self.next();
        if pick % 4 == 0 {
            return match (pick >> 2) % 4 {
                0 => low,
                1 => low.saturating_add(1).min(high),
                2 => high.saturating_sub(1).max(low),
                _ => high,
            };
        }
        let bits = 64 - span.leading_zeros();
        let width = (self.next() % u64::from(bits + 1)) as u32;
        let mask = match width {
            0 => 0,
            64 => u64::MAX,
            width => (1 << width) - 1,
        };
        low + (self.next() & mask).min(span)
    }
}

/// Parses a configuration a property test drew, asserting the parser agrees with the test on
/// whether it can be enforced as written: accepted exactly when `enforceable`.
pub fn parsed_exactly_when(
    enforceable: bool,
    json: &str,
    case: u32,
) -> Result<Config, ConfigError> {
    let parsed = Config::parse(json.as_bytes());
    match &parsed {
        Ok(_) => assert!(enforceable, "case {case}: {json} accepted"),
        Err(err) => assert!(!enforceable, "case {case}: {json} refused: {err}"),
    }
    parsed
}
