//! The `rate_limit` section: rules, each a match, a key and a bucket.

use super::bucket::Bucket;
use crate::clock::ceil_secs;
use crate::config::json::{child, json_names, json_object, misused, variant, FromJson, Json};
use crate::config::{check_name, check_request_header_name, ConfigError, Duration};
use crate::etcd::config::{FleetStore, RawStore};
use crate::grpc::GrpcStatus;
use crate::matcher::{Match, RawMatch};
use crate::reply::{RawResponse, Response};
use crate::store::FailureMode;

#[derive(Debug)]
pub struct RawRateLimit {
    pub rules: Vec<RawRule>,
    pub trusted_hops: Option<u32>,
    pub limited_response: Option<RawResponse>,
    pub headers_on_allowed: Option<bool>,
    pub store: Option<RawStore>,
}

json_object!(RawRateLimit {
    rules: "rules",
    trusted_hops: "trusted_hops",
    limited_response: "limited_response",
    headers_on_allowed: "headers_on_allowed",
    store: "store"
});

#[derive(Debug)]
pub struct RawRule {
    pub name: String,
    pub matcher: Option<RawMatch>,
    pub key: Option<Vec<RawKeyPart>>,
    pub on_missing_key: Option<MissingKey>,
    pub capacity: u64,
    pub refill: RawRefill,
    pub cost: Option<u64>,
    pub table_size: Option<u32>,
    pub shadow: Option<bool>,
    pub global: Option<RawGlobal>,
}

json_object!(RawRule {
    name: "name",
    matcher: "match",
    key: "key",
    on_missing_key: "on_missing_key",
    capacity: "capacity",
    refill: "refill",
    cost: "cost",
    table_size: "table_size",
    shadow: "shadow",
    global: "global"
});

/// `global`: the rule's bucket is one for the whole fleet, kept in the section's `store`.
#[derive(Debug)]
pub struct RawGlobal {
    pub chunk: u64,
}

json_object!(RawGlobal { chunk: "chunk" });

#[derive(Debug)]
pub struct RawRefill {
    pub tokens: u64,
    pub interval: Duration,
}

json_object!(RawRefill {
    tokens: "tokens",
    interval: "interval"
});

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawKeyPart {
    ClientAddress,
    Method,
    Path,
    Header(String),
}

impl FromJson for RawKeyPart {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        const NAMES: &[&str] = &["client_address", "method", "path", "header"];
        match variant(value, at)? {
            (name, None) if name == "client_address" => Ok(RawKeyPart::ClientAddress),
            (name, None) if name == "method" => Ok(RawKeyPart::Method),
            (name, None) if name == "path" => Ok(RawKeyPart::Path),
            (name, Some(header)) if name == "header" => {
                String::from_json(header, &child(at, "header")).map(RawKeyPart::Header)
            }
            (name, inner) => Err(misused(&name, inner.as_ref(), NAMES, at)),
        }
    }
}

/// What a rule does with a request that lacks a part of its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingKey {
    /// The rule does not apply to the request.
    #[default]
    Skip,
    /// All such requests share one bucket, the missing part read as "unknown".
    Shared,
}

