//! Starts a real Envoy with the freshly built filter in front of an [`Upstream`].
//!
//! Each Envoy gets free ports, its own directory and `--concurrency 2` or more, so several
//! worker VMs share the filter's state as in production. It is always stopped on drop, and
//! when a test fails its log is printed.

use super::upstream::Upstream;
use super::METRICS_FLUSHED;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const VM_ID: &str = "resilience-e2e";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One filter instance in the chain: its plugin name and its JSON configuration.
pub struct Filter {
    pub name: String,
    pub config: String,
}

pub struct EnvoyBuilder {
    filters: Vec<Filter>,
    concurrency: usize,
    direct_response: bool,
    stop_iteration: bool,
    grpc_port: Option<u16>,
    websocket_upgrades: bool,
    buffer_limit: Option<u32>,
    /// http_filters entries as a document shows them, run as written but for the .wasm path.
    documented: Vec<serde_json::Value>,
    /// Clusters by these names, each the upstream, with requests under `/<name>/` routed to it.
    named_clusters: Vec<String>,
    prometheus_labels: bool,
    demo_access_log: bool,
    /// The `retry_policy` of a listener in front of the filter's, as an edge Envoy would be.
    front_retry_policy: Option<serde_json::Value>,
    /// The `retry_policy` of the routes to the upstream and to `dead`.
    upstream_retry_policy: Option<serde_json::Value>,
    /// The filters' listener comes from a file Envoy watches (LDS), which
    /// [`Envoy::push_filters`] rewrites.
    dynamic_listener: bool,
    /// The filters' `failure_policy`; Envoy's default (`FAIL_CLOSED`) when unset.
    failure_policy: Option<&'static str>,
    /// The build with the `fault-injection` feature instead of the one we ship.
    fault_injection: bool,
}

pub fn envoy() -> EnvoyBuilder {
    EnvoyBuilder {
        filters: Vec::new(),
        concurrency: 2,
        direct_response: false,
        stop_iteration: true,
        grpc_port: None,
        websocket_upgrades: false,
        buffer_limit: None,
        documented: Vec::new(),
        named_clusters: Vec::new(),
        prometheus_labels: false,
        demo_access_log: false,
        front_retry_policy: None,
        upstream_retry_policy: None,
        dynamic_listener: false,
        failure_policy: None,
        fault_injection: false,
    }
}

impl EnvoyBuilder {
    /// Adds a filter instance; instances run in the order they are added.
    pub fn filter(mut self, name: &str, config: &str) -> Self {
        self.filters.push(Filter {
            name: name.to_owned(),
            config: config.to_owned(),
        });
        self
    }

    /// Envoy answers 200 itself instead of routing to the upstream: the filter still runs,
    /// and a load test measures Envoy alone.
    pub fn direct_response(mut self) -> Self {
        self.direct_response = true;
        self
    }

    /// Routes gRPC calls (`content-type: application/grpc`) over HTTP/2 to a gRPC server on
    /// this port (cluster `grpc`).
    pub fn grpc_upstream(mut self, port: u16) -> Self {
        self.grpc_port = Some(port);
        self
    }

    /// Lets WebSocket upgrades through on every route, as Istio does by default.
    pub fn websocket_upgrades(mut self) -> Self {
        self.websocket_upgrades = true;
        self
    }

    /// Leaves out `allow_on_headers_stop_iteration`, as an operator might.
    pub fn without_headers_stop_iteration(mut self) -> Self {
        self.stop_iteration = false;
        self
    }

    /// An `http_filters` entry exactly as a document shows it (before the router this harness
    /// adds), with its `.wasm` path pointed at the freshly built one.
    pub fn documented_filter(mut self, entry: &serde_json::Value) -> Self {
        self.documented.push(entry.clone());
        self
    }

    /// A cluster named `name` in front of the upstream, for requests under `/<name>/`: a
    /// documented configuration scoped by cluster runs as written.
    pub fn named_cluster(mut self, name: &str) -> Self {
        self.named_clusters.push(name.to_owned());
        self
    }

    /// The `stats_config` the shipped configurations carry (taken from envoy/demo.yaml): the
    /// filter's metrics as Prometheus labels.
    pub fn prometheus_labels(mut self) -> Self {
        self.prometheus_labels = true;
        self
    }

