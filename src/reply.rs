//! Every answer the filter gives in place of the upstream's, built in one place: refusals
//! from a policy's configured response, RFC 9457 problems, stored replays, and the answer when
//! shared data fails under `on_error: deny`.

use crate::config::json::{json_object, quote};
use crate::config::{check_header_name, ConfigError};
use crate::decision::Decision;
use crate::grpc::GrpcStatus;
use std::collections::BTreeMap;

/// A local reply: what the host sends with Envoy's `sendLocalReply`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// Lower-case names; values are bytes, since a replay returns what the upstream sent.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Envoy's response code details (`%RESPONSE_CODE_DETAILS%` in access logs): which policy
    /// answered. Never `via_upstream`, so chained instances tell these replies from the
    /// upstream's.
    pub details: &'static str,
    /// How a gRPC call is refused instead; `None` sends the reply as it is (a replay).
    pub grpc: Option<GrpcAnswer>,
    /// Set once the reply is made for a gRPC call ([`Reply::for_grpc_call`]): Envoy answers
    /// trailers-only with this `grpc-status`, and `body` as `grpc-message`.
    pub grpc_status: Option<GrpcStatus>,
    /// Which policy answered, and how: for the decision header and filter state. Boxed, as
    /// a refusal is rare and every `Result<_, Reply>` carries its size.
    pub decision: Box<Decision>,
}

/// A trailers-only gRPC answer: the code a gRPC client acts on (retry policies name
/// `UNAVAILABLE`, not `RESOURCE_EXHAUSTED`), and a message saying which policy refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcAnswer {
    pub status: GrpcStatus,
    pub message: String,
}

/// Where a problem's `type` URI starts; each type is listed in the policy's README.
pub const PROBLEM_TYPE_BASE: &str = "urn:envoy-resilience:";

/// The problem type of draft-ietf-httpapi-ratelimit-headers-10 (section 5.1) for a request
/// refused by a quota, with the refusing rules as `violated-policies`.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Why a policy refused: the problem+json body a refusal gets unless its response configures
/// a `body`, and the `grpc-message` unless it configures one.
pub struct Refusal<'a> {
    /// The full type URI: [`QUOTA_EXCEEDED`], or [`PROBLEM_TYPE_BASE`] and the policy's kind.
    pub problem_type: &'a str,
    pub title: &'a str,
    /// Which policy and rule refused, e.g. `rate limited by rule per-client`.
    pub detail: String,
    /// The rule names, for [`QUOTA_EXCEEDED`].
    pub violated_policies: &'a [&'a str],
    pub decision: Decision,
}

impl Reply {
    /// A policy's refusal as its response configures it, with the policy's own headers first.
    pub fn configured(
        response: &Response,
        own_headers: Vec<(String, String)>,
        details: &'static str,
        refusal: Refusal<'_>,
    ) -> Reply {
        let headers = own_headers
            .into_iter()
            .chain(response.headers.iter().cloned())
            .map(|(name, value)| (name, value.into_bytes()))
            .collect();
        let body = match &response.body {
            Some(body) => body.clone().into_bytes(),
            None => problem_body(
                refusal.problem_type,
                refusal.title,
                response.status,
                &refusal.detail,
                refusal.violated_policies,
            ),
        };
        Reply {
            status: response.status,
            headers,
            body,
            details,
            grpc: Some(GrpcAnswer {
                status: response.grpc_status,
                message: response.grpc_message.clone().unwrap_or(refusal.detail),
            }),
            grpc_status: None,
            decision: Box::new(refusal.decision),
        }
    }

    /// A policy's state could not be read or written (shared data, or etcd for a global
    /// rule) and its failure mode is `deny`: an RFC 9457 problem of type `state-unavailable`.
    /// `policy` is the policy's section name (`rate_limit`).
    pub fn unavailable(policy: &'static str) -> Reply {
        Reply::problem(
            503,
            Refusal {
                problem_type: &format!("{PROBLEM_TYPE_BASE}state-unavailable"),
                title: "State unavailable",
                detail: format!("{} state unavailable", policy.replace('_', " ")),
                violated_policies: &[],
                decision: Decision::new(policy, "state-unavailable"),
            },
            None,
            "resilience_state_unavailable",
            GrpcStatus::UNAVAILABLE,
        )
    }

