//! The filter's configuration document: one JSON object, parsed and validated once in
//! `on_configure`, with a section per policy.
//!
//! Two stages, as in Kuadrant's wasm-shim: raw structs read from the JSON tree, refusing
//! unknown fields and wrong types ([`crate::config::json`]), then validation, which checks ranges and builds the settings the data path uses. Both stages
//! report a [`ConfigError`] naming the field path, which the host logs before refusing the
//! filter. Every section is optional; an empty configuration runs no policy.

use crate::circuit_breaker::{CircuitBreakerConfig, RawCircuitBreaker};
use crate::config::json::{json_object, FromJson, Json};
use crate::config::{check_header_name, ConfigError};
use crate::idempotency::{IdempotencyConfig, RawIdempotency, REPLAYED_HEADER};
use crate::load_shedding::{LoadSheddingConfig, RawLoadShedding};
use crate::matcher::{Match, RawMatch};
use crate::rate_limit::{RateLimitConfig, RawRateLimit};
use crate::reply::POLICY_HEADERS;
use crate::store::{RawSharedData, SharedDataSettings};

/// The configuration as written, before validation.
#[derive(Debug, Default)]
pub struct RawConfig {
    pub shared_data: Option<RawSharedData>,
    pub rate_limit: Option<RawRateLimit>,
    pub circuit_breaker: Option<RawCircuitBreaker>,
    pub load_shedding: Option<RawLoadShedding>,
    pub idempotency: Option<RawIdempotency>,
    pub long_lived: Option<RawLongLived>,
    pub decision_header: Option<String>,
}

/// Which requests are long-lived: a streaming RPC cannot be told from a unary call on the wire,
/// and an `Upgrade` header is the client's to send, so the operator names them, by method and
/// path only (a client chooses its headers, and how it spells its host).
#[derive(Debug)]
pub struct RawLongLived {
    pub matches: Vec<RawMatch>,
}

json_object!(RawConfig {
    shared_data: "shared_data",
    rate_limit: "rate_limit",
    circuit_breaker: "circuit_breaker",
    load_shedding: "load_shedding",
    idempotency: "idempotency",
    long_lived: "long_lived",
    decision_header: "decision_header",
});
json_object!(RawLongLived { matches: "match" });

pub const MAX_LONG_LIVED_MATCHES: usize = 64;

/// Response headers HTTP or Envoy gives a meaning the decisions would change or lose:
/// hop-by-hop ones (Envoy strips them), framing, caching, redirects, cookies, authentication.
/// `x-request-id`, `via` and `proxy-status` Envoy itself writes after the filters ran.
const RESPONSE_HEADERS_WITH_A_MEANING: [&str; 23] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "date",
    "server",
    "location",
    "set-cookie",
    "vary",
    "cache-control",
    "etag",
    "last-modified",
    "expires",
    "age",
    "www-authenticate",
    "proxy-authenticate",
    "alt-svc",
    "x-request-id",
    "via",
    "proxy-status",
];

/// Validated settings, ready for the data path.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub shared_data: SharedDataSettings,
    pub rate_limit: Option<RateLimitConfig>,
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    pub load_shedding: Option<LoadSheddingConfig>,
    pub idempotency: Option<IdempotencyConfig>,
    /// Requests that are long-lived besides upgrades and `CONNECT`.
    pub long_lived: Vec<Match>,
    /// The response header that names the policies that refused the request, or would have
    /// in dry run; `None`: no such header (the filter state carries them still).
    pub decision_header: Option<String>,
}

