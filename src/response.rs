//! The configurable local reply every policy refuses with: status, body, extra headers.

use crate::config::ConfigError;
use crate::matcher::check_header_name;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponse {
    pub status: Option<u16>,
    pub body: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// Lower-case names; `content-type: text/plain` unless configured otherwise.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// Validates `raw`, found at `at`, filling in the policy's defaults.
    pub fn compile(
        raw: Option<RawResponse>,
        at: &str,
        status: u16,
        body: &str,
    ) -> Result<Response, ConfigError> {
        let raw = raw.unwrap_or_default();
        let status = raw.status.unwrap_or(status);
        if !(400..=599).contains(&status) {
            return Err(ConfigError::at(
                &format!("{at}.status"),
                "must be a 4xx or 5xx status",
            ));
        }
        let mut headers = Vec::new();
        for (name, value) in raw.headers.unwrap_or_default() {
            let name_at = format!("{at}.headers.{name}");
            let name = check_header_name(&name, &name_at)?;
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(ConfigError::at(
                    &name_at,
                    "value must not contain CR, LF or NUL",
                ));
            }
            headers.push((name, value));
        }
        if !headers.iter().any(|(name, _)| name == "content-type") {
            headers.push(("content-type".to_owned(), "text/plain".to_owned()));
        }
        Ok(Response {
            status,
            body: raw.body.unwrap_or_else(|| body.to_owned()),
            headers,
        })
    }

    /// The headers of one refusal: the policy's own first, then the configured ones.
    pub fn headers_with(&self, own: Vec<(String, String)>) -> Vec<(String, String)> {
        let mut headers = own;
        headers.extend(self.headers.iter().cloned());
        headers
    }
}