json_names!(MissingKey {
    Skip: "skip",
    Shared: "shared"
});

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPart {
    ClientAddress,
    Method,
    Path,
    /// Lower-case header name.
    Header(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub matcher: Match,
    /// Empty: one global bucket.
    pub key: Vec<KeyPart>,
    pub on_missing_key: MissingKey,
    pub bucket: Bucket,
    pub cost: u64,
    pub table_size: u32,
    pub shadow: bool,
    /// This rule's item of the `RateLimit-Policy` header, computed once.
    pub policy_item: String,
    /// `Some`: the bucket is the fleet's, in etcd, taken `chunk` tokens at a time.
    pub global: Option<Global>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Global {
    /// The most tokens one grant takes; also the tokens a grant never takes, see `global.rs`.
    pub chunk: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub rules: Vec<Rule>,
    pub trusted_hops: u32,
    pub limited_response: Response,
    pub headers_on_allowed: bool,
    pub store: Option<FleetStore>,
}

pub const DEFAULT_TABLE_SIZE: u32 = 10_000;
pub const MAX_TABLE_SIZE: u32 = 1 << 20;
pub const MAX_RULES: usize = 64;
const MAX_TRUSTED_HOPS: u32 = 16;

impl RateLimitConfig {
    pub fn validate(raw: RawRateLimit, at: &str) -> Result<RateLimitConfig, ConfigError> {
        if raw.rules.is_empty() || raw.rules.len() > MAX_RULES {
            return Err(ConfigError::at(
                &format!("{at}.rules"),
                format!("must hold 1 to {MAX_RULES} rules"),
            ));
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(raw.rules.len());
        for (i, rule) in raw.rules.into_iter().enumerate() {
            let rule = Rule::validate(rule, &format!("{at}.rules[{i}]"))?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(ConfigError::at(
                    &format!("{at}.rules[{i}].name"),
                    format!("duplicate rule name {:?}", rule.name),
                ));
            }
            rules.push(rule);
        }
        let trusted_hops = raw.trusted_hops.unwrap_or(0);
        if trusted_hops > MAX_TRUSTED_HOPS {
            return Err(ConfigError::at(
                &format!("{at}.trusted_hops"),
                format!("must be at most {MAX_TRUSTED_HOPS}"),
            ));
        }
        let limited_response = Response::compile(
            raw.limited_response,
            &format!("{at}.limited_response"),
            429,
            GrpcStatus::RESOURCE_EXHAUSTED,
        )?;
        let store = raw
            .store
            .map(|store| FleetStore::validate(store, &format!("{at}.store"), FailureMode::Allow))
            .transpose()?;
        match rules.iter().position(|rule| rule.global.is_some()) {
            Some(i) if store.is_none() => {
                return Err(ConfigError::at(
                    &format!("{at}.rules[{i}].global"),
                    format!("needs {at}.store, the etcd that keeps the fleet's buckets"),
                ))
            }
            None if store.is_some() => {
                return Err(ConfigError::at(
                    &format!("{at}.store"),
                    "no rule is global: add `global` to a rule, or remove the store",
                ))
            }
            _ => {}
        }
        Ok(RateLimitConfig {
            rules,
            trusted_hops,
            limited_response,
            headers_on_allowed: raw.headers_on_allowed.unwrap_or(true),
            store,
        })
    }
}

impl Rule {
    fn validate(raw: RawRule, at: &str) -> Result<Rule, ConfigError> {
        check_name(&raw.name, &format!("{at}.name"))?;
        let matcher = Match::compile(raw.matcher.unwrap_or_default(), &format!("{at}.match"))?;
        let mut key = Vec::new();
        for (i, part) in raw.key.unwrap_or_default().into_iter().enumerate() {
            key.push(match part {
                RawKeyPart::ClientAddress => KeyPart::ClientAddress,
                RawKeyPart::Method => KeyPart::Method,
                RawKeyPart::Path => KeyPart::Path,
                RawKeyPart::Header(name) => KeyPart::Header(check_request_header_name(
                    &name,
                    &format!("{at}.key[{i}].header"),
                )?),
            });
        }
        if !(1..=1_000_000_000).contains(&raw.capacity) {
            return Err(ConfigError::at(
                &format!("{at}.capacity"),
                "must be between 1 and 1000000000",
            ));
        }
        if raw.refill.tokens == 0 {
            return Err(ConfigError::at(
                &format!("{at}.refill.tokens"),
                "must be at least 1",
            ));
        }
        let interval = raw.refill.interval.0;
        if interval < std::time::Duration::from_millis(1)
            || interval > std::time::Duration::from_secs(366 * 86_400)
        {
            return Err(ConfigError::at(
                &format!("{at}.refill.interval"),
                "must be between 1ms and 366 days",
            ));
        }
        let bucket = Bucket::new(raw.capacity, raw.refill.tokens, interval).ok_or_else(|| {
            ConfigError::at(
                &format!("{at}.refill"),
                "refills faster than one token per nanosecond",
            )
        })?;
        let cost = raw.cost.unwrap_or(1);
        if cost == 0 || cost > raw.capacity {
            return Err(ConfigError::at(
                &format!("{at}.cost"),
                "must be between 1 and the capacity",
            ));
        }
        let table_size = if key.is_empty() {
            if raw.table_size.is_some_and(|size| size != 1) {
                return Err(ConfigError::at(
                    &format!("{at}.table_size"),
                    "a rule without a key has one global bucket",
                ));
            }
            1
        } else {
            raw.table_size.unwrap_or(DEFAULT_TABLE_SIZE)
        };
        if !(1..=MAX_TABLE_SIZE).contains(&table_size) {
            return Err(ConfigError::at(
                &format!("{at}.table_size"),
                format!("must be between 1 and {MAX_TABLE_SIZE}"),
            ));
        }
        let global = match raw.global {
            None => None,
            Some(global) if (cost..=raw.capacity - cost).contains(&global.chunk) => {
                Some(Global {
                    chunk: global.chunk,
                })
            }
            Some(_) => {
                return Err(ConfigError::at(
                    &format!("{at}.global.chunk"),
                    "must be at least the cost and at most the capacity minus the cost (a grant never takes the bucket's last chunk)",
                ))
            }
        };
        let policy_item = format!(
            "\"{}\";q={};w={}",
            raw.name,
            raw.capacity,
            ceil_secs(bucket.window()).max(1)
        );
        Ok(Rule {
            name: raw.name,
            matcher,
            key,
            on_missing_key: raw.on_missing_key.unwrap_or_default(),
            bucket,
            cost,
            table_size,
            shadow: raw.shadow.unwrap_or(false),
            policy_item,
            global,
        })
    }
}
