//! Every example configuration under `filters/` agrees with both the parser and the schema.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use envoy_resilience::pipeline::config::Config;
use serde_json::Value;
use std::path::{Path, PathBuf};

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

/// Every filter configuration embedded in `envoy/` is valid.
#[test]
fn shipped_envoy_configurations_hold_valid_filter_configurations() {
    let schema = schema();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for config in embedded_configurations(&text) {
            let value: Value = serde_json::from_str(&config)
                .unwrap_or_else(|err| panic!("{}: {err}\n{config}", entry.path().display()));
            assert!(
                schema.is_valid(&value),
                "{}: schema refuses {config}",
                entry.path().display()
            );
            Config::parse(config.as_bytes())
                .unwrap_or_else(|err| panic!("{}: {err}", entry.path().display()));
            checked += 1;
        }
    }
    assert!(checked > 0, "no filter configuration found in envoy/");
}

/// Defence in depth: a VM that ever traps is reloaded, not left failing every request on its
/// worker (`FAIL_CLOSED`) or running without its policies (`FAIL_OPEN`).
#[test]
fn shipped_envoy_configurations_reload_a_failed_vm() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let filters = text.matches("envoy.filters.http.wasm").count();
        let reloading = text
            .lines()
            .filter(|l| l.trim() == "failure_policy: FAIL_RELOAD")
            .count();
        assert_eq!(reloading, filters, "{}", entry.path().display());
    }
}

/// The JSON after each `value: |` line of a StringValue configuration, up to the end of
/// its indented block.
fn embedded_configurations(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "value: |" {
            continue;
        }
        let indent = |l: &str| l.len() - l.trim_start().len();
        let own = indent(line);
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || indent(l) > own)
            .copied()
            .collect();
        found.push(block.join("\n"));
    }
    found
}