    /// The access log of envoy/demo.yaml, one line per request in [`Envoy::log`], naming
    /// the deciding policies of the instance called `demo`.
    pub fn demo_access_log(mut self) -> Self {
        self.demo_access_log = true;
        self
    }

    /// A second listener ([`Envoy::front_url`]) in front of the filter's, as an Envoy at the
    /// edge would be: it routes every request to the filter's listener with this route
    /// `retry_policy`, so the filter's answers are upstream responses to it.
    pub fn front_retry_policy(mut self, policy: &serde_json::Value) -> Self {
        self.front_retry_policy = Some(policy.clone());
        self
    }

    /// A `retry_policy` on the routes behind the filter, to the upstream (`/`) and to the
    /// port where nothing listens (`/dead/`).
    pub fn upstream_retry_policy(mut self, policy: &serde_json::Value) -> Self {
        self.upstream_retry_policy = Some(policy.clone());
        self
    }

    /// Serves the filters' listener from a file-based listener source, the way operators
    /// push configuration: [`Envoy::push_filters`] replaces the filter chain while Envoy runs.
    pub fn dynamic_listener(mut self) -> Self {
        self.dynamic_listener = true;
        self
    }

    /// Runs the build with the `fault-injection` feature (`make build-fault`), whose VM traps
    /// at a request carrying `x-resilience-fault: trap`, under this `failure_policy`.
    pub fn trapping_build(mut self, failure_policy: &'static str) -> Self {
        self.fault_injection = true;
        self.failure_policy = Some(failure_policy);
        self
    }

    /// The listener's `per_connection_buffer_limit_bytes` (Envoy's default is 1 MiB): how much
    /// of a request Envoy buffers while a filter holds it.
    pub fn buffer_limit(mut self, bytes: u32) -> Self {
        self.buffer_limit = Some(bytes);
        self
    }

    pub fn concurrency(mut self, workers: usize) -> Self {
        self.concurrency = workers;
        self
    }

