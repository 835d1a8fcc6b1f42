//! Every example configuration under `filters/` agrees with both the parser and the schema.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use envoy_resilience::pipeline::config::Config;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[path = "common/markdown.rs"]
mod markdown;
use markdown::{fenced_blocks, markdown_files};

fn filters_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("filters")
}

/// The `*.json` files in every `examples/<kind>` folder under `filters/`.
fn examples(kind: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, kind: &str, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, kind, found);
            } else if path.extension().is_some_and(|e| e == "json")
                && path
                    .parent()
                    .is_some_and(|p| p.ends_with(Path::new("examples").join(kind)))
            {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&filters_dir(), kind, &mut found);
    found.sort();
    assert!(!found.is_empty(), "no {kind} examples under filters/");
    found
}

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(filters_dir().join("config.schema.json")).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

#[test]
fn valid_examples_parse_and_match_the_schema() {
    let schema = schema();
    for path in examples("valid") {
        let bytes = std::fs::read(&path).unwrap();
        if let Err(err) = Config::parse(&bytes) {
            panic!("{}: {err}", path.display());
        }
        let errors: Vec<String> = schema
            .iter_errors(&read_json(&path))
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{}: schema says {errors:?}",
            path.display()
        );
    }
}

#[test]
fn invalid_examples_are_refused_by_parser_and_schema() {
    let schema = schema();
    for path in examples("invalid") {
        let example = read_json(&path);
        let expected = example["expect_error_at"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no expect_error_at", path.display()));
        let configuration = &example["configuration"];
        match Config::parse(configuration.to_string().as_bytes()) {
            Ok(config) => panic!("{}: accepted as {config:?}", path.display()),
            Err(err) => assert_eq!(err.path, expected, "{}: {err}", path.display()),
        }
        // A rule across fields (cost <= capacity) is beyond JSON Schema: such an example says
        // so, and the schema must then accept it, so the note cannot go stale.
        let beyond_schema = example.get("beyond_schema").is_some();
        assert_eq!(
            schema.is_valid(configuration),
            beyond_schema,
            "{}: the schema {} it",
            path.display(),
            if beyond_schema { "refuses" } else { "accepts" }
        );
    }
}

/// Every YAML file under `envoy/`, as JSON values.
fn shipped_yaml() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, found: &mut Vec<(PathBuf, Value)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let value = serde_norway::from_str(&text)
                    .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
                found.push((path, value));
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy"),
        &mut found,
    );
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!found.is_empty());
    found
}

const WASM_FILTER: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// Every Envoy Wasm filter config (`envoy.extensions.filters.http.wasm.v3.Wasm`) in a value.
fn wasm_filters(value: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    match value {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_FILTER) {
                found.push(&map["config"]);
            }
            map.values().for_each(|v| found.extend(wasm_filters(v)));
        }
        Value::Array(items) => items.iter().for_each(|v| found.extend(wasm_filters(v))),
        _ => {}
    }
    found
}

/// The filter's configuration document in a Wasm filter config (a StringValue).
fn filter_configuration(wasm: &Value) -> Value {
    let configuration = &wasm["configuration"];
    assert_eq!(
        configuration["@type"],
        "type.googleapis.com/google.protobuf.StringValue"
    );
    serde_json::from_str(configuration["value"].as_str().unwrap()).unwrap()
}

fn assert_valid(schema: &jsonschema::Validator, configuration: &Value, path: &Path) {
    let errors: Vec<String> = schema
        .iter_errors(configuration)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{}: schema says {errors:?}",
        path.display()
    );
    Config::parse(configuration.to_string().as_bytes())
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
}

/// Every filter configuration we ship (Envoy YAML, and Istio's `pluginConfig`) is valid, and
/// every filter reloads a VM that traps: not left failing every request on its worker
/// (`FAIL_CLOSED`) or running without its policies (`FAIL_OPEN`).
#[test]
fn shipped_configurations_are_valid_and_reload_a_failed_vm() {
    let schema = schema();
    let mut checked = 0;
    for (path, value) in shipped_yaml() {
        for wasm in wasm_filters(&value) {
            assert_eq!(wasm["failure_policy"], "FAIL_RELOAD", "{}", path.display());
            assert_valid(&schema, &filter_configuration(wasm), &path);
            checked += 1;
        }
        if value["kind"] == "WasmPlugin" {
            assert_eq!(
                value["spec"]["failStrategy"],
                "FAIL_RELOAD",
                "{}",
                path.display()
            );
            assert_valid(&schema, &value["spec"]["pluginConfig"], &path);
            checked += 1;
        }
    }
    assert!(
        checked >= 6,
        "only {checked} filter configurations under envoy/"
    );
}

