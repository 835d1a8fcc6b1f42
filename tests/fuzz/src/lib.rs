//! What the fuzz targets share: Envoy workers running one filter instance over one in-memory
//! store (shared data), fed requests and stream events built from the fuzzer's bytes, with the
//! checks every target makes after each step.

use arbitrary::Arbitrary;
use envoy_resilience::clock::Instant;
use envoy_resilience::hashing::Seed;
use envoy_resilience::load_shedding::PoolState;
use envoy_resilience::pipeline::{Exchange, Filter, ResponseView, Step};
use envoy_resilience::policy::{Completion, Env};
use envoy_resilience::request::{parse_peer, RequestInfo};
use envoy_resilience::store::{self, MemoryStore};
use envoy_resilience::telemetry::Telemetry;
use std::cell::Cell;
use std::time::Duration;

/// All four policies in one instance, with limits small enough for a few requests to reach
/// every edge: a full pool, an empty bucket, a tripped breaker, a full idempotency table.
pub const ALL_FOUR: &str = r#"{
    "decision_header": "x-decision",
    "long_lived": {"match": [{"path_prefix": "/stream/"}]},
    "load_shedding": {
        "pools": [{"name": "p", "max_in_flight": 3, "adaptive": {"min_limit": 1, "sample_interval": "10ms"}},
                  {"name": "streams", "max_in_flight": 2, "long_lived": "only"}],
        "priority": {"header": "x-priority", "trusted_sources": ["10.0.0.0/8", "::1"],
                     "rules": [{"match": {"path_prefix": "/batch/"}, "class": "low"}]},
        "slot_lease": "1s"
    },
    "rate_limit": {"rules": [
        {"name": "per-client", "key": ["client_address", {"header": "x-api-key"}], "capacity": 5,
         "refill": {"tokens": 1, "interval": "100ms"}, "table_size": 4},
        {"name": "trial", "shadow": true, "key": ["path"], "capacity": 1, "refill": {"tokens": 1, "interval": "1s"}}
    ]},
    "idempotency": {"records": 4, "max_body_bytes": 64, "body_timeout": "100ms", "lease": "1s",
                    "identity": ["client_address", {"header": "authorization"}]},
    "circuit_breaker": {"breakers": [
        {"name": "b", "scope": {"match": {}}, "trip": {"consecutive_failures": 2, "failure_rate_percent": 50,
         "minimum_calls": 2, "window": {"calls": 4}}, "open": {"duration": "50ms", "backoff_multiplier": 2,
         "max_duration": "1s"}, "half_open": {"max_probes": 2, "probe_timeout": "200ms"}}
    ]}
}"#;

/// The names of the headers the configurations read, and one they never do.
const HEADER_NAMES: [&str; 7] = [
    "idempotency-key",
    "x-api-key",
    "authorization",
    "x-priority",
    "content-type",
    "x-forwarded-for",
    "x-other",
];

/// The peer of a request whose `source.address` does not parse.
const DEFAULT_PEER: [u8; 4] = [10, 0, 0, 1];

/// A request as a client could send it: any bytes in its method, path and header values.
#[derive(Arbitrary, Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: Vec<u8>,
    /// Header lines: an index into the names the configurations read, and a value.
    pub headers: Vec<(u8, Vec<u8>)>,
    /// The peer as Envoy's `source.address` property could give it.
    pub peer: Vec<u8>,
    pub body: Vec<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Method {
    Get,
    Post,
    Patch,
    Other(u8),
}

impl Request {
    /// Who the idempotency policy takes the request's key to belong to, and the key: the
    /// peer, every `authorization` line, every `idempotency-key` line.
    pub fn claimant(&self) -> (Option<std::net::IpAddr>, Vec<&[u8]>, Vec<&[u8]>) {
        let lines = |name: &str| -> Vec<&[u8]> {
            self.headers
                .iter()
                .filter(|(index, _)| HEADER_NAMES[usize::from(*index) % HEADER_NAMES.len()] == name)
                .map(|(_, value)| value.as_slice())
                .collect()
        };
        (
            parse_peer(&self.peer).or(Some(DEFAULT_PEER.into())),
            lines("authorization"),
            lines("idempotency-key"),
        )
    }

    fn info(&self, filter: &Filter) -> RequestInfo {
        let method: Vec<u8> = match self.method {
            Method::Get => b"GET".to_vec(),
            Method::Post => b"POST".to_vec(),
            Method::Patch => b"patch".to_vec(),
            Method::Other(byte) => vec![byte],
        };
        let mut map = vec![
            (":method".to_owned(), method),
            (":path".to_owned(), self.path.clone()),
        ];
        for (index, value) in &self.headers {
            let name = HEADER_NAMES[usize::from(*index) % HEADER_NAMES.len()];
            map.push((name.to_owned(), value.clone()));
        }
        let mut info = RequestInfo::from_header_map(map, &filter.needs().headers);
        info.peer = parse_peer(&self.peer).or(Some(DEFAULT_PEER.into()));
        info
    }
}