    /// Starts Envoy and waits until its admin endpoint reports it ready. Its ports are picked
    /// free and released before Envoy binds them, so another process can take one first (an
    /// Envoy's upstream connection takes its source port from the same range): Envoy then
    /// exits at once, and starts again on other ports.
    pub async fn start(self, upstream: &Upstream) -> Envoy {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let mut envoy = self.spawn(upstream);
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Ok(Some(status)) = envoy.child.try_wait() {
                    let log = envoy.log();
                    if attempt < ATTEMPTS && log.contains("Address already in use") {
                        break;
                    }
                    panic!("Envoy exited before it was ready ({status}):\n{log}");
                }
                if envoy
                    .admin("/ready")
                    .await
                    .is_some_and(|body| body.trim() == "LIVE")
                {
                    return envoy;
                }
                assert!(
                    Instant::now() < deadline,
                    "Envoy not ready after {READY_TIMEOUT:?}:\n{}",
                    envoy.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts Envoy expecting it to refuse its configuration; returns its exit status and log.
    pub async fn start_expecting_refusal(self, upstream: &Upstream) -> (ExitStatus, String) {
        let mut envoy = self.spawn(upstream);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return (status, envoy.log());
            }
            assert!(
                Instant::now() < deadline,
                "Envoy still running after {READY_TIMEOUT:?}:\n{}",
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A filter instance's `http_filters` entry.
    fn wasm_filter(&self, filter: &Filter) -> serde_json::Value {
        let wasm = if self.fault_injection {
            fault_wasm_path()
        } else {
            wasm_path()
        };
        let mut config = serde_json::json!({
            "name": filter.name,
            "root_id": "resilience",
            "allow_on_headers_stop_iteration": self.stop_iteration,
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": filter.config,
            },
            "vm_config": {
                "vm_id": VM_ID,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm}},
            },
        });
        if let Some(policy) = self.failure_policy {
            config["failure_policy"] = serde_json::Value::from(policy);
        }
        serde_json::json!({
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": config,
            },
        })
    }

    /// What [`EnvoyBuilder::wasm_filter`] reads, for pushes to a running Envoy.
    fn settings(&self) -> EnvoyBuilder {
        EnvoyBuilder {
            filters: Vec::new(),
            documented: Vec::new(),
            named_clusters: Vec::new(),
            front_retry_policy: None,
            upstream_retry_policy: None,
            ..*self
        }
    }

    fn spawn(&self, upstream: &Upstream) -> Envoy {
        let dir = scratch_dir();
        let port = free_port();
        let admin_port = free_port();
        let front_port = self.front_retry_policy.as_ref().map(|_| free_port());
        let mut yaml = self.yaml(port, admin_port, front_port, upstream);
        let listener = self.dynamic_listener.then(|| {
            let mut bootstrap: serde_json::Value =
                serde_norway::from_str(&yaml).expect("the bootstrap is YAML");
            let listeners = bootstrap["static_resources"]["listeners"]
                .as_array_mut()
                .expect("listeners");
            let mut listener = listeners.remove(0);
            listener["@type"] =
                serde_json::Value::from("type.googleapis.com/envoy.config.listener.v3.Listener");
            bootstrap["static_resources"]
                .as_object_mut()
                .expect("static_resources")
                .remove("listeners");
            // A file-based source still wants the node named.
            bootstrap["node"] = serde_json::json!({"id": "e2e", "cluster": "e2e"});
            bootstrap["dynamic_resources"] = serde_json::json!({"lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": dir.join("lds.yaml"),
                    "watched_directory": {"path": dir},
                }
            }});
            write_listener(&dir, &listener);
            yaml = bootstrap.to_string();
            listener
        });
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml).expect("write Envoy config");
        let log_path = dir.join("envoy.log");
        let log = std::fs::File::create(&log_path).expect("create Envoy log");
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &self.concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", "info"])
            // Access log lines reach the log within 100 ms, not Envoy's default 10 s.
            .args(["--file-flush-interval-msec", "100"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start Envoy (run `make setup` to install it)");
        Envoy {
            child,
            port,
            listener,
            builder: self.settings(),
            front_port,
            admin_port,
            log_path,
            dir,
        }
    }

    fn yaml(
        &self,
        port: u16,
        admin_port: u16,
        front_port: Option<u16>,
        upstream: &Upstream,
    ) -> String {
        let wasm = wasm_path();
        let mut filters = String::new();
        for filter in &self.filters {
            // JSON is YAML.
            let entry = self.wasm_filter(filter);
            write!(filters, "\n          - {entry}").expect("format filter");
        }
        for entry in &self.documented {
            let mut entry = entry.clone();
            entry["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] =
                serde_json::Value::from(wasm.display().to_string());
            // JSON is YAML: the entry goes in as the document wrote it.
            write!(filters, "\n          - {entry}").expect("format documented filter");
        }
        let retries = self
            .upstream_retry_policy
            .as_ref()
            .map(|policy| format!(", retry_policy: {policy}"))
            .unwrap_or_default();
        format!(
            r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}{stats_config}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}{buffer_limit}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          codec_type: AUTO
          use_remote_address: true{upgrades}{access_log}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/dead/"}}
                route: {{cluster: dead, timeout: 5s{retries}}}
              # Envoy answers 504 (flag SI) when the upstream is silent for 500 ms.
              - match: {{prefix: "/idle/"}}
                route: {{cluster: upstream, timeout: 30s, idle_timeout: 0.5s}}
              - match: {{prefix: "/", headers: [{{name: x-upstream-protocol, string_match: {{exact: h2}}}}]}}
                route: {{cluster: upstream_h2, timeout: 30s}}
              - match: {{prefix: "/", grpc: {{}}}}
                route: {{cluster: grpc, timeout: 30s}}{named_routes}
              - match: {{prefix: "/"}}
                {route}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router{front}
  clusters:
{upstream}
  # The same upstream over HTTP/2, which carries trailers both ways.
{upstream_h2}
  # The gRPC server of a test, when it has one.
{grpc}
  # Nothing listens here: requests under /dead/ fail to connect (response flag UF).
{dead}{named_clusters}{filtered}"#,
            upstream = cluster("upstream", upstream.addr.port()),
            // On 127.0.0.2, which no test binds: a port free on 127.0.0.1 now may be another
            // test's upstream a second later (seen: a soak's connect failures answered 200).
            dead = cluster_at("dead", "127.0.0.2", free_port()),
            stats_config = if self.prometheus_labels {
                format!("\nstats_config: {}", demo()["stats_config"])
            } else {
                String::new()
            },
            front = match (front_port, &self.front_retry_policy) {
                (Some(front_port), Some(policy)) => format!(
                    r#"
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: {front_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: filtered, timeout: 30s, retry_policy: {policy}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
                ),
                _ => String::new(),
            },
            filtered = if front_port.is_some() {
                format!("\n{}", cluster("filtered", port))
            } else {
                String::new()
            },
            access_log = if self.demo_access_log {
                format!("\n          access_log: {}", demo_hcm()["access_log"])
            } else {
                String::new()
            },
            named_routes = self.named_clusters.iter().fold(String::new(), |mut out, name| {
                let _ = write!(
                    out,
                    "\n              - match: {{prefix: \"/{name}/\"}}\n                route: {{cluster: {name}, timeout: 30s}}"
                );
                out
            }),
            named_clusters = self.named_clusters.iter().fold(String::new(), |mut out, name| {
                let _ = write!(out, "\n{}", cluster(name, upstream.addr.port()));
                out
            }),
            upstream_h2 = h2_cluster("upstream_h2", upstream.addr.port()),
            grpc = h2_cluster("grpc", self.grpc_port.unwrap_or_else(free_port)),
            buffer_limit = self
                .buffer_limit
                .map(|bytes| format!("\n    per_connection_buffer_limit_bytes: {bytes}"))
                .unwrap_or_default(),
            upgrades = if self.websocket_upgrades {
                "\n          upgrade_configs: [{upgrade_type: websocket}]"
            } else {
                ""
            },
            route = if self.direct_response {
                r#"direct_response: {status: 200, body: {inline_string: "direct\n"}}"#.to_owned()
            } else {
                format!("route: {{cluster: upstream, timeout: 30s{retries}}}")
            },

        )
    }
}

