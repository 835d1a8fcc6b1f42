//! gRPC as the filter meets it: which requests are gRPC calls, status codes by name, and sets
//! of them. A gRPC call's outcome is its `grpc-status` (in trailers, or in the headers of a
//! trailers-only response), not its `:status`, which is 200 for success and failure alike;
//! and a refusal to a gRPC call is a trailers-only answer whose code a gRPC client acts on.

use crate::config::ConfigError;

/// The canonical status codes, indexed by code (grpc/doc/statuscodes.md).
const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code, 0 (`OK`) to 16 (`UNAUTHENTICATED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcStatus(u8);

impl GrpcStatus {
    pub const OK: GrpcStatus = GrpcStatus(0);
    pub const UNKNOWN: GrpcStatus = GrpcStatus(2);
    pub const INVALID_ARGUMENT: GrpcStatus = GrpcStatus(3);
    pub const DEADLINE_EXCEEDED: GrpcStatus = GrpcStatus(4);
    pub const ALREADY_EXISTS: GrpcStatus = GrpcStatus(6);
    pub const RESOURCE_EXHAUSTED: GrpcStatus = GrpcStatus(8);
    pub const ABORTED: GrpcStatus = GrpcStatus(10);
    pub const INTERNAL: GrpcStatus = GrpcStatus(13);
    pub const UNAVAILABLE: GrpcStatus = GrpcStatus(14);
    pub const DATA_LOSS: GrpcStatus = GrpcStatus(15);
    const UNIMPLEMENTED: GrpcStatus = GrpcStatus(12);
    const PERMISSION_DENIED: GrpcStatus = GrpcStatus(7);
    const UNAUTHENTICATED: GrpcStatus = GrpcStatus(16);

    /// A `grpc-status` value as Envoy reads it: decimal digits naming a code. Anything else
    /// (a sign, bytes that are not text, a code gRPC does not define) is `UNKNOWN`, as gRPC
    /// clients take it.
    pub fn from_header(value: &[u8]) -> GrpcStatus {
        let digits = value.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return GrpcStatus::UNKNOWN;
        }
        let code = digits.iter().fold(0_i64, |code, digit| {
            code.saturating_mul(10)
                .saturating_add(i64::from(digit - b'0'))
        });
        GrpcStatus::from_code(code).unwrap_or(GrpcStatus::UNKNOWN)
    }

    /// The status of a gRPC answer that has none, from its HTTP status: gRPC's mapping, which
    /// Envoy applies too (`response.grpc_status`).
    pub fn from_http(status: u16) -> GrpcStatus {
        match status {
            400 => GrpcStatus::INTERNAL,
            401 => GrpcStatus::UNAUTHENTICATED,
            403 => GrpcStatus::PERMISSION_DENIED,
            404 => GrpcStatus::UNIMPLEMENTED,
            429 | 502 | 503 | 504 => GrpcStatus::UNAVAILABLE,
            _ => GrpcStatus::UNKNOWN,
        }
    }

    /// A code as Envoy reports it (`response.grpc_status`); `None` outside 0..=16.
    pub fn from_code(code: i64) -> Option<GrpcStatus> {
        u8::try_from(code)
            .ok()
            .filter(|&c| usize::from(c) < NAMES.len())
            .map(GrpcStatus)
    }

    /// A code by its canonical name, e.g. `"UNAVAILABLE"`, found at `at` in the configuration.
    pub fn parse(name: &str, at: &str) -> Result<GrpcStatus, ConfigError> {
        NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| u8::try_from(i).ok())
            .map(GrpcStatus)
            .ok_or_else(|| {
                ConfigError::at(
                    at,
                    format!("must be a gRPC status name: {}", NAMES.join(", ")),
                )
            })
    }

    pub fn code(self) -> u8 {
        self.0
    }

    pub fn name(self) -> &'static str {
        NAMES[usize::from(self.0)]
    }

    /// The HTTP status of the same meaning (gRPC's own mapping, as Envoy's
    /// `grpcToHttpStatus`): what the idempotency policy's status rules judge a gRPC call by.
    pub fn http_status(self) -> u16 {
        const HTTP: [u16; 17] = [
            200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401,
        ];
        HTTP[usize::from(self.0)]
    }
}

/// A set of gRPC status codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcStatusSet(u32);

impl GrpcStatusSet {
    pub fn of(statuses: &[GrpcStatus]) -> GrpcStatusSet {
        let mut set = GrpcStatusSet::default();
        statuses.iter().for_each(|s| set.insert(*s));
        set
    }

    pub fn insert(&mut self, status: GrpcStatus) {
        self.0 |= 1 << status.0;
    }

    pub fn contains(self, status: GrpcStatus) -> bool {
        self.0 & (1 << status.0) != 0
    }
}

/// Whether a request with this `content-type` is a gRPC call, as Envoy decides it (and so
/// whether Envoy turns a local reply to it into a trailers-only gRPC answer):
/// `application/grpc`, alone or followed by `+` (`application/grpc+proto`). gRPC-Web
/// requests count once Envoy's `grpc_web` filter, placed before this one, has turned them into
/// gRPC.
pub fn is_grpc(content_type: &[u8]) -> bool {
    content_type
        .strip_prefix(b"application/grpc")
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+')))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn grpc_status_headers_are_read_as_envoy_reads_them() {
        for (value, status) in [
            (&b"14"[..], GrpcStatus::UNAVAILABLE),
            (b"0", GrpcStatus::OK),
            (b" 8 ", GrpcStatus::RESOURCE_EXHAUSTED),
            (b"-0", GrpcStatus::UNKNOWN),
            (b"+0", GrpcStatus::UNKNOWN),
            (b"17", GrpcStatus::UNKNOWN),
            (b"014", GrpcStatus::UNAVAILABLE),
            (b"99999999999999999999999", GrpcStatus::UNKNOWN),
            (b"", GrpcStatus::UNKNOWN),
            (b"1\xff", GrpcStatus::UNKNOWN),
            (b"\xc3\xa9", GrpcStatus::UNKNOWN),
        ] {
            assert_eq!(GrpcStatus::from_header(value), status, "{value:?}");
        }
        assert_eq!(GrpcStatus::from_http(503), GrpcStatus::UNAVAILABLE);
        assert_eq!(GrpcStatus::from_http(429), GrpcStatus::UNAVAILABLE);
        assert_eq!(GrpcStatus::from_http(404), GrpcStatus::UNIMPLEMENTED);
        assert_eq!(GrpcStatus::from_http(200), GrpcStatus::UNKNOWN);
    }

    #[test]
    fn names_and_codes_round_trip() {
        for code in 0..=16 {
            let status = GrpcStatus::from_code(code).unwrap();
            assert_eq!(GrpcStatus::parse(status.name(), "x").unwrap(), status);
            assert_eq!(i64::from(status.code()), code);
        }
        assert_eq!(GrpcStatus::from_code(17), None);
        assert_eq!(GrpcStatus::from_code(-1), None);
        assert_eq!(GrpcStatus::from_code(i64::MAX), None);
        assert_eq!(GrpcStatus::UNAVAILABLE.name(), "UNAVAILABLE");
        assert_eq!(GrpcStatus::OK.http_status(), 200);
        assert_eq!(GrpcStatus::UNAVAILABLE.http_status(), 503);
        assert_eq!(GrpcStatus::INVALID_ARGUMENT.http_status(), 400);
        assert_eq!(GrpcStatus::from_code(16).unwrap().http_status(), 401);
        let err = GrpcStatus::parse("unavailable", "failure.grpc_statuses[0]").unwrap_err();
        assert_eq!(err.path, "failure.grpc_statuses[0]");
        assert!(GrpcStatus::parse("14", "x").is_err());
    }

    #[test]
    fn a_set_holds_exactly_its_members() {
        let set = GrpcStatusSet::of(&[GrpcStatus::UNAVAILABLE, GrpcStatus::DATA_LOSS]);
        for code in 0..=16 {
            let status = GrpcStatus::from_code(code).unwrap();
            assert_eq!(set.contains(status), code == 14 || code == 15, "{code}");
        }
    }

    #[test]
    fn grpc_calls_are_told_by_content_type_as_envoy_does() {
        for yes in [&b"application/grpc"[..], b"application/grpc+proto"] {
            assert!(is_grpc(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"application/grpc-web"[..],
            b"application/grpc-web-text+proto",
            // Envoy's local reply to it is not a gRPC answer.
            b"application/grpc;charset=utf-8",
            b"application/grpcx",
            b"application/json",
            b"",
            b"\xffapplication/grpc",
        ] {
            assert!(!is_grpc(no), "{}", String::from_utf8_lossy(no));
        }
    }
}
