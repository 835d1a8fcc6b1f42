//! What Prometheus scrapes with the shipped `stats_config`, and the Grafana dashboard over it.

use super::envoy::{envoy, repo_root, Envoy};
use super::upstream::Upstream;
use std::collections::{BTreeMap, BTreeSet};

/// One sample of `/stats/prometheus`: its name, labels and value.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: String,
}

/// Parses the text exposition format, as Envoy writes it (no escapes in our label values).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').expect("closed")),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("key=value");
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.to_owned(),
            }
        })
        .collect()
}

async fn scrape(envoy: &Envoy) -> Vec<Sample> {
    tokio::time::sleep(super::METRICS_FLUSHED).await;
    samples(&envoy.admin("/stats/prometheus").await.unwrap())
}

/// The filter's series only, each as `name{labels} value` with its labels sorted.
fn ours(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.name.starts_with("resilience_"))
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}{{{}}} {}", s.name, labels.join(","), s.value)
        })
        .collect()
}

/// Issue 13: with the shipped `stats_config`, Prometheus gets the instance, rule, breaker,
/// pool, outcome and class as labels, each series counting what the clients saw.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_stats_tags_make_prometheus_labels() {
    let upstream = Upstream::start().await;
    let config = r#"{
        "rate_limit": {"rules": [{"name": "per-client", "key": ["client_address"], "capacity": 3,
                                  "refill": {"tokens": 1, "interval": "1h"}}]},
        "circuit_breaker": {"breakers": [{"name": "api", "scope": {"match": {}},
                                          "trip": {"consecutive_failures": 5}}]},
        "load_shedding": {"pools": [{"name": "all", "max_in_flight": 10}],
                          "priority": {"rules": [{"match": {"path_prefix": "/batch/"}, "class": "low"}]}}}"#;
    let envoy = envoy()
        .filter("labelled", config)
        .prometheus_labels()
        .start(&upstream)
        .await;
    let client = super::fresh_connections();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = client.get(envoy.url("/")).send().await.unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let exported = ours(&scrape(&envoy).await);
    let instance = "resilience_instance=labelled";
    for series in [
        format!("resilience_requests{{{instance}}} 5"),
        format!("resilience_rate_limit{{{instance},resilience_outcome=allowed,resilience_rule=per-client}} 3"),
        format!("resilience_rate_limit{{{instance},resilience_outcome=limited,resilience_rule=per-client}} 2"),
        format!("resilience_rate_limit{{{instance},resilience_outcome=shadow_limited,resilience_rule=per-client}} 0"),
        format!("resilience_circuit_breaker_state{{resilience_breaker=api,{instance}}} 0"),
        format!("resilience_circuit_breaker{{resilience_breaker=api,{instance},resilience_outcome=rejected}} 0"),
        format!("resilience_circuit_breaker_transitions_to_open{{resilience_breaker=api,{instance}}} 0"),
        format!("resilience_load_shedding{{{instance},resilience_outcome=admitted,resilience_pool=all}} 5"),
        format!("resilience_load_shedding_in_flight{{{instance},resilience_pool=all}} 0"),
        format!("resilience_load_shedding{{resilience_class=low,{instance},resilience_outcome=shed,resilience_pool=all}} 0"),
        format!("resilience_load_shedding{{resilience_class=normal,{instance},resilience_outcome=shadow_shed,resilience_pool=all}} 0"),
    ] {
        assert!(
            exported.contains(&series),
            "{series} not in:\n{}",
            exported.join("\n")
        );
    }
}

/// The metric names and label names a PromQL expression reads: labels are what `by (...)`
/// groups by and `{...}` matches on; every other `resilience_` name is a metric.
fn names_in(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut labels = BTreeSet::new();
    let mut rest = String::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let group = if expr[i..].starts_with("by (") {
            Some((i + 4, ')'))
        } else if c == '{' {
            Some((i + 1, '}'))
        } else {
            None
        };
        if let Some((start, close)) = group {
            let end = start + expr[start..].find(close).expect("closed group");
            for part in expr[start..end].split(',') {
                let label = part.split(['=', '!', '~']).next().unwrap_or("").trim();
                if !label.is_empty() {
                    labels.insert(label.to_owned());
                }
            }
            while chars.peek().is_some_and(|(j, _)| *j <= end) {
                chars.next();
            }
            rest.push(' ');
            continue;
        }
        rest.push(c);
    }
    let metrics = rest
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("resilience_"))
        .map(str::to_owned)
        .collect();
    (metrics, labels)
}

/// Issue 13: every query of the shipped dashboard reads series a real Envoy with the
/// shipped `stats_config` exports, by labels those series carry, so no panel is empty by
/// construction.
#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_reads_series_envoy_exports() {
    let upstream = Upstream::start().await;
    let config = r#"{
        "rate_limit": {"rules": [{"name": "r", "capacity": 100, "refill": {"tokens": 1, "interval": "1s"}}]},
        "circuit_breaker": {"breakers": [{"name": "b", "scope": {"match": {}}, "trip": {"consecutive_failures": 5}}]},
        "load_shedding": {"pools": [{"name": "p", "max_in_flight": 10}]},
        "idempotency": {}}"#;
    let envoy = envoy()
        .filter("dashboard", config)
        .prometheus_labels()
        .start(&upstream)
        .await;
    let client = super::fresh_connections();
    client.get(envoy.url("/")).send().await.unwrap();
    let exported = scrape(&envoy).await;
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("envoy/grafana/dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids differ"
        );
        let title = panel["title"].as_str().unwrap();
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let (metrics, labels) = names_in(expr);
            assert!(
                !metrics.is_empty(),
                "{title}: {expr} reads no metric of ours"
            );
            for metric in &metrics {
                let series: Vec<&Sample> = exported.iter().filter(|s| &s.name == metric).collect();
                assert!(!series.is_empty(), "{title}: {metric} is not exported");
                for label in &labels {
                    assert!(
                        series.iter().any(|s| s.labels.contains_key(label)),
                        "{title}: no {metric} series has the label {label}"
                    );
                }
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}
