//! The proxy-wasm adapter: the only code that talks to Envoy.
//!
//! It parses the configuration once per VM in `on_configure`, reads request headers and
//! properties, calls the core, and turns its decisions into Envoy actions.

mod metrics;
mod shared_data;

use crate::config::Config;
use crate::store::Namespace;
use metrics::{Counter, Gauge, Metrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use shared_data::SharedData;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// What every request of one configured filter instance shares, read-only.
struct Instance {
    requests: Counter,
    vms: Gauge,
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
        if let Err(err) = Config::parse(&bytes) {
            log(
                LogLevel::Error,
                &format!("resilience filter {name:?}: {err}"),
            );
            return false;
        }
        let namespace = Namespace::new(&name);
        if let Err(err) = namespace.prepare(&SharedData) {
            // Not fatal: creation writes the witness itself when it finds it missing.
            log(
                LogLevel::Warn,
                &format!("resilience filter {name:?}: {err}"),
            );
        }
        let metrics = Metrics::new(&name);
        let instance = Instance {
            requests: metrics.counter("requests"),
            vms: metrics.gauge("vms"),
        };
        if self.instance.is_none() {
            instance.vms.add(1);
        }
        self.instance = Some(Rc::new(instance));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK traps on None, so an unconfigured VM gets a pass-through stream.
        Some(Box::new(Stream {
            instance: self.instance.clone(),
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

struct Stream {
    instance: Option<Rc<Instance>>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(instance) = &self.instance {
            instance.requests.increment();
        }
        Action::Continue
    }
}
