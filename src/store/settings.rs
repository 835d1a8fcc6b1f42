//! The `shared_data` section: how policies use the store, and what they do when it fails.

use crate::config::json::{json_names, json_object};
use crate::config::ConfigError;

#[derive(Debug, Default)]
pub struct RawSharedData {
    pub on_error: Option<FailureMode>,
    pub max_attempts: Option<u32>,
}

json_object!(RawSharedData {
    on_error: "on_error",
    max_attempts: "max_attempts"
});

/// What a policy does when shared data cannot give an answer (a host error, or every
/// compare-and-swap attempt lost to other workers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Let the request through unprotected (fail open).
    #[default]
    Allow,
    /// Refuse the request (fail closed).
    Deny,
}

json_names!(FailureMode {
    Allow: "allow",
    Deny: "deny"
});

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedDataSettings {
    pub on_error: FailureMode,
    /// Compare-and-swap attempts an admission makes before it counts as a store failure.
    pub max_attempts: u32,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
pub const MAX_ATTEMPTS_RANGE: std::ops::RangeInclusive<u32> = 1..=64;

impl SharedDataSettings {
    pub fn validate(raw: RawSharedData, at: &str) -> Result<SharedDataSettings, ConfigError> {
        let max_attempts = raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !MAX_ATTEMPTS_RANGE.contains(&max_attempts) {
            return Err(ConfigError::at(
                &format!("{at}.max_attempts"),
                format!(
                    "must be between {} and {}, got {max_attempts}",
                    MAX_ATTEMPTS_RANGE.start(),
                    MAX_ATTEMPTS_RANGE.end()
                ),
            ));
        }
        Ok(SharedDataSettings {
            on_error: raw.on_error.unwrap_or_default(),
            max_attempts,
        })
    }
}

impl Default for SharedDataSettings {
    fn default() -> Self {
        SharedDataSettings {
            on_error: FailureMode::Allow,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }
}
