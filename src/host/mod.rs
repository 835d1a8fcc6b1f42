//! The proxy-wasm adapter: the only code that talks to Envoy.
//!
//! It parses the configuration once per VM in `on_configure`, gathers the request parts the
//! configuration names, runs the policies in their fixed order (load shedding, rate
//! limiting, idempotency, circuit breaking), and turns their decisions into Envoy actions.
//! What a request holds (in-flight slots, an idempotency claim, probe slots) is given back in
//! `on_log`, which Envoy calls exactly once for every stream however it ended, so a refusal
//! by a later policy releases it too.

mod circuit_breaker;
mod idempotency;
mod load_shed;
mod metrics;
mod rate_limit;
mod shared_data;

use crate::circuit_breaker::{Completion, DOWNSTREAM_TERMINATION_FLAG};
use crate::clock::{nanos_saturating, Clock, Instant};
use crate::config::{Config, SharedDataSettings};
use crate::hashing::{shared_seed, KeyHasher, Seed};
use crate::idempotency::{Begin, Idempotency, Pending};
use crate::request::{parse_peer, path_without_query, RequestInfo};
use crate::store::{Namespace, StoreError};
use circuit_breaker::{BreakerPolicy, Held};
use idempotency::{Claim, IdempotencyPolicy};
use load_shed::ShedPolicy;
use metrics::{Counter, Gauge, Metrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use rate_limit::RateLimitPolicy;
use shared_data::SharedData;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Envoy's wall clock, shared by all workers; it may step backwards, which the core absorbs.
struct HostClock;

impl Clock for HostClock {
    fn now(&self) -> Instant {
        let since_epoch = hostcalls::get_current_time()
            .ok()
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        Instant::from_nanos(nanos_saturating(since_epoch))
    }
}

/// An answer Envoy sends in place of the upstream's.
pub struct LocalReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl LocalReply {
    /// Shared data failed and `shared_data.on_error` is `deny`.
    fn unavailable(policy: &str) -> Self {
        LocalReply {
            status: 503,
            headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
            body: format!("{policy} state unavailable\n").into_bytes(),
        }
    }
}

/// What every request of one configured filter instance shares, read-only.
pub struct Instance {
    name: String,
    namespace: Namespace,
    shared_data: SharedDataSettings,
    request_headers: Vec<String>,
    needs_peer: bool,
    needs_cluster: bool,
    load_shedding: Option<ShedPolicy>,
    rate_limit: Option<RateLimitPolicy>,
    idempotency: Option<IdempotencyPolicy>,
    circuit_breaker: Option<BreakerPolicy>,
    requests: Counter,
    vms: Gauge,
    store_errors: Counter,
    store_conflicts: Counter,
}

impl Instance {
    fn configure(name: &str, bytes: &[u8]) -> Result<Instance, String> {
        let config = Config::parse(bytes).map_err(|err| err.to_string())?;
        let namespace = Namespace::new(name);
        if let Err(err) = namespace.prepare(&SharedData) {
            // Not fatal: creation writes the witness itself when it finds it missing.
            log(
                LogLevel::Warn,
                &format!("resilience filter {name:?}: {err}"),
            );
        }
        let metrics = Metrics::new(name);
        // Only keyed tables need the shared seed; it exists exactly when one is configured.
        let hasher = if config.rate_limit.is_some() || config.idempotency.is_some() {
            let seed = shared_seed(
                &SharedData,
                &namespace,
                random_seed(),
                config.shared_data.max_attempts,
            )
            .map_err(|err| format!("cannot share the key-hashing seed: {err}"))?;
            Some(KeyHasher::new(seed))
        } else {
            None
        };
        let rate_limit = config
            .rate_limit
            .clone()
            .zip(hasher)
            .map(|(c, hasher)| RateLimitPolicy::new(c, hasher, &metrics));
        let idempotency = config
            .idempotency
            .clone()
            .zip(hasher)
            .map(|(c, hasher)| IdempotencyPolicy::new(c, hasher, &metrics));
        Ok(Instance {
            load_shedding: config
                .load_shedding
                .clone()
                .map(|c| ShedPolicy::new(c, &metrics, &namespace)),
            circuit_breaker: config
                .circuit_breaker
                .clone()
                .map(|c| BreakerPolicy::new(c, &metrics)),
            name: name.to_owned(),
            namespace,
            shared_data: config.shared_data,
            request_headers: config.request_headers(),
            needs_peer: config.needs_peer(),
            needs_cluster: config.needs_cluster(),
            rate_limit,
            idempotency,
            requests: metrics.counter("requests"),
            vms: metrics.gauge("vms"),
            store_errors: metrics.counter("shared_data.errors"),
            store_conflicts: metrics.counter("shared_data.conflicts"),
        })
    }

    fn has_policies(&self) -> bool {
        self.load_shedding.is_some()
            || self.rate_limit.is_some()
            || self.idempotency.is_some()
            || self.circuit_breaker.is_some()
    }

    fn log(&self, level: LogLevel, message: &str) {
        log(
            level,
            &format!("resilience filter {:?}: {message}", self.name),
        );
    }

    fn store_error(&self, what: &str, err: StoreError) {
        self.store_errors.increment();
        self.log(LogLevel::Warn, &format!("{what}: {err}"));
    }
}

/// A fresh SipHash key from the VM's randomness (WASI `random_get` behind `RandomState`).
fn random_seed() -> Seed {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    let now = HostClock.now().as_nanos();
    Seed([state.hash_one(now), state.hash_one(!now)])
}

#[derive(Default)]
struct Root {
    instance: Option<Rc<Instance>>,
    /// Where this VM's sweep of expired idempotency records goes on.
    sweep_cursor: u32,
    stalled: Rc<RefCell<StalledBodies>>,
}

/// Streams of this VM holding their headers until the body is in, for idempotency.
///
/// The body reaches a filter that holds its headers only when the plugin config sets
/// `allow_on_headers_stop_iteration: true`; otherwise Envoy stops the whole stream and the
/// request would hang. A stream that saw no body within a tick is resumed (unprotected),
/// and the missing setting is logged once.
#[derive(Default)]
struct StalledBodies {
    waiting: Vec<(u32, Instant)>,
    warned: bool,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        if let Some(instance) = self.instance.take() {
            instance.vms.add(-1);
        }
        true
    }
}

