//! One compose project of docker-compose.yaml, up for one test and down when dropped.

use crate::{command, fresh_connections, run};
use serde_json::Value;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A compose project of one of the repository's compose files, under a name of its own,
/// with every published port picked by Docker (each `*_PORT` variable set empty), so tests
/// run side by side and beside a running demo. Down, volumes and all, when dropped.
pub struct Project {
    name: String,
    file: &'static str,
    port_variables: &'static [&'static str],
}

impl Project {
    pub fn up(test: &str, file: &'static str, port_variables: &'static [&'static str]) -> Project {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "resilience-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
        .replace('_', "-");
        let project = Project {
            name,
            file,
            port_variables,
        };
        project.compose(&["up", "-d"]);
        project
    }

    /// Runs docker-compose on this project.
    pub fn compose(&self, args: &[&str]) -> String {
        let mut command = compose(&["-p", &self.name, "-f", self.file]);
        command.args(args);
        for variable in self.port_variables {
            command.env(variable, "");
        }
        run(&mut command)
    }

    /// Cuts a service's container off from one of the project's networks, as a partition
    /// would: its connections there fail and its peers' names stop resolving.
    pub fn disconnect(&self, service: &str, network: &str) {
        self.network("disconnect", service, network);
    }

    /// Joins a service's container to one of the project's networks again.
    pub fn connect(&self, service: &str, network: &str) {
        self.network("connect", service, network);
    }

    fn network(&self, action: &str, service: &str, network: &str) {
        let container = self.compose(&["ps", "-q", service]);
        // Compose v1 and v2 spell the network's name differently; both label it.
        let project = format!("label=com.docker.compose.project={}", self.name);
        let label = format!("label=com.docker.compose.network={network}");
        let id = run(&mut command(
            "docker",
            &[
                "network", "ls", "-q", "--filter", &project, "--filter", &label,
            ],
        ));
        run(&mut command(
            "docker",
            &["network", action, id.trim(), container.trim()],
        ));
    }

    /// `http://127.0.0.1:<port>` where Docker published a service's port.
    pub fn url(&self, service: &str, port: u16) -> String {
        let address = self.compose(&["port", service, &port.to_string()]);
        format!("http://{}", address.trim())
    }

    /// Waits until the Envoy whose admin is at `admin` is ready.
    pub async fn wait_until_ready(&self, admin: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("{admin}/ready");
        loop {
            if let Ok(response) = fresh_connections().get(&url).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Envoy of {} not ready in 60 s:\n{}",
                self.name,
                self.compose(&["logs", "--no-color"])
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every request the `upstream` service has served, in the order it logged them, once
    /// it has logged at least `expected` and then nothing more for a while: a test asserts
    /// the exact count, and one too many must show.
    pub async fn upstream_saw(&self, expected: usize) -> Vec<Seen> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = self.upstream_log();
        while seen.len() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen = self.upstream_log();
        }
        // The upstream flushes its log every 100 ms (--file-flush-interval-msec).
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.upstream_log()
    }

    fn upstream_log(&self) -> Vec<Seen> {
        let logs = self.compose(&["logs", "--no-color", "upstream"]);
        logs.lines()
            .filter_map(|line| line.split_once("| {").map(|(_, json)| format!("{{{json}")))
            .map(|json| {
                let v: Value =
                    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
                let text = |field: &str| v[field].as_str().map(str::to_owned);
                Seen {
                    method: text("method").unwrap(),
                    path: text("path").unwrap(),
                    status: v["status"].as_u64().unwrap() as u16,
                    idempotency_key: text("idempotency_key"),
                    start: text("start").unwrap().parse().unwrap(),
                    duration: Duration::from_millis(v["duration_ms"].as_u64().unwrap()),
                }
            })
            .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = compose(&["-p", &self.name, "-f", self.file, "down", "-v", "-t", "1"]).output();
    }
}

/// The demo of docker-compose.yaml: Envoy in front of the demo upstream.
pub struct Demo {
    project: Project,
    /// `http://127.0.0.1:<port>` of Envoy's listener.
    pub front: String,
    /// `http://127.0.0.1:<port>` of Envoy's admin.
    pub admin: String,
}

/// One request the demo upstream served, from its access log.
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub idempotency_key: Option<String>,
    /// Seconds since the epoch.
    pub start: f64,
    pub duration: Duration,
}

/// Debian's docker-compose (Compose v1), or `docker compose` (v2) where only that answers.
fn compose(args: &[&str]) -> Command {
    static V1: OnceLock<bool> = OnceLock::new();
    let v1 = *V1.get_or_init(|| {
        command("docker-compose", &["version"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if v1 {
        command("docker-compose", args)
    } else {
        let mut command = command("docker", &["compose"]);
        command.args(args);
        command
    }
}

impl Demo {
    pub async fn up(test: &str) -> Demo {
        let project = Project::up(test, "docker-compose.yaml", &["DEMO_PORT", "ADMIN_PORT"]);
        let (front, admin) = (project.url("envoy", 10000), project.url("envoy", 9901));
        project.wait_until_ready(&admin).await;
        Demo {
            project,
            front,
            admin,
        }
    }

    pub async fn upstream_saw(&self, expected: usize) -> Vec<Seen> {
        self.project.upstream_saw(expected).await
    }

    pub async fn stat(&self, name: &str) -> u64 {
        stat(&self.admin, name).await
    }

    pub async fn stats(&self, filter: &str) -> Vec<(String, u64)> {
        stats(&self.admin, filter).await
    }

    /// Envoy's `--concurrency`, as its admin reports it.
    pub async fn workers(&self) -> u64 {
        let url = format!("{}/server_info", self.admin);
        let text = get(&url).await;
        let info: Value = serde_json::from_str(&text).unwrap();
        info["command_line_options"]["concurrency"]
            .as_u64()
            .unwrap()
    }
}

/// One counter or gauge from the admin at `admin`, 0 when absent.
pub async fn stat(admin: &str, name: &str) -> u64 {
    let stats = stats(admin, name).await;
    stats.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v)
}

/// Every stat whose name contains `filter`, once the filter's counters flush (every 100 ms)
/// has run.
pub async fn stats(admin: &str, filter: &str) -> Vec<(String, u64)> {
    tokio::time::sleep(crate::METRICS_FLUSHED).await;
    let text = get(&format!("{admin}/stats?filter={filter}")).await;
    text.lines()
        .filter_map(|line| line.split_once(": "))
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

async fn get(url: &str) -> String {
    let response = fresh_connections().get(url).send().await.unwrap();
    response.text().await.unwrap()
}