    /// An RFC 9457 problem as `application/problem+json`, of one of our types
    /// ([`PROBLEM_TYPE_BASE`]); a gRPC call gets the type's last part and the detail.
    pub fn problem(
        status: u16,
        refusal: Refusal<'_>,
        retry_after_secs: Option<u64>,
        details: &'static str,
        grpc_status: GrpcStatus,
    ) -> Reply {
        let kind = refusal
            .problem_type
            .strip_prefix(PROBLEM_TYPE_BASE)
            .unwrap_or(refusal.problem_type);
        let mut headers = vec![(
            "content-type".to_owned(),
            b"application/problem+json".to_vec(),
        )];
        if let Some(seconds) = retry_after_secs {
            headers.push(("retry-after".to_owned(), seconds.to_string().into_bytes()));
        }
        Reply {
            status,
            headers,
            body: problem_body(
                refusal.problem_type,
                refusal.title,
                status,
                &refusal.detail,
                refusal.violated_policies,
            ),
            details,
            grpc: Some(GrpcAnswer {
                status: grpc_status,
                message: format!("{kind}: {}", refusal.detail),
            }),
            grpc_status: None,
            decision: Box::new(refusal.decision),
        }
    }

    /// A stored response, replayed as the upstream sent it, marked with `marker: true`.
    pub fn replay(
        status: u16,
        mut headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        marker: &str,
    ) -> Reply {
        headers.push((marker.to_owned(), b"true".to_vec()));
        Reply {
            status,
            headers,
            body,
            details: "resilience_idempotency_replay",
            grpc: None,
            grpc_status: None,
            decision: Box::new(Decision::new("idempotency", "replayed")),
        }
    }