/// `make run` and `docker-compose up` demonstrate the same policies; only whom the priority
/// header is trusted from differs (loopback there, Docker's private networks here).
#[test]
fn the_docker_demo_has_the_policies_of_the_local_demo() {
    let configuration = |file: &str| {
        let (path, value) = shipped_yaml()
            .into_iter()
            .find(|(path, _)| path.ends_with(file))
            .unwrap();
        let wasm = wasm_filters(&value);
        assert_eq!(wasm.len(), 1, "{}", path.display());
        let mut configuration = filter_configuration(wasm[0]);
        configuration["load_shedding"]["priority"]
            .as_object_mut()
            .unwrap()
            .remove("trusted_sources");
        configuration
    };
    assert_eq!(
        configuration("envoy/demo.yaml"),
        configuration("envoy/docker/envoy.yaml")
    );
}

/// The fields and enum values Istio 1.29 documents for the resources we ship (istio/api
/// `extensions/v1alpha1/wasm.proto`, `networking/v1alpha3/envoy_filter.proto`): a shape is
/// an object of allowed fields, a list of allowed strings, `{"[]": item}` for a list, or
/// a type name ("string", "int", "labels", and "any" where Istio takes any value).
fn istio_shape(kind: &str) -> Value {
    let selector = json!({"matchLabels": "labels"});
    let target =
        json!({"group": "string", "kind": "string", "name": "string", "namespace": "string"});
    let metadata = json!({"name": "string", "namespace": "string", "labels": "labels", "annotations": "labels"});
    let spec = match kind {
        "WasmPlugin" => json!({
            "selector": selector,
            "targetRef": target,
            "targetRefs": {"[]": target},
            "url": "string",
            "sha256": "string",
            "imagePullPolicy": ["UNSPECIFIED_POLICY", "IfNotPresent", "Always"],
            "imagePullSecret": "string",
            "pluginConfig": "any",
            "pluginName": "string",
            "phase": ["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"],
            "priority": "int",
            "failStrategy": ["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"],
            "vmConfig": {"env": {"[]": {"name": "string", "value": "string", "valueFrom": ["INLINE", "HOST"]}}},
            "match": {"[]": {
                "mode": ["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"],
                "ports": {"[]": {"number": "int"}}
            }},
            "type": ["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"]
        }),
        "EnvoyFilter" => json!({
            "workloadSelector": {"labels": "labels"},
            "targetRefs": {"[]": target},
            "priority": "int",
            "configPatches": {"[]": {
                "applyTo": ["LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER",
                            "ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER",
                            "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER"],
                "match": {
                    "context": ["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY", "WAYPOINT"],
                    "proxy": {"proxyVersion": "string", "metadata": "labels"},
                    "listener": {
                        "portNumber": "int", "portName": "string", "name": "string",
                        "listenerFilter": "string",
                        "filterChain": {
                            "name": "string", "sni": "string", "transportProtocol": "string",
                            "applicationProtocols": "string", "destinationPort": "int",
                            "filter": {"name": "string", "subFilter": {"name": "string"}}
                        }
                    },
                    "routeConfiguration": "any",
                    "cluster": "any"
                },
                "patch": {
                    "operation": ["MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER",
                                  "INSERT_FIRST", "REPLACE"],
                    "value": "any",
                    "filterClass": ["UNSPECIFIED", "AUTHN", "AUTHZ", "STATS"]
                }
            }}
        }),
        other => panic!("no Istio shape for kind {other}"),
    };
    let api_version = match kind {
        "WasmPlugin" => "extensions.istio.io/v1alpha1",
        _ => "networking.istio.io/v1alpha3",
    };
    json!({"apiVersion": [api_version], "kind": [kind], "metadata": metadata, "spec": spec})
}

fn check_shape(value: &Value, shape: &Value, at: &str, errors: &mut Vec<String>) {
    match (shape, value) {
        (Value::String(t), _) if t == "any" => {}
        (Value::String(t), Value::String(_)) if t == "string" => {}
        (Value::String(t), Value::Number(n)) if t == "int" && n.is_i64() => {}
        (Value::String(t), Value::Object(map)) if t == "labels" => {
            if !map.values().all(Value::is_string) {
                errors.push(format!("{at}: values must be strings"));
            }
        }
        (Value::Array(allowed), Value::String(s)) => {
            if !allowed.iter().any(|a| a == s) {
                errors.push(format!("{at}: {s} is none of {allowed:?}"));
            }
        }
        (Value::Object(fields), Value::Array(items)) if fields.contains_key("[]") => {
            for (i, item) in items.iter().enumerate() {
                check_shape(item, &fields["[]"], &format!("{at}[{i}]"), errors);
            }
        }
        (Value::Object(fields), Value::Object(map)) if !fields.contains_key("[]") => {
            for (name, v) in map {
                match fields.get(name) {
                    Some(shape) => check_shape(v, shape, &format!("{at}.{name}"), errors),
                    None => errors.push(format!("{at}.{name}: not a field Istio documents")),
                }
            }
        }
        _ => errors.push(format!("{at}: {value} is not a {shape}")),
    }
}

