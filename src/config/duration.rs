//! Durations written as strings, as operators write them in Envoy YAML: `"250ms"`, `"30s"`, `"24h"`.

use super::json::{FromJson, Json};
use super::ConfigError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl FromJson for Duration {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        let Json::String(text) = value else {
            return Err(value.expected(
                "a duration string such as \"250ms\", \"30s\" or \"24h\"",
                at,
            ));
        };
        humantime::parse_duration(&text)
            .map(Duration)
            .map_err(|err| ConfigError::at(at, format!("invalid duration {text:?}: {err}")))
    }
}
