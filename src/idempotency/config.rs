//! The `idempotency` section.

use crate::config::json::{child, json_names, json_object, misused, variant, FromJson, Json};
use crate::config::{
    check_duration, check_header_name, check_methods, check_request_header_name, ConfigError,
    Duration,
};
use crate::etcd::config::{FleetStore, RawStore};
use crate::matcher::{Match, RawMatch};
use crate::store::FailureMode;

#[derive(Debug, Default)]
pub struct RawIdempotency {
    pub matcher: Option<RawMatch>,
    pub methods: Option<Vec<String>>,
    pub header: Option<String>,
    pub required: Option<bool>,
    pub max_key_length: Option<usize>,
    pub identity: Option<Vec<RawIdentityPart>>,
    pub max_body_bytes: Option<usize>,
    pub on_large_body: Option<Overflow>,
    pub body_timeout: Option<Duration>,
    pub lease: Option<Duration>,
    pub ttl: Option<Duration>,
    pub client_error_ttl: Option<Duration>,
    pub server_error_ttl: Option<Duration>,
    pub released_statuses: Option<Vec<u16>>,
    pub stored_headers: Option<Vec<String>>,
    pub max_response_bytes: Option<usize>,
    pub records: Option<u32>,
    pub when_full: Option<Overflow>,
    pub store: Option<RawStore>,
    pub shadow: Option<bool>,
}

json_object!(RawIdempotency {
    matcher: "match",
    methods: "methods",
    header: "header",
    required: "required",
    max_key_length: "max_key_length",
    identity: "identity",
    max_body_bytes: "max_body_bytes",
    on_large_body: "on_large_body",
    body_timeout: "body_timeout",
    lease: "lease",
    ttl: "ttl",
    client_error_ttl: "client_error_ttl",
    server_error_ttl: "server_error_ttl",
    released_statuses: "released_statuses",
    stored_headers: "stored_headers",
    max_response_bytes: "max_response_bytes",
    records: "records",
    when_full: "when_full",
    store: "store",
    shadow: "shadow"
});

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawIdentityPart {
    ClientAddress,
    Header(String),
}

impl FromJson for RawIdentityPart {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        const NAMES: &[&str] = &["client_address", "header"];
        match variant(value, at)? {
            (name, None) if name == "client_address" => Ok(RawIdentityPart::ClientAddress),
            (name, Some(header)) if name == "header" => {
                String::from_json(header, &child(at, "header")).map(RawIdentityPart::Header)
            }
            (name, inner) => Err(misused(&name, inner.as_ref(), NAMES, at)),
        }
    }
}

/// What happens to a request the policy cannot protect (body too large, table full).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse it (413 for a large body, 503 for a full table).
    Reject,
    /// Let it through unprotected.
    Pass,
}