/// How an upstream answers, or how the stream ends without an answer.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Ending {
    Answered { status: u16, grpc: bool },
    /// Envoy's response flags (a reset, a timeout, a client gone...), with or without a host.
    Failed { flags: u64, upstream_host: bool },
}

impl Ending {
    fn completion(self) -> Completion {
        match self {
            Ending::Answered { status, .. } => Completion {
                status: Some(valid_status(status)),
                via_upstream: true,
                upstream_host: true,
                ..Completion::default()
            },
            Ending::Failed {
                flags,
                upstream_host,
            } => Completion {
                status: Some(503),
                flags,
                upstream_host,
                ..Completion::default()
            },
        }
    }
}

/// A status an upstream's answer can have: Envoy's codecs refuse any other.
fn valid_status(raw: u16) -> u16 {
    100 + raw % 900
}

struct Answer(u16, bool);

impl ResponseView for Answer {
    fn status(&self) -> Option<u16> {
        Some(self.0)
    }
    fn via_upstream(&self) -> bool {
        true
    }
    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let content_type: &[u8] = if self.1 {
            b"application/grpc"
        } else {
            b"application/json"
        };
        vec![("content-type".to_owned(), content_type.to_vec())]
    }
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// One Envoy worker: its VM's filter instance over the shared store, and its clock.
pub struct Worker<'s> {
    pub filter: Filter,
    pub store: &'s MemoryStore,
    now: Cell<Instant>,
}

static RANDOM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn random() -> u64 {
    RANDOM.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

pub const START: Instant = Instant::from_nanos(1_700_000_000_000_000_000);

impl<'s> Worker<'s> {
    /// A worker of `configuration`, or `None` when the configuration is refused.
    pub fn new(configuration: &str, store: &'s MemoryStore, seed: u64) -> Option<Worker<'s>> {
        let mut telemetry = Telemetry::default();
        let filter = Filter::configure(
            "fuzz",
            configuration.as_bytes(),
            store,
            Seed([seed, seed]),
            START,
            &mut telemetry,
        )
        .ok()?;
        Some(Worker {
            filter,
            store,
            now: Cell::new(START),
        })
    }

    pub fn set_now(&self, now: Instant) {
        self.now.set(now);
    }

    fn run<R>(&self, call: impl FnOnce(&Filter, &mut Env<'_, MemoryStore>) -> R) -> R {
        let mut telemetry = Telemetry::default();
        let mut env = Env {
            store: self.store,
            instance: &self.filter.instance,
            now: self.now.get(),
            random,
            telemetry: &mut telemetry,
        };
        let result = call(&self.filter, &mut env);
        // Everything reported must be applicable: drain it as the host would.
        telemetry.drain().for_each(drop);
        result
    }

    /// The request's headers; the body follows in one chunk when the exchange waits for it.
    pub fn start(&self, exchange: &mut Exchange, request: &Request) -> Step {
        let info = request.info(&self.filter);
        let end = request.body.is_empty();
        let step = self.run(|filter, env| exchange.on_request_headers(filter, env, info, end));
        match step {
            Step::Pause if !end => {
                let body = request.body.clone();
                self.run(|filter, env| {
                    exchange.on_request_body(filter, env, body.len(), true, |max| {
                        body[..body.len().min(max)].to_vec()
                    })
                })
            }
            step => step,
        }
    }

    /// A tick of the worker's timer, for an exchange that polls.
    pub fn tick(&self, exchange: &mut Exchange) -> Option<Step> {
        self.run(|filter, env| exchange.on_tick(filter, env, |_| Vec::new()))
    }

    /// The upstream's answer to a forwarded request.
    pub fn respond(&self, exchange: &mut Exchange, ending: Ending) {
        if let Ending::Answered { status, grpc } = ending {
            let answer = Answer(valid_status(status), grpc);
            let edits = exchange.on_response_headers(&self.filter, &answer, false);
            // The decision header goes on every response this filter passes.
            assert!(edits.decision.is_some(), "{edits:?}");
            if exchange.judged_at_start() {
                self.run(|filter, env| exchange.judge_start(filter, env, &answer, false));
            }
            exchange.on_response_body(&self.filter, b"{}", true);
        }
    }

    /// The stream ends (Envoy's `on_log`), however it went.
    pub fn finish(&self, exchange: &mut Exchange, ending: Ending) {
        let _ = exchange.unpublished_decisions();
        self.run(|filter, env| exchange.finish(filter, env, || ending.completion()));
    }

    /// Slots counted in flight in the pool named `pool`.
    pub fn in_flight(&self, pool: &str) -> u32 {
        let key = self.filter.instance.namespace.key(&format!("ls/{pool}"));
        store::read::<PoolState>(self.store, &key)
            .ok()
            .flatten()
            .map_or(0, |state| state.in_flight())
    }
}

/// Milliseconds the fuzzer moves the clock by, bounded so that a run covers leases and timeouts.
pub fn advance(now: Instant, ms: u16) -> Instant {
    now.saturating_add(Duration::from_millis(u64::from(ms % 2_000)))
}