impl Root {
    fn resume_stalled(&self, instance: &Instance, now: Instant) {
        let mut stalled = self.stalled.borrow_mut();
        let (late, waiting): (Vec<_>, Vec<_>) = stalled
            .waiting
            .drain(..)
            .partition(|(_, since)| now.saturating_since(*since) >= Duration::from_secs(1));
        stalled.waiting = waiting;
        if late.is_empty() {
            return;
        }
        if !stalled.warned {
            stalled.warned = true;
            instance.log(
                LogLevel::Error,
                "idempotency: request bodies do not reach the filter; set `allow_on_headers_stop_iteration: true` \
                 in this Wasm plugin's config. Until then, requests with a body pass unprotected after a second.",
            );
        }
        for (id, _) in late {
            if hostcalls::set_effective_context(id).is_ok() {
                let _ = hostcalls::resume_http_request();
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let name = plugin_name();
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Instance::configure(&name, &bytes) {
            Ok(instance) => {
                if self.instance.is_none() {
                    instance.vms.add(1);
                }
                if let Some(policy) = &instance.idempotency {
                    // Start each VM's sweep somewhere else in the table.
                    self.sweep_cursor =
                        (random_seed().0[0] % u64::from(policy.policy().config().records)) as u32;
                    self.set_tick_period(Duration::from_secs(1));
                }
                self.instance = Some(Rc::new(instance));
                true
            }
            Err(message) => {
                log(
                    LogLevel::Error,
                    &format!("resilience filter {name:?}: {message}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(instance) = &self.instance {
            if let Some(policy) = &instance.idempotency {
                let now = HostClock.now();
                self.sweep_cursor = policy.sweep(instance, self.sweep_cursor, now);
                self.resume_stalled(instance, now);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK traps on None, so an unconfigured VM gets a pass-through stream.
        Some(Box::new(Stream {
            id: context_id,
            stalled: Rc::clone(&self.stalled),
            instance: self.instance.clone(),
            request: None,
            started: Instant::default(),
            pools_held: Vec::new(),
            awaiting_body: None,
            claim: None,
            went_upstream: false,
            breakers_held: Vec::new(),
            response_headers: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The name Envoy gives this plugin (`name` in its Wasm config): it keys the instance's
/// shared data and metrics.
fn plugin_name() -> String {
    hostcalls::get_property(vec!["plugin_name"])
        .ok()
        .flatten()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// An idempotent request waiting for its body: where its record lives, and what the
/// fingerprint covers besides the body.
struct AwaitingBody {
    pending: Pending,
    method: String,
    path_and_query: String,
}

struct Stream {
    id: u32,
    stalled: Rc<RefCell<StalledBodies>>,
    instance: Option<Rc<Instance>>,
    request: Option<RequestInfo>,
    started: Instant,
    /// Load-shedding pools counting this request, to be released when it ends.
    pools_held: Vec<usize>,
    awaiting_body: Option<AwaitingBody>,
    /// The idempotency claim this request holds, and its response so far.
    claim: Option<Claim>,
    /// Every policy let the request through to the upstream.
    went_upstream: bool,
    /// Breakers that let this request through, to be told how it ended.
    breakers_held: Vec<Held>,
    /// Headers a policy asked to add to the upstream's response.
    response_headers: Vec<(String, String)>,
}

impl Context for Stream {}

impl Stream {
    fn request_info(&self, instance: &Instance) -> RequestInfo {
        let header = |name: &str| self.get_http_request_header(name);
        let property = |path: Vec<&str>| {
            self.get_property(path)
                .and_then(|bytes| String::from_utf8(bytes).ok())
        };
        RequestInfo {
            method: header(":method").unwrap_or_default(),
            path: header(":path")
                .map(|path| path_without_query(&path).to_owned())
                .unwrap_or_default(),
            headers: instance
                .request_headers
                .iter()
                .filter_map(|name| Some((name.clone(), header(name)?)))
                .collect(),
            peer: instance
                .needs_peer
                .then(|| property(vec!["source", "address"]))
                .flatten()
                .and_then(|address| parse_peer(&address)),
            cluster: instance
                .needs_cluster
                .then(|| property(vec!["xds", "cluster_name"]))
                .flatten(),
        }
    }

    fn reply(&mut self, instance: &Instance, reply: LocalReply) -> Action {
        // A claim taken for this request is given back: it never went upstream.
        if let (Some(claim), Some(policy)) = (self.claim.take(), &instance.idempotency) {
            policy.finish(instance, claim, false, HostClock.now());
        }
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.send_http_response(u32::from(reply.status), headers, Some(&reply.body));
        Action::Pause
    }

    /// An integer attribute (Envoy passes them as 8 little-endian bytes).
    fn int_property(&self, path: Vec<&str>) -> Option<u64> {
        let bytes = self.get_property(path)?;
        Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    /// The last stage: circuit breakers, then upstream.
    fn admit_breakers(&mut self, instance: &Instance) -> Action {
        if let (Some(policy), Some(request)) = (&instance.circuit_breaker, &self.request) {
            match policy.admit(instance, request, self.started) {
                Ok(held) => self.breakers_held = held,
                Err(reply) => return self.reply(instance, reply),
            }
        }
        self.went_upstream = true;
        Action::Continue
    }

    /// Decides an idempotent request once its whole body is known.
    fn decide_idempotency(
        &mut self,
        instance: &Instance,
        waiting: AwaitingBody,
        body: &[u8],
    ) -> Action {
        let Some(policy) = &instance.idempotency else {
            return self.admit_breakers(instance);
        };
        let fingerprint = Idempotency::fingerprint(&waiting.method, &waiting.path_and_query, body);
        match policy.decide(instance, waiting.pending, fingerprint, HostClock.now()) {
            Ok(claim) => {
                self.claim = claim;
                self.admit_breakers(instance)
            }
            Err(reply) => self.reply(instance, reply),
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(instance) = self.instance.clone() else {
            return Action::Continue;
        };
        instance.requests.increment();
        if !instance.has_policies() {
            return Action::Continue;
        }
        let request = self.request_info(&instance);
        self.started = HostClock.now();
        if let Some(policy) = &instance.load_shedding {
            let (held, shed) = policy.admit(&instance, &request, self.started);
            self.pools_held = held;
            if let Some(reply) = shed {
                return self.reply(&instance, reply);
            }
        }
        if let Some(policy) = &instance.rate_limit {
            match policy.check(&instance, &request, self.started) {
                Ok(headers) => self.response_headers = headers,
                Err(reply) => return self.reply(&instance, reply),
            }
        }
        let idempotent = instance
            .idempotency
            .as_ref()
            .map(|policy| policy.policy().begin(&request));
        self.request = Some(request);
        match (idempotent, &instance.idempotency) {
            (Some(Begin::Refuse(problem)), Some(policy)) => {
                let reply = policy.refuse_key(&problem);
                self.reply(&instance, reply)
            }
            (Some(Begin::Check(pending)), _) => {
                let waiting = AwaitingBody {
                    pending,
                    method: self
                        .request
                        .as_ref()
                        .map(|r| r.method.clone())
                        .unwrap_or_default(),
                    path_and_query: self.get_http_request_header(":path").unwrap_or_default(),
                };
                if end_of_stream {
                    self.decide_idempotency(&instance, waiting, &[])
                } else {
                    // Hold the request until its body is in: the fingerprint covers it.
                    self.awaiting_body = Some(waiting);
                    self.stalled
                        .borrow_mut()
                        .waiting
                        .push((self.id, self.started));
                    Action::Pause
                }
            }
            _ => self.admit_breakers(&instance),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(instance), true) = (self.instance.clone(), self.awaiting_body.is_some()) else {
            return Action::Continue;
        };
        self.stalled
            .borrow_mut()
            .waiting
            .retain(|(id, _)| *id != self.id);
        let limit = instance
            .idempotency
            .as_ref()
            .map_or(0, |p| p.policy().config().max_body_bytes);
        if body_size > limit {
            self.awaiting_body = None;
            return match instance
                .idempotency
                .as_ref()
                .and_then(IdempotencyPolicy::body_too_large)
            {
                Some(reply) => self.reply(&instance, reply),
                None => self.admit_breakers(&instance),
            };
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        match self.awaiting_body.take() {
            Some(waiting) => self.decide_idempotency(&instance, waiting, &body),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        for (name, value) in &self.response_headers {
            self.add_http_response_header(name, value);
        }
        if let (Some(instance), Some(mut claim)) = (self.instance.clone(), self.claim.take()) {
            if let Some(policy) = &instance.idempotency {
                let status = self
                    .get_http_response_header(":status")
                    .and_then(|s| s.parse().ok());
                policy.response_headers(
                    &mut claim,
                    status,
                    |name| self.get_http_response_header(name),
                    end_of_stream,
                );
            }
            self.claim = Some(claim);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let (Some(instance), Some(mut claim)) = (self.instance.clone(), self.claim.take()) {
            if let Some(policy) = &instance.idempotency {
                let chunk = self
                    .get_http_response_body(0, body_size)
                    .unwrap_or_default();
                policy.response_body(&mut claim, &chunk, end_of_stream);
            }
            self.claim = Some(claim);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        self.stalled
            .borrow_mut()
            .waiting
            .retain(|(id, _)| *id != self.id);
        let Some(instance) = self.instance.clone() else {
            return;
        };
        if self.pools_held.is_empty() && self.breakers_held.is_empty() && self.claim.is_none() {
            return;
        }
        let now = HostClock.now();
        let flags = self.int_property(vec!["response", "flags"]).unwrap_or(0);
        let duration = Duration::from_nanos(nanos_saturating(now.saturating_since(self.started)));
        if let (Some(policy), Some(claim)) = (&instance.idempotency, self.claim.take()) {
            policy.finish(&instance, claim, self.went_upstream, now);
        }
        if let Some(policy) = &instance.load_shedding {
            // Only requests that went upstream and were not abandoned say how slow it is.
            let sample = (self.went_upstream && flags & DOWNSTREAM_TERMINATION_FLAG == 0)
                .then_some(duration);
            policy.release(&instance, &self.pools_held, now, sample);
        }
        if let (Some(policy), false) = (&instance.circuit_breaker, self.breakers_held.is_empty()) {
            let completion = Completion {
                status: self
                    .int_property(vec!["response", "code"])
                    .and_then(|code| u16::try_from(code).ok())
                    .filter(|&code| code > 0),
                flags,
                duration,
            };
            policy.finish(&instance, &self.breakers_held, &completion, now);
        }
    }
}