pub struct Envoy {
    child: Child,
    pub port: u16,
    /// The listener Envoy reads from `lds.yaml`, for an Envoy with a dynamic listener.
    listener: Option<serde_json::Value>,
    /// What each filter entry it pushes is built with.
    builder: EnvoyBuilder,
    front_port: Option<u16>,
    admin_port: u16,
    log_path: PathBuf,
    dir: PathBuf,
}

impl Envoy {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Replaces the filter instances of the dynamic listener, as an operator's push does: Envoy
    /// reads the new listener from its file and builds new filter configurations under the
    /// same `vm_id`; connections it already had drain on the old ones. Waits until Envoy has
    /// applied the update (`listener_manager.lds.update_success` moved).
    pub async fn push_filters(&mut self, filters: &[Filter]) {
        self.push(filters, "listener_manager.lds.update_success")
            .await;
    }

    /// Writes the listener with `filters` and waits until the counter `outcome` moves.
    async fn push(&mut self, filters: &[Filter], outcome: &str) {
        let before = self.stat(outcome).await;
        let mut entries: Vec<serde_json::Value> = filters
            .iter()
            .map(|filter| self.builder.wasm_filter(filter))
            .collect();
        let listener = self
            .listener
            .as_mut()
            .expect("an Envoy with a dynamic listener");
        let chain = &mut listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"];
        let router = chain
            .as_array()
            .and_then(|entries| entries.last().cloned())
            .expect("the router");
        entries.push(router);
        *chain = serde_json::Value::from(entries);
        write_listener(&self.dir, listener);
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.stat(outcome).await == before {
            assert!(
                Instant::now() < deadline,
                "Envoy did not count {outcome}:\n{}",
                self.log()
            );
        }
    }

    /// Pushes filter instances Envoy must refuse, and waits until it has
    /// (`listener_manager.lds.update_rejected` moved); the listener it had stays.
    pub async fn push_filters_expecting_rejection(&mut self, filters: &[Filter]) {
        let kept = self.listener.clone();
        self.push(filters, "listener_manager.lds.update_rejected")
            .await;
        self.listener = kept;
    }