json_names!(Overflow {
    Reject: "reject",
    Pass: "pass"
});

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityPart {
    ClientAddress,
    /// Lower-case header name; its value is hashed, never stored.
    Header(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyConfig {
    pub matcher: Match,
    /// Upper-case.
    pub methods: Vec<String>,
    /// Lower-case.
    pub header: String,
    pub required: bool,
    pub max_key_length: usize,
    pub identity: Vec<IdentityPart>,
    pub max_body_bytes: usize,
    pub on_large_body: Overflow,
    /// How long a request may take to send its body; then it is answered 408, never forwarded.
    pub body_timeout: std::time::Duration,
    pub lease: std::time::Duration,
    pub ttl: std::time::Duration,
    pub client_error_ttl: std::time::Duration,
    /// `None`: a 5xx releases the key.
    pub server_error_ttl: Option<std::time::Duration>,
    /// 4xx answers that say the request was not executed: they free the key, so the client's
    /// retry executes, instead of replaying "not executed" for `client_error_ttl`.
    pub released_statuses: Vec<u16>,
    /// Lower-case.
    pub stored_headers: Vec<String>,
    /// The most a stored response may take: its stored headers (names, values and 4 bytes of
    /// framing each) and its body.
    pub max_response_bytes: usize,
    pub records: u32,
    pub when_full: Overflow,
    /// `None`: this Envoy's shared data is the only tier.
    pub store: Option<FleetStore>,
    /// Dry run: keys are claimed and responses stored as when enforcing, but a request the
    /// policy would answer itself (a replay, a conflict, a bad key) goes on to the upstream
    /// instead, without a claim.
    pub shadow: bool,
}

const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
pub const MAX_BODY_BYTES: usize = 8 << 20;
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
pub const MAX_RECORDS: u32 = 1 << 20;
/// Answers that mean "not executed": timed out before it started (408), conflict (409),
/// too early (425), too many requests (429). A replay of them would refuse the retry they
/// invite.
const DEFAULT_RELEASED_STATUSES: [u16; 4] = [408, 409, 425, 429];
/// The most shared-data memory the records may take, stored responses included.
pub const MAX_STORAGE_BYTES: u64 = 1 << 30;
/// What a record costs beyond its stored response, at most: its fixed fields
/// ([`super::record::RECORD_FIXED_BYTES`]), its shared-data key, and Envoy's own bookkeeping
/// for one entry.
pub const RECORD_OVERHEAD_BYTES: u64 = 4096;
/// How often each VM checks body deadlines, and so the shortest `body_timeout` it can keep.
pub const BODY_TIMER: std::time::Duration = std::time::Duration::from_millis(100);
pub const MAX_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl IdempotencyConfig {
    pub fn validate(raw: RawIdempotency, at: &str) -> Result<IdempotencyConfig, ConfigError> {
        let matcher = Match::compile(raw.matcher.unwrap_or_default(), &format!("{at}.match"))?;
        let methods = check_methods(
            raw.methods
                .unwrap_or_else(|| vec!["POST".into(), "PATCH".into()]),
            &format!("{at}.methods"),
        )?;
        let header = check_request_header_name(
            raw.header.as_deref().unwrap_or("idempotency-key"),
            &format!("{at}.header"),
        )?;
        let max_key_length = raw.max_key_length.unwrap_or(255);
        if !(1..=1024).contains(&max_key_length) {
            return Err(ConfigError::at(
                &format!("{at}.max_key_length"),
                "must be between 1 and 1024",
            ));
        }
        let raw_identity = raw.identity.unwrap_or_else(|| {
            vec![
                RawIdentityPart::Header("authorization".into()),
                RawIdentityPart::ClientAddress,
            ]
        });
        if raw_identity.is_empty() {
            return Err(ConfigError::at(
                &format!("{at}.identity"),
                "needs at least one part, or clients would share keys",
            ));
        }
        let mut identity = Vec::new();
        for (i, part) in raw_identity.into_iter().enumerate() {
            identity.push(match part {
                RawIdentityPart::ClientAddress => IdentityPart::ClientAddress,
                RawIdentityPart::Header(name) => IdentityPart::Header(check_request_header_name(
                    &name,
                    &format!("{at}.identity[{i}].header"),
                )?),
            });
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(64 << 10);
        if max_body_bytes > MAX_BODY_BYTES {
            return Err(ConfigError::at(
                &format!("{at}.max_body_bytes"),
                format!("must be at most {MAX_BODY_BYTES}"),
            ));
        }
        let duration = |d: Option<Duration>, default: std::time::Duration, name: &str| {
            let d = d.map_or(default, |d| d.0);
            if d < std::time::Duration::from_millis(1) || d > 30 * DAY {
                Err(ConfigError::at(
                    &format!("{at}.{name}"),
                    "must be between 1ms and 30 days",
                ))
            } else {
                Ok(d)
            }
        };
        let body_timeout = check_duration(
            raw.body_timeout
                .map_or(std::time::Duration::from_secs(10), |d| d.0),
            BODY_TIMER,
            MAX_BODY_TIMEOUT,
            &format!("{at}.body_timeout"),
        )?;
        let lease = duration(raw.lease, std::time::Duration::from_secs(30), "lease")?;
        let ttl = duration(raw.ttl, DAY, "ttl")?;
        let client_error_ttl = duration(
            raw.client_error_ttl,
            std::time::Duration::from_secs(600),
            "client_error_ttl",
        )?;
        let server_error_ttl = raw
            .server_error_ttl
            .map(|d| duration(Some(d), d.0, "server_error_ttl"))
            .transpose()?;
        let mut released_statuses = Vec::new();
        for (i, status) in raw
            .released_statuses
            .unwrap_or_else(|| DEFAULT_RELEASED_STATUSES.to_vec())
            .into_iter()
            .enumerate()
        {
            if !(400..=499).contains(&status) {
                return Err(ConfigError::at(
                    &format!("{at}.released_statuses[{i}]"),
                    "must be a 4xx status (5xx follow server_error_ttl)",
                ));
            }
            released_statuses.push(status);
        }
        let mut stored_headers = Vec::new();
        let default_headers = [
            "content-type",
            "content-language",
            "location",
            "etag",
            "last-modified",
            "cache-control",
            "retry-after",
        ];
        for (i, name) in raw
            .stored_headers
            .unwrap_or_else(|| default_headers.map(String::from).to_vec())
            .iter()
            .enumerate()
        {
            stored_headers.push(check_header_name(
                name,
                &format!("{at}.stored_headers[{i}]"),
            )?);
        }
        let max_response_bytes = raw.max_response_bytes.unwrap_or(16 << 10);
        if max_response_bytes > MAX_RESPONSE_BYTES {
            return Err(ConfigError::at(
                &format!("{at}.max_response_bytes"),
                format!("must be at most {MAX_RESPONSE_BYTES}"),
            ));
        }
        let records = raw.records.unwrap_or(4096);
        if !(1..=MAX_RECORDS).contains(&records) {
            return Err(ConfigError::at(
                &format!("{at}.records"),
                format!("must be between 1 and {MAX_RECORDS}"),
            ));
        }
        let budget = u64::from(records) * (max_response_bytes as u64 + RECORD_OVERHEAD_BYTES);
        if budget > MAX_STORAGE_BYTES {
            return Err(ConfigError::at(
                &format!("{at}.records"),
                format!("records x (max_response_bytes + 4096) is {budget} bytes, over the 1 GiB budget"),
            ));
        }
        let store = raw
            .store
            .map(|store| FleetStore::validate(store, &format!("{at}.store"), FailureMode::Deny))
            .transpose()?;
        if let Some(store) = &store {
            // A fleet record must outlive the transactions that write it, or a duplicate on
            // another Envoy could take over a claim etcd has not even acknowledged.
            let least = (2 * store.timeout).max(std::time::Duration::from_secs(1));
            if lease < least {
                return Err(ConfigError::at(
                    &format!("{at}.lease"),
                    format!(
                        "must be at least {} with a store (twice its timeout, and 1s)",
                        humantime::format_duration(least)
                    ),
                ));
            }
        }
        Ok(IdempotencyConfig {
            matcher,
            methods,
            header,
            required: raw.required.unwrap_or(false),
            max_key_length,
            identity,
            max_body_bytes,
            on_large_body: raw.on_large_body.unwrap_or(Overflow::Reject),
            body_timeout,
            lease,
            ttl,
            client_error_ttl,
            server_error_ttl,
            released_statuses,
            stored_headers,
            max_response_bytes,
            records,
            when_full: raw.when_full.unwrap_or(Overflow::Reject),
            store,
            shadow: raw.shadow.unwrap_or(false),
        })
    }

    /// How long a response with `status` is kept; `None`: not kept, the key is released.
    pub fn keep_for(&self, status: u16) -> Option<std::time::Duration> {
        match status {
            500.. => self.server_error_ttl,
            status if self.released_statuses.contains(&status) => None,
            400..=499 => Some(self.client_error_ttl),
            _ => Some(self.ttl),
        }
    }
}
