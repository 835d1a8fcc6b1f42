//! What every configuration section shares: the error that names a field, durations written
//! as strings, and the checks on names, header names, methods and ranges.
//!
//! This module is a leaf: each policy validates its own section with these pieces, and the
//! whole document is assembled above the policies, in [`crate::pipeline::config`].

mod duration;
pub mod json;

pub use duration::Duration;

use std::fmt;

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
    pub fn at(path: &str, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// `value` if it lies in `min..=max`, else an error naming the bounds.
pub fn check_range<T: PartialOrd + fmt::Display>(
    value: T,
    min: T,
    max: T,
    at: &str,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        Err(ConfigError::at(
            at,
            format!("must be between {min} and {max}"),
        ))
    } else {
        Ok(value)
    }
}

/// A duration within bounds, written as the operator would write them.
pub fn check_duration(
    value: std::time::Duration,
    min: std::time::Duration,
    max: std::time::Duration,
    at: &str,
) -> Result<std::time::Duration, ConfigError> {
    if value < min || value > max {
        Err(ConfigError::at(
            at,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ))
    } else {
        Ok(value)
    }
}

/// A name that can appear in shared-data keys, metric names and headers.
pub fn check_name(name: &str, at: &str) -> Result<(), ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::at(
            at,
            "must be 1 to 64 letters, digits, `_` or `-`",
        ))
    }
}

/// Upper-cases method names and refuses anything that cannot be one.
pub fn check_methods(methods: Vec<String>, at: &str) -> Result<Vec<String>, ConfigError> {
    methods
        .into_iter()
        .enumerate()
        .map(|(i, method)| {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                Err(ConfigError::at(
                    &format!("{at}[{i}]"),
                    "must be an HTTP method name",
                ))
            } else {
                Ok(method.to_ascii_uppercase())
            }
        })
        .collect()
}

/// Lower-cases a header name and refuses what HTTP does not allow in one.
pub fn check_header_name(name: &str, at: &str) -> Result<String, ConfigError> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if valid {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(ConfigError::at(at, "must be an HTTP header name"))
    }
}

/// A request header a policy reads: a valid name that Envoy passes to filters. Envoy keeps the
/// host in `:authority` and strips hop-by-hop headers, so a rule on one of these would never
/// see it, and silently never apply.
pub fn check_request_header_name(name: &str, at: &str) -> Result<String, ConfigError> {
    let name = check_header_name(name, at)?;
    match name.as_str() {
        "host" => Err(ConfigError::at(
            at,
            "Envoy passes the host as `:authority`: match it with `match.host`",
        )),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
        | "te" => Err(ConfigError::at(
            at,
            format!("Envoy does not pass the hop-by-hop header `{name}` to filters"),
        )),
        _ => Ok(name),
    }
}