/// Offline, as far as it goes: each Istio manifest uses only the fields and values Istio
/// documents, and holds what its kind needs for this filter (checked against a real Istio:
/// never; see envoy/istio/README.md).
#[test]
fn istio_manifests_use_documented_fields_and_what_the_filter_needs() {
    let manifests: Vec<(PathBuf, Value)> = shipped_yaml()
        .into_iter()
        .filter(|(path, _)| path.parent().is_some_and(|p| p.ends_with("envoy/istio")))
        .collect();
    assert!(manifests.len() >= 4);
    for (path, manifest) in &manifests {
        let kind = manifest["kind"].as_str().unwrap();
        let mut errors = Vec::new();
        check_shape(manifest, &istio_shape(kind), "", &mut errors);
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        let spec = &manifest["spec"];
        if kind == "WasmPlugin" {
            assert_eq!(spec["pluginName"], "resilience", "{}", path.display());
            assert!(spec["url"].as_str().unwrap().starts_with("oci://"));
            // Idempotency needs allow_on_headers_stop_iteration, which a WasmPlugin cannot set.
            assert!(
                spec["pluginConfig"].get("idempotency").is_none(),
                "{}",
                path.display()
            );
            continue;
        }
        let patches = spec["configPatches"].as_array().unwrap();
        for patch in patches {
            let filter = &patch["match"]["listener"]["filterChain"]["filter"];
            if filter.get("subFilter").is_some() {
                assert_eq!(patch["applyTo"], "HTTP_FILTER", "{}", path.display());
                assert_eq!(
                    filter["name"],
                    "envoy.filters.network.http_connection_manager"
                );
            }
            if patch["applyTo"] == "EXTENSION_CONFIG" {
                assert_eq!(patch["patch"]["operation"], "ADD", "{}", path.display());
            }
        }
        // The HTTP filter finds its configuration over ECDS by name.
        let names = |apply_to: &str| -> Vec<&Value> {
            patches
                .iter()
                .filter(|p| p["applyTo"] == apply_to)
                .map(|p| &p["patch"]["value"]["name"])
                .collect()
        };
        assert_eq!(
            names("EXTENSION_CONFIG"),
            names("HTTP_FILTER"),
            "{}",
            path.display()
        );
        for wasm in wasm_filters(manifest) {
            assert_eq!(
                wasm["allow_on_headers_stop_iteration"],
                true,
                "{}",
                path.display()
            );
            assert!(!wasm["vm_config"]["vm_id"].as_str().unwrap().is_empty());
            assert_eq!(wasm["root_id"], "resilience");
        }
    }
}

/// Issue 16: every filter configuration a document shows in a YAML snippet is one the filter
/// and the schema accept, as written.
#[test]
fn every_configuration_in_the_docs_is_accepted() {
    let schema = schema();
    let mut checked = 0;
    for path in markdown_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        for (info, yaml) in fenced_blocks(&text) {
            if info != "yaml" {
                continue;
            }
            let Ok(value) = serde_norway::from_str::<Value>(yaml) else {
                assert!(
                    !yaml.contains(WASM_FILTER),
                    "{}: a snippet with a Wasm filter is not YAML:\n{yaml}",
                    path.display()
                );
                continue;
            };
            for wasm in wasm_filters(&value) {
                assert_valid(&schema, &filter_configuration(wasm), &path);
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "only {checked} snippets found");
}

/// Issue 13: every shipped Envoy that runs the filter exports its metrics with the same
/// Prometheus labels (one `stats_config`, the one envoy/demo.yaml carries), and Istio's
/// bootstrap patch merges that same one.
#[test]
fn every_shipped_envoy_with_the_filter_has_the_same_stats_tags() {
    let shipped = shipped_yaml();
    let demo = &shipped
        .iter()
        .find(|(path, _)| path.ends_with("envoy/demo.yaml"))
        .unwrap()
        .1["stats_config"];
    assert!(demo["stats_tags"]
        .as_array()
        .is_some_and(|tags| tags.len() == 6));
    let mut checked = 0;
    for (path, value) in &shipped {
        if value.get("static_resources").is_some() && !wasm_filters(value).is_empty() {
            assert_eq!(&value["stats_config"], demo, "{}", path.display());
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "demo, docker, fleet");
    let istio = &shipped
        .iter()
        .find(|(path, _)| path.ends_with("envoy/istio/stats-tags.yaml"))
        .expect("the Istio bootstrap patch")
        .1;
    assert_eq!(istio["kind"], "EnvoyFilter");
    let patch = &istio["spec"]["configPatches"][0];
    assert_eq!(
        (&patch["applyTo"], &patch["patch"]["operation"]),
        (&Value::from("BOOTSTRAP"), &Value::from("MERGE"))
    );
    assert_eq!(
        &patch["patch"]["value"]["stats_config"], demo,
        "Istio's patch"
    );
}
