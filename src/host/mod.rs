//! The proxy-wasm adapter: the only code that talks to Envoy.
//!
//! It parses the configuration once per VM in `on_configure`, gathers the request parts the
//! configuration names, calls the core, and turns its decisions into Envoy actions.

mod metrics;
mod shared_data;

use crate::clock::{Clock, Instant};
use crate::config::{Config, SharedDataSettings};
use crate::rate_limit::{self, KeyHasher, RateLimiter, RuleOutcome, Seed, Verdict};
use crate::request::{parse_peer, path_without_query, RequestInfo};
use crate::store::Namespace;
use metrics::{Counter, Gauge, Metrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use shared_data::SharedData;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

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
        Instant::from_nanos(crate::clock::nanos_saturating(since_epoch))
    }
}

/// What every request of one configured filter instance shares, read-only.
struct Instance {
    name: String,
    namespace: Namespace,
    shared_data: SharedDataSettings,
    request_headers: Vec<String>,
    needs_peer: bool,
    rate_limit: Option<RateLimitPolicy>,
    requests: Counter,
    vms: Gauge,
    store_errors: Counter,
    store_conflicts: Counter,
}

struct RateLimitPolicy {
    limiter: RateLimiter,
    /// Per rule, in configuration order.
    metrics: Vec<RuleMetrics>,
}

struct RuleMetrics {
    name: String,
    allowed: Counter,
    limited: Counter,
    shadow_limited: Counter,
}

#[derive(Default)]
struct Root {
    instance: Option<Rc<Instance>>,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        if let Some(instance) = self.instance.take() {
            instance.vms.add(-1);
        }
        true
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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK traps on None, so an unconfigured VM gets a pass-through stream.
        Some(Box::new(Stream {
            instance: self.instance.clone(),
            response_headers: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
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
        let request_headers = config.request_headers();
        let needs_peer = config.needs_peer();
        let rate_limit = match config.rate_limit {
            Some(rate_limit) => {
                let seed = rate_limit::shared_seed(
                    &SharedData,
                    &namespace,
                    random_seed(),
                    config.shared_data.max_attempts,
                )
                .map_err(|err| format!("cannot share the rate-limit key seed: {err}"))?;
                let metrics = rate_limit
                    .rules
                    .iter()
                    .map(|rule| {
                        let metric = |what: &str| {
                            metrics.counter(&format!("rate_limit.{}.{what}", rule.name))
                        };
                        RuleMetrics {
                            name: rule.name.clone(),
                            allowed: metric("allowed"),
                            limited: metric("limited"),
                            shadow_limited: metric("shadow_limited"),
                        }
                    })
                    .collect();
                Some(RateLimitPolicy {
                    limiter: RateLimiter::new(rate_limit, KeyHasher::new(seed)),
                    metrics,
                })
            }
            None => None,
        };
        Ok(Instance {
            name: name.to_owned(),
            namespace,
            shared_data: config.shared_data,
            request_headers,
            needs_peer,
            rate_limit,
            requests: metrics.counter("requests"),
            vms: metrics.gauge("vms"),
            store_errors: metrics.counter("shared_data.errors"),
            store_conflicts: metrics.counter("shared_data.conflicts"),
        })
    }
}

/// A fresh SipHash key from the VM's randomness (WASI `random_get` behind `RandomState`).
fn random_seed() -> Seed {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    let now = HostClock.now().as_nanos();
    Seed([state.hash_one(now), state.hash_one(!now)])
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

struct Stream {
    instance: Option<Rc<Instance>>,
    /// Headers a policy asked to add to the upstream's response.
    response_headers: Vec<(String, String)>,
}

impl Context for Stream {}

impl Stream {
    fn request_info(&self, instance: &Instance) -> RequestInfo {
        let header = |name: &str| self.get_http_request_header(name);
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
                .then(|| self.get_property(vec!["source", "address"]))
                .flatten()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|address| parse_peer(&address)),
        }
    }

    fn local_reply(&self, status: u16, headers: &[(String, String)], body: &str) -> Action {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.send_http_response(u32::from(status), headers, Some(body.as_bytes()));
        Action::Pause
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(instance) = self.instance.clone() else {
            return Action::Continue;
        };
        instance.requests.increment();
        let Some(policy) = &instance.rate_limit else {
            return Action::Continue;
        };
        let request = self.request_info(&instance);
        let decision = policy.limiter.decide(
            &SharedData,
            &instance.namespace,
            &request,
            HostClock.now(),
            instance.shared_data,
        );
        for (outcome, metrics) in decision.outcomes.iter().zip(&policy.metrics) {
            match outcome {
                RuleOutcome::NotApplied => {}
                RuleOutcome::Allowed => metrics.allowed.increment(),
                RuleOutcome::Limited => metrics.limited.increment(),
                RuleOutcome::ShadowLimited => {
                    metrics.shadow_limited.increment();
                    log(
                        LogLevel::Info,
                        &format!(
                            "resilience filter {:?}: shadow rule {:?} would refuse {} {}",
                            instance.name, metrics.name, request.method, request.path
                        ),
                    );
                }
                RuleOutcome::Failed(err) => {
                    instance.store_errors.increment();
                    log(
                        LogLevel::Warn,
                        &format!("resilience filter {:?}: rate limit: {err}", instance.name),
                    );
                }
            }
        }
        if decision.conflicts > 0 {
            instance.store_conflicts.add(u64::from(decision.conflicts));
        }
        match decision.verdict {
            Verdict::Allow { headers } => {
                self.response_headers = headers;
                Action::Continue
            }
            Verdict::Limited {
                status,
                body,
                headers,
            } => self.local_reply(status, &headers, &body),
            Verdict::Unavailable => self.local_reply(
                503,
                &[("content-type".to_owned(), "text/plain".to_owned())],
                "rate limit state unavailable\n",
            ),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in &self.response_headers {
            self.add_http_response_header(name, value);
        }
        Action::Continue
    }
}