    /// The reply as a gRPC call gets it: Envoy makes a trailers-only answer of it, with
    /// `grpc-status` and the body as `grpc-message`, and keeps the other headers. The wait of
    /// `Retry-After` becomes `grpc-retry-pushback-ms` (gRFC A6), which gRPC clients honour.
    pub fn for_grpc_call(mut self) -> Reply {
        let Some(grpc) = self.grpc.take() else {
            return self;
        };
        let pushback_ms = self
            .header("retry-after")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            .and_then(|secs| secs.checked_mul(1000))
            // gRFC A6: a pushback that is not a non-negative int32 means "do not retry".
            .map(|ms| ms.min(i32::MAX as u64));
        self.headers
            .retain(|(name, _)| name != "content-type" && name != "content-length");
        if let Some(ms) = pushback_ms {
            self.headers.push((
                "grpc-retry-pushback-ms".to_owned(),
                ms.to_string().into_bytes(),
            ));
        }
        self.body = grpc.message.into_bytes();
        self.grpc_status = Some(grpc.status);
        self
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// An RFC 9457 problem document.
fn problem_body(
    problem_type: &str,
    title: &str,
    status: u16,
    detail: &str,
    violated_policies: &[&str],
) -> Vec<u8> {
    // Written out rather than built as a serde_json::Value, which took 5 KB of the .wasm;
    // members in the order serde_json wrote them (sorted), as the docs show them.
    let mut body = format!(
        "{{\"detail\":{},\"status\":{status},\"title\":{},\"type\":{}",
        quote(detail),
        quote(title),
        quote(problem_type)
    );
    if !violated_policies.is_empty() {
        let names: Vec<String> = violated_policies.iter().map(|name| quote(name)).collect();
        body.push_str(&format!(",\"violated-policies\":[{}]", names.join(",")));
    }
    body.push('}');
    body.into_bytes()
}

#[derive(Debug, Default)]
pub struct RawResponse {
    pub status: Option<u16>,
    pub body: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub grpc_status: Option<String>,
    pub grpc_message: Option<String>,
}

json_object!(RawResponse {
    status: "status",
    body: "body",
    headers: "headers",
    grpc_status: "grpc_status",
    grpc_message: "grpc_message"
});

/// `grpc-message` travels in a header, percent-encoded: kept well under clients' header limits.
const MAX_GRPC_MESSAGE_BYTES: usize = 1024;

/// A policy's configurable refusal: status, body, extra headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// `None`: an RFC 9457 problem saying which policy and rule refused.
    pub body: Option<String>,
    /// Lower-case names; `content-type` is `application/problem+json` for the problem, and
    /// `text/plain` for a configured body, unless configured otherwise.
    pub headers: Vec<(String, String)>,
    /// What a gRPC call gets instead: its code, and its message when configured.
    pub grpc_status: GrpcStatus,
    pub grpc_message: Option<String>,
}

/// The headers policies set on their refusals themselves.
pub const POLICY_HEADERS: [&str; 5] = [
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "x-load-shed",
    "x-circuit-breaker",
];

impl Response {
    /// Validates `raw`, found at `at`, filling in the policy's defaults.
    pub fn compile(
        raw: Option<RawResponse>,
        at: &str,
        status: u16,
        grpc_status: GrpcStatus,
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
            if name.starts_with("grpc-") || name == "content-length" {
                // They would rewrite the gRPC answer (a grpc-status: 0 included).
                return Err(ConfigError::at(&name_at, "is set by the filter"));
            }
            if POLICY_HEADERS.contains(&name.as_str()) {
                // A second value would contradict the real wait or state: RFC 9110 defines one
                // Retry-After, and a client acting on the RateLimit headers needs the true ones.
                return Err(ConfigError::at(
                    &name_at,
                    "is set by the policy itself, with the real wait or state",
                ));
            }
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(ConfigError::at(
                    &name_at,
                    "value must not contain CR, LF or NUL",
                ));
            }
            headers.push((name, value));
        }
        if !headers.iter().any(|(name, _)| name == "content-type") {
            let content_type = match raw.body {
                Some(_) => "text/plain",
                None => "application/problem+json",
            };
            headers.push(("content-type".to_owned(), content_type.to_owned()));
        }
        let grpc_status = match raw.grpc_status {
            Some(name) => GrpcStatus::parse(&name, &format!("{at}.grpc_status"))?,
            None => grpc_status,
        };
        if grpc_status == GrpcStatus::OK {
            // A trailers-only OK to a unary call is an error of its own in every client.
            return Err(ConfigError::at(
                &format!("{at}.grpc_status"),
                "a refusal cannot be OK",
            ));
        }
        if raw
            .grpc_message
            .as_ref()
            .is_some_and(|m| m.len() > MAX_GRPC_MESSAGE_BYTES)
        {
            return Err(ConfigError::at(
                &format!("{at}.grpc_message"),
                format!("must be at most {MAX_GRPC_MESSAGE_BYTES} bytes"),
            ));
        }
        Ok(Response {
            status,
            body: raw.body,
            headers,
            grpc_status,
            grpc_message: raw.grpc_message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_grpc_pushback_is_the_retry_after_wait_and_an_int32() {
        let response = Response::compile(None, "r", 503, GrpcStatus::UNAVAILABLE).unwrap();
        let pushback = |retry_after: &str| {
            let own = vec![("retry-after".to_owned(), retry_after.to_owned())];
            let refusal = Refusal {
                problem_type: QUOTA_EXCEEDED,
                title: "t",
                detail: "m".to_owned(),
                violated_policies: &[],
                decision: Decision::new("rate_limit", "limited"),
            };
            let reply = Reply::configured(&response, own, "d", refusal).for_grpc_call();
            reply
                .header("grpc-retry-pushback-ms")
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(pushback("30").as_deref(), Some("30000"));
        assert_eq!(pushback("2147484").as_deref(), Some("2147483647"));
        assert_eq!(pushback("18446744073709551615").as_deref(), None);
        assert_eq!(pushback("soon"), None);
    }
}
