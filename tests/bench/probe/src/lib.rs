//! `make bench`'s probe: a filter that makes, per request, exactly the hostcalls its
//! configuration names and does nothing else. Set against a configuration of the real filter
//! that makes the same calls, it shows what the calls alone cost, and so what is left for the
//! filter's own work.
//!
//! Configuration: a flat JSON object of counts, e.g. `{"get": 5, "set": 3, "property": 4}`:
//! `headers` (reads of the request header map), `header` (reads of one request header,
//! `content-type`, which a GET lacks), `now` (clock reads), `get` and `set`
//! (shared-data reads, and compare-and-swaps with the version the read returned: half at the
//! request, half at its end), `property` (at the end), `add_header` (on the response) and
//! `gauge` (one move at the request, one at the end).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use std::rc::Rc;

#[derive(Default)]
struct Spec {
    headers: u32,
    header: u32,
    now: u32,
    get: u32,
    set: u32,
    property: u32,
    add_header: u32,
    gauge: u32,
    gauge_id: u32,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { spec: Rc::new(Spec::default()) })
    });
}}

struct Root {
    spec: Rc<Spec>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self
            .get_plugin_configuration()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let mut spec = Spec::default();
        for pair in text.trim_matches(|c| c == '{' || c == '}').split(',') {
            let Some((name, count)) = pair.split_once(':') else {
                continue;
            };
            let count = count.trim().parse().unwrap_or(0);
            match name.trim().trim_matches('"') {
                "headers" => spec.headers = count,
                "header" => spec.header = count,
                "now" => spec.now = count,
                "get" => spec.get = count,
                "set" => spec.set = count,
                "property" => spec.property = count,
                "add_header" => spec.add_header = count,
                "gauge" => spec.gauge = count,
                _ => return false,
            }
        }
        if spec.gauge > 0 {
            spec.gauge_id = proxy_wasm::hostcalls::define_metric(MetricType::Gauge, "probe.gauge")
                .unwrap_or(0);
        }
        self.spec = Rc::new(spec);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            spec: self.spec.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    spec: Rc<Spec>,
}

const PROPERTIES: [&[&str]; 4] = [
    &["response", "code"],
    &["response", "flags"],
    &["response", "code_details"],
    &["source", "address"],
];

impl Stream {
    /// Reads and swaps keys `from..to` of the gets and sets.
    fn shared_data(&self, from: u32, to: u32) {
        for i in from..to {
            let key = format!("probe/{i}");
            let (_, cas) = self.get_shared_data(&key);
            if i < self.spec.set {
                let _ = self.set_shared_data(&key, Some(&[7u8; 16]), cas);
            }
        }
    }

    fn gauge(&self, by: i64) {
        if self.spec.gauge > 0 {
            let _ = proxy_wasm::hostcalls::increment_metric(self.spec.gauge_id, by);
        }
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for _ in 0..self.spec.headers {
            let _ = self.get_http_request_headers_bytes();
        }
        for _ in 0..self.spec.header {
            let _ = self.get_http_request_header_bytes("content-type");
        }
        for _ in 0..self.spec.now.div_ceil(2) {
            let _ = self.get_current_time();
        }
        self.shared_data(0, self.spec.get.div_ceil(2));
        self.gauge(1);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for i in 0..self.spec.add_header {
            self.add_http_response_header(&format!("x-probe-{i}"), "1");
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        for _ in 0..self.spec.now / 2 {
            let _ = self.get_current_time();
        }
        self.shared_data(self.spec.get.div_ceil(2), self.spec.get);
        for path in PROPERTIES.iter().cycle().take(self.spec.property as usize) {
            let _ = self.get_property(path.to_vec());
        }
        self.gauge(-1);
    }
}
