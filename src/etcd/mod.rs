//! etcd v3 through its HTTP/JSON gateway (`POST /v3/kv/txn`), as plain bytes in and out: the
//! host sends what this builds to an Envoy cluster and hands back what came back.
//!
//! Every call is one transaction that compares, then writes or reads, so a compare-and-swap
//! is one round trip: "create it if absent, else show it to me", "replace it if nobody changed
//! it since, else show it to me". Keys and values travel base64-encoded; revisions as decimal
//! strings (the gateway's JSON for int64). Fields that are zero or false are absent.

use crate::config::json::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::time::Duration;

/// The gateway's path for transactions.
pub const TXN_PATH: &str = "/v3/kv/txn";

/// A transaction that writes `value` at `key` if the key is as `expected`, and otherwise
/// reads the key as it is.
pub fn swap(key: &[u8], expected: &Expected, value: &[u8]) -> Vec<u8> {
    // Base64 and decimal digits need no escaping: the body is written out, not built as a
    // serde_json::Value (5 KB of the .wasm).
    let key = STANDARD.encode(key);
    let compare = match expected {
        Expected::Absent => {
            format!(r#"{{"key":"{key}","result":"EQUAL","target":"CREATE","create_revision":"0"}}"#)
        }
        Expected::Revision(revision) => format!(
            r#"{{"key":"{key}","result":"EQUAL","target":"MOD","mod_revision":"{revision}"}}"#
        ),
        Expected::Value(value) => format!(
            r#"{{"key":"{key}","result":"EQUAL","target":"VALUE","value":"{}"}}"#,
            STANDARD.encode(value)
        ),
    };
    format!(
        r#"{{"compare":[{compare}],"success":[{{"request_put":{{"key":"{key}","value":"{}"}}}}],"failure":[{{"request_range":{{"key":"{key}"}}}}]}}"#,
        STANDARD.encode(value)
    )
    .into_bytes()
}

/// A call the host makes to the fleet store's cluster: `POST path` with `body`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreCall {
    pub cluster: String,
    pub authority: String,
    pub path: &'static str,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// What a [`swap`] expects to find.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// No key at all.
    Absent,
    /// The key as last written at this revision (its `mod_revision`).
    Revision(i64),
    /// The key holding exactly these bytes (a write whose answer was lost, if it landed).
    Value(Vec<u8>),
}

/// What a [`swap`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Swapped {
    /// The value was written; the key's `mod_revision` is now `revision`.
    Written { revision: i64 },
    /// The key was not as expected. It holds `value`, written at `revision`; or nothing.
    Found(Option<Found>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub value: Vec<u8>,
    pub revision: i64,
}

/// Why an answer is not a transaction's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// No answer: the call failed or timed out.
    NoAnswer,
    /// An HTTP status other than 200 (etcd's error, or Envoy's when no member answered).
    Status(u16),
    /// A body that is not the gateway's JSON for a transaction.
    Malformed,
    /// Every transaction lost its race for the key to another writer.
    Contended,
    /// The host could not send the call at all: nothing of it reached etcd.
    NotSent,
}

/// Reads the answer to a [`swap`]: its HTTP status and body. The gateway's JSON is read
/// leniently (unknown members ignored, as etcd adds them between versions); an absent
/// `succeeded` is false and absent lists are empty, as proto3 JSON leaves out defaults.
pub fn swapped(status: u16, body: &[u8]) -> Result<Swapped, AnswerError> {
    if status != 200 {
        return Err(AnswerError::Status(status));
    }
    let response = Json::parse(body).map_err(|_| AnswerError::Malformed)?;
    let revision = |json: &Json, field: &str| -> Result<i64, AnswerError> {
        json.get(field)
            .and_then(Json::as_str)
            .and_then(|t| t.parse().ok())
            .filter(|r| *r > 0)
            .ok_or(AnswerError::Malformed)
    };
    let header = response.get("header").ok_or(AnswerError::Malformed)?;
    match response.get("succeeded") {
        Some(Json::Bool(true)) => {
            return Ok(Swapped::Written {
                revision: revision(header, "revision")?,
            })
        }
        None | Some(Json::Bool(false)) => {}
        Some(_) => return Err(AnswerError::Malformed),
    }
    let range = list(response.get("responses"))?
        .iter()
        .find_map(|op| op.get("response_range"))
        .ok_or(AnswerError::Malformed)?;
    let Some(kv) = list(range.get("kvs"))?.first() else {
        return Ok(Swapped::Found(None));
    };
    let value = match kv.get("value") {
        None => Vec::new(),
        Some(Json::String(text)) => STANDARD.decode(text).map_err(|_| AnswerError::Malformed)?,
        Some(_) => return Err(AnswerError::Malformed),
    };
    Ok(Swapped::Found(Some(Found {
        value,
        revision: revision(kv, "mod_revision")?,
    })))
}

/// A list member that proto3 JSON leaves out when empty.
fn list(member: Option<&Json>) -> Result<&[Json], AnswerError> {
    match member {
        None => Ok(&[]),
        Some(Json::Array(items)) => Ok(items),
        Some(_) => Err(AnswerError::Malformed),
    }
}

pub mod config;

#[cfg(test)]
pub mod fake;
#[cfg(test)]
mod tests;
