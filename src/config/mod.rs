//! The filter's configuration: one JSON document, parsed and validated once in `on_configure`.
//!
//! Two stages, as in Kuadrant's wasm-shim: serde structs that refuse unknown fields, then
//! [`Config::validate`], which checks ranges and builds the settings the data path uses. Both
//! stages report a [`ConfigError`] naming the field path, which the host logs before
//! refusing the filter. Every section is optional; an empty configuration runs no policy.

mod duration;

pub use duration::Duration;

use crate::circuit_breaker::{CircuitBreakerConfig, RawCircuitBreaker};
use crate::idempotency::{IdempotencyConfig, RawIdempotency};
use crate::load_shed::{LoadSheddingConfig, RawLoadShedding};
use crate::rate_limit::{RateLimitConfig, RawRateLimit};
use serde::Deserialize;
use std::fmt;

/// The configuration as written, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub shared_data: RawSharedData,
    pub rate_limit: Option<RawRateLimit>,
    pub circuit_breaker: Option<RawCircuitBreaker>,
    pub load_shedding: Option<RawLoadShedding>,
    pub idempotency: Option<RawIdempotency>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSharedData {
    pub on_error: Option<FailureMode>,
    pub max_attempts: Option<u32>,
}

/// What a policy does when shared data cannot give an answer (a host error, or every
/// compare-and-swap attempt lost to other workers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through unprotected (fail open).
    #[default]
    Allow,
    /// Refuse the request (fail closed).
    Deny,
}

/// Validated settings, ready for the data path.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub shared_data: SharedDataSettings,
    pub rate_limit: Option<RateLimitConfig>,
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    pub load_shedding: Option<LoadSheddingConfig>,
    pub idempotency: Option<IdempotencyConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedDataSettings {
    pub on_error: FailureMode,
    pub max_attempts: u32,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
pub const MAX_ATTEMPTS_RANGE: std::ops::RangeInclusive<u32> = 1..=64;

/// A configuration the filter refuses, with the path of the offending field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path from the document root, e.g. `shared_data.max_attempts`; `.` for the root.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration at `{}`: {}",
            self.path, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub(crate) fn at(path: &str, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

impl Config {
    /// Parses and validates the bytes Envoy hands to `on_configure`. No bytes, or only
    /// whitespace, is the empty configuration.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let document = bytes.trim_ascii_start();
        let raw = if document.is_empty() {
            RawConfig::default()
        } else if !document.starts_with(b"{") {
            // serde would read a JSON array positionally into the struct's fields.
            return Err(ConfigError::at(
                ".",
                "the configuration must be a JSON object",
            ));
        } else {
            let mut deserializer = serde_json::Deserializer::from_slice(document);
            let raw: RawConfig =
                serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
                    // serde_path_to_error writes `?` where the document broke before any field.
                    let path = match err.path().to_string() {
                        unknown if unknown == "?" => ".".to_owned(),
                        path => path,
                    };
                    ConfigError::at(&path, err.inner().to_string())
                })?;
            deserializer
                .end()
                .map_err(|err| ConfigError::at(".", err.to_string()))?;
            raw
        };
        Config::validate(raw)
    }

    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let max_attempts = raw.shared_data.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !MAX_ATTEMPTS_RANGE.contains(&max_attempts) {
            return Err(ConfigError::at(
                "shared_data.max_attempts",
                format!(
                    "must be between {} and {}, got {max_attempts}",
                    MAX_ATTEMPTS_RANGE.start(),
                    MAX_ATTEMPTS_RANGE.end()
                ),
            ));
        }
        let rate_limit = raw
            .rate_limit
            .map(|raw| RateLimitConfig::validate(raw, "rate_limit"))
            .transpose()?;
        let circuit_breaker = raw
            .circuit_breaker
            .map(|raw| CircuitBreakerConfig::validate(raw, "circuit_breaker"))
            .transpose()?;
        let load_shedding = raw
            .load_shedding
            .map(|raw| LoadSheddingConfig::validate(raw, "load_shedding"))
            .transpose()?;
        let idempotency = raw
            .idempotency
            .map(|raw| IdempotencyConfig::validate(raw, "idempotency"))
            .transpose()?;
        Ok(Config {
            shared_data: SharedDataSettings {
                on_error: raw.shared_data.on_error.unwrap_or_default(),
                max_attempts,
            },
            rate_limit,
            circuit_breaker,
            load_shedding,
            idempotency,
        })
    }

    /// The request headers any policy reads, each once: the host fetches only these.
    pub fn request_headers(&self) -> Vec<String> {
        let rate_limit = self
            .rate_limit
            .iter()
            .flat_map(RateLimitConfig::header_names);
        let breakers = self
            .circuit_breaker
            .iter()
            .flat_map(CircuitBreakerConfig::header_names);
        let shedding = self
            .load_shedding
            .iter()
            .flat_map(LoadSheddingConfig::header_names);
        let idempotency = self
            .idempotency
            .iter()
            .flat_map(IdempotencyConfig::header_names);
        let mut names: Vec<String> = rate_limit
            .chain(breakers)
            .chain(shedding)
            .chain(idempotency)
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether any policy reads the upstream cluster the route selected.
    pub fn needs_cluster(&self) -> bool {
        self.circuit_breaker
            .as_ref()
            .is_some_and(CircuitBreakerConfig::needs_cluster)
            || self
                .load_shedding
                .as_ref()
                .is_some_and(LoadSheddingConfig::needs_cluster)
    }

    /// Whether any policy reads the downstream peer address.
    pub fn needs_peer(&self) -> bool {
        self.rate_limit
            .as_ref()
            .is_some_and(RateLimitConfig::needs_peer)
            || self
                .load_shedding
                .as_ref()
                .is_some_and(LoadSheddingConfig::needs_peer)
            || self
                .idempotency
                .as_ref()
                .is_some_and(IdempotencyConfig::needs_peer)
    }
}

#[cfg(test)]
mod tests;