    /// The listener in front of the filter's ([`EnvoyBuilder::front_retry_policy`]).
    pub fn front_url(&self, path: &str) -> String {
        let port = self.front_port.expect("an Envoy with a front listener");
        format!("http://127.0.0.1:{port}{path}")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET on the admin endpoint; `None` if Envoy does not answer 200.
    pub async fn admin(&self, path: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        let response = reqwest::get(url).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    }

    /// Envoy's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kib: u64 = status
            .lines()
            .find_map(|line| {
                line.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix(" kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// Connections each worker accepted on the main listener: proof that load was spread.
    pub async fn connections_per_worker(&self) -> Vec<u64> {
        let stats = self
            .admin("/stats?filter=downstream_cx_total")
            .await
            .unwrap_or_default();
        let prefix = format!("listener.127.0.0.1_{}.worker_", self.port);
        stats
            .lines()
            .filter_map(|line| {
                line.strip_prefix(&prefix)?
                    .split_once(".downstream_cx_total: ")?
                    .1
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// A counter or gauge from `/stats`, by its full name.
    /// Waits out the filter's counters flush first (every 100 ms, at each VM's tick).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        tokio::time::sleep(METRICS_FLUSHED).await;
        let stats = self.admin(&format!("/stats?filter=^{name}$")).await?;
        stats.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- Envoy log ({}) -----\n{}",
                self.log_path.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes the listener where Envoy watches for it: a new file moved into place, the one
/// change a watched directory reports.
fn write_listener(dir: &Path, listener: &serde_json::Value) {
    let resources = serde_json::json!({"resources": [listener]});
    let staged = dir.join("lds.yaml.new");
    std::fs::write(&staged, resources.to_string()).expect("write the listener");
    std::fs::rename(&staged, dir.join("lds.yaml")).expect("move the listener into place");
}

/// envoy/demo.yaml.
fn demo() -> serde_json::Value {
    serde_norway::from_str(
        &std::fs::read_to_string(repo_root().join("envoy/demo.yaml")).expect("demo.yaml"),
    )
    .expect("demo.yaml is YAML")
}

/// The demo's front listener's HTTP connection manager.
fn demo_hcm() -> serde_json::Value {
    demo()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        .clone()
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A cluster of one local endpoint that Envoy speaks HTTP/2 to.
/// A static cluster of one endpoint on loopback.
fn cluster(name: &str, port: u16) -> String {
    cluster_at(name, "127.0.0.1", port)
}

fn cluster_at(name: &str, host: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: {host}, port_value: {port}}}}}"#
    )
}

fn h2_cluster(name: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}"#
    )
}

/// The project's virtualenv's Python, which has grpcio (`make setup`).
pub fn venv_python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

fn envoy_binary() -> PathBuf {
    std::env::var_os("ENVOY_BIN").map_or_else(|| repo_root().join(".venv/bin/envoy"), PathBuf::from)
}

/// The release `.wasm`, refused if any source it was built from changed since: a stale filter
/// would make every end-to-end result a lie. Cargo's dep-info lists exactly those sources.
pub fn wasm_path() -> PathBuf {
    built_wasm(
        &repo_root().join("target/wasm32-wasip1/release"),
        "make build",
    )
}

/// The build with the `fault-injection` feature.
fn fault_wasm_path() -> PathBuf {
    built_wasm(
        &repo_root().join("target/fault/wasm32-wasip1/release"),
        "make build-fault",
    )
}

/// The filter cargo left in `release`, refused if a source changed after it was built.
fn built_wasm(release: &Path, make: &str) -> PathBuf {
    let wasm = release.join("envoy_resilience.wasm");
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let built =
        modified(&wasm).unwrap_or_else(|| panic!("{} is missing: run `{make}`", wasm.display()));
    let dep_info = std::fs::read_to_string(release.join("envoy_resilience.d")).unwrap_or_default();
    let sources = dep_info
        .lines()
        .next()
        .and_then(|line| line.split_once(": "))
        .map_or("", |(_, s)| s);
    for source in sources.split_whitespace() {
        let changed = modified(Path::new(source)).is_none_or(|m| m > built);
        assert!(
            !changed,
            "{source} changed after {} was built: run `{make}`",
            wasm.display()
        );
    }
    wasm
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("free port")
}

fn scratch_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("resilience-e2e-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