impl Config {
    /// Parses and validates the bytes Envoy hands to `on_configure`. No bytes, or only
    /// whitespace, is the empty configuration.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let document = bytes.trim_ascii_start();
        let raw = if document.is_empty() {
            RawConfig::default()
        } else {
            RawConfig::from_json(Json::parse(document)?, "")?
        };
        Config::validate(raw)
    }

    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let RawConfig {
            shared_data,
            rate_limit,
            circuit_breaker,
            load_shedding,
            idempotency,
            long_lived,
            decision_header,
        } = raw;
        let mut long_lived_matches = Vec::new();
        if let Some(raw) = long_lived {
            if raw.matches.is_empty() || raw.matches.len() > MAX_LONG_LIVED_MATCHES {
                return Err(ConfigError::at(
                    "long_lived.match",
                    format!("must hold 1 to {MAX_LONG_LIVED_MATCHES} matches"),
                ));
            }
            for (i, m) in raw.matches.into_iter().enumerate() {
                let at = format!("long_lived.match[{i}]");
                let chosen_by_client =
                    [("host", m.host.is_some()), ("headers", m.headers.is_some())];
                if let Some((field, _)) = chosen_by_client.into_iter().find(|(_, set)| *set) {
                    return Err(ConfigError::at(
                        &format!("{at}.{field}"),
                        "long-lived requests are named by method and path only: a client chooses its headers and how it spells its host, and could take any request out of the pools",
                    ));
                }
                if m.path.is_none() && m.path_prefix.is_none() && m.methods.is_none() {
                    return Err(ConfigError::at(
                        &at,
                        "names every request: set `path`, `path_prefix` or `methods`",
                    ));
                }
                long_lived_matches.push(Match::compile(m, &at)?);
            }
            if load_shedding.is_none() && circuit_breaker.is_none() && idempotency.is_none() {
                return Err(ConfigError::at(
                    "long_lived",
                    "no policy here treats long-lived requests apart (load_shedding, circuit_breaker, idempotency)",
                ));
            }
        }
        let config = Config {
            shared_data: SharedDataSettings::validate(
                shared_data.unwrap_or_default(),
                "shared_data",
            )?,
            rate_limit: rate_limit
                .map(|raw| RateLimitConfig::validate(raw, "rate_limit"))
                .transpose()?,
            circuit_breaker: circuit_breaker
                .map(|raw| CircuitBreakerConfig::validate(raw, "circuit_breaker"))
                .transpose()?,
            load_shedding: load_shedding
                .map(|raw| LoadSheddingConfig::validate(raw, "load_shedding"))
                .transpose()?,
            idempotency: idempotency
                .map(|raw| IdempotencyConfig::validate(raw, "idempotency"))
                .transpose()?,
            long_lived: long_lived_matches,
            decision_header: None,
        };
        let decision_header = decision_header
            .map(|name| config.check_decision_header(&name))
            .transpose()?;
        Ok(Config {
            decision_header,
            ..config
        })
    }

    /// The decision header must be a name of its own: a second value beside a header the
    /// filter or a configured response sets would leave a client to guess which is meant.
    fn check_decision_header(&self, name: &str) -> Result<String, ConfigError> {
        let at = "decision_header";
        let name = check_header_name(name, at)?;
        let configured = self
            .rate_limit
            .iter()
            .map(|c| &c.limited_response)
            .chain(self.load_shedding.iter().map(|c| &c.response))
            .chain(
                self.circuit_breaker
                    .iter()
                    .flat_map(|c| &c.breakers)
                    .map(|b| &b.response),
            )
            .flat_map(|response| &response.headers)
            .map(|(name, _)| name.as_str());
        let taken = POLICY_HEADERS.contains(&name.as_str())
            || RESPONSE_HEADERS_WITH_A_MEANING.contains(&name.as_str())
            || name == REPLAYED_HEADER
            || ["content-", "grpc-", "x-envoy-", "access-control-"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
            || self
                .idempotency
                .as_ref()
                .is_some_and(|c| c.header == name || c.stored_headers.contains(&name));
        if taken || configured.clone().any(|set| set == name) {
            return Err(ConfigError::at(
                at,
                format!("{name:?} is a header the filter, a configured response, HTTP or Envoy already gives a meaning: name one of its own, such as x-resilience-decision"),
            ));
        }
        Ok(name)
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
