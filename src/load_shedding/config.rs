//! The `load_shedding` section: pools (bulkheads) with caps, priority classes, adaptive limits.

use crate::clock::nanos_saturating;
use crate::config::json::{json_names, json_object};
use crate::config::{check_duration, check_name, check_request_header_name, ConfigError, Duration};
use crate::grpc::GrpcStatus;
use crate::matcher::{Match, RawMatch, RawScope, Scope};
use crate::reply::{RawResponse, Response};
use crate::request::{Cidr, RequestInfo};

#[derive(Debug)]
pub struct RawLoadShedding {
    pub pools: Vec<RawPool>,
    pub priority: Option<RawPriority>,
    pub shed_at: Option<RawShedAt>,
    pub response: Option<RawResponse>,
    pub retry_after: Option<Duration>,
    pub slot_lease: Option<Duration>,
}

json_object!(RawLoadShedding {
    pools: "pools",
    priority: "priority",
    shed_at: "shed_at",
    response: "response",
    retry_after: "retry_after",
    slot_lease: "slot_lease"
});

#[derive(Debug)]
pub struct RawPool {
    pub name: String,
    pub scope: Option<RawScope>,
    pub max_in_flight: u32,
    pub adaptive: Option<RawAdaptive>,
    pub long_lived: Option<LongLived>,
    pub slot_lease: Option<Duration>,
    pub shadow: Option<bool>,
}

json_object!(RawPool {
    name: "name",
    scope: "scope",
    max_in_flight: "max_in_flight",
    adaptive: "adaptive",
    long_lived: "long_lived",
    slot_lease: "slot_lease",
    shadow: "shadow"
});

/// Whether a pool counts long-lived requests (upgrades, `CONNECT`, the streaming RPCs the
/// `long_lived` section names), which hold a slot for their whole life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LongLived {
    /// Not counted, never shed by the pool: a pool of short calls stays a measure of them.
    #[default]
    Exclude,
    /// Counted like any request.
    Include,
    /// Only long-lived requests are counted: a pool that caps open streams.
    Only,
}

json_names!(LongLived {
    Exclude: "exclude",
    Include: "include",
    Only: "only"
});

#[derive(Debug)]
pub struct RawAdaptive {
    pub min_limit: Option<u32>,
    pub sample_interval: Option<Duration>,
    pub min_rtt_window: Option<Duration>,
    pub tolerance: Option<f64>,
}

json_object!(RawAdaptive {
    min_limit: "min_limit",
    sample_interval: "sample_interval",
    min_rtt_window: "min_rtt_window",
    tolerance: "tolerance"
});

#[derive(Debug, Default)]
pub struct RawPriority {
    pub header: Option<String>,
    pub trusted_sources: Option<Vec<String>>,
    pub rules: Option<Vec<RawClassRule>>,
    pub default: Option<Class>,
}

json_object!(RawPriority {
    header: "header",
    trusted_sources: "trusted_sources",
    rules: "rules",
    default: "default"
});

#[derive(Debug)]
pub struct RawClassRule {
    pub matcher: RawMatch,
    pub class: Class,
}

json_object!(RawClassRule {
    matcher: "match",
    class: "class"
});

#[derive(Debug, Default)]
pub struct RawShedAt {
    pub critical: Option<f64>,
    pub high: Option<f64>,
    pub normal: Option<f64>,
    pub low: Option<f64>,
}

json_object!(RawShedAt {
    critical: "critical",
    high: "high",
    normal: "normal",
    low: "low"
});

/// How much a request matters when the pool fills up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Critical,
    High,
    Normal,
    Low,
}

json_names!(Class {
    Critical: "critical",
    High: "high",
    Normal: "normal",
    Low: "low"
});

impl Class {
    pub const ALL: [Class; 4] = [Class::Critical, Class::High, Class::Normal, Class::Low];

    pub fn name(self) -> &'static str {
        match self {
            Class::Critical => "critical",
            Class::High => "high",
            Class::Normal => "normal",
            Class::Low => "low",
        }
    }

    /// A class named in a header value; a value that is not a class name (or not text) is none.
    pub fn parse(value: &[u8]) -> Option<Class> {
        Class::ALL.into_iter().find(|class| {
            class
                .name()
                .as_bytes()
                .eq_ignore_ascii_case(value.trim_ascii())
        })
    }

    /// Position in [`Class::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Adaptive {
    pub min_limit: u32,
    pub sample_interval: std::time::Duration,
    pub min_rtt_window: std::time::Duration,
    pub tolerance: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub scope: Option<Scope>,
    /// The cap; for an adaptive pool, the ceiling and the starting limit.
    pub max_in_flight: u32,
    pub adaptive: Option<Adaptive>,
    pub long_lived: LongLived,
    /// A third of the pool's slot lease: slots are counted by epochs of this length.
    pub epoch_ns: u64,
    /// Dry run: a request the pool would shed goes on, counted as `shadow_shed.<class>`, and
    /// holds no slot in it, so the pool's count stays what enforcing it would make it.
    pub shadow: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoadSheddingConfig {
    pub pools: Vec<PoolConfig>,
    /// Header a trusted source may set the class with.
    pub priority_header: Option<String>,
    pub trusted_sources: Vec<Cidr>,
    pub class_rules: Vec<(Match, Class)>,
    pub default_class: Class,
    /// Per class, in `Class::ALL` order: the share of the limit at which it starts being shed,
    /// in millionths, so thresholds are computed exactly (`0.29` of 100 is 29, not 28).
    pub shed_at: [u32; 4],
    pub response: Response,
    pub retry_after: std::time::Duration,
}

pub const MAX_POOLS: usize = 64;
const DEFAULT_SLOT_LEASE: std::time::Duration = std::time::Duration::from_secs(300);
const MAX_IN_FLIGHT: u32 = 1_000_000;

impl LoadSheddingConfig {
    pub fn validate(raw: RawLoadShedding, at: &str) -> Result<LoadSheddingConfig, ConfigError> {
        if raw.pools.is_empty() || raw.pools.len() > MAX_POOLS {
            return Err(ConfigError::at(
                &format!("{at}.pools"),
                format!("must hold 1 to {MAX_POOLS} pools"),
            ));
        }
        let slot_lease = slot_lease(
            raw.slot_lease,
            DEFAULT_SLOT_LEASE,
            &format!("{at}.slot_lease"),
        )?;
        let mut pools: Vec<PoolConfig> = Vec::new();
        for (i, pool) in raw.pools.into_iter().enumerate() {
            let pool = PoolConfig::validate(pool, slot_lease, &format!("{at}.pools[{i}]"))?;
            if pools.iter().any(|p| p.name == pool.name) {
                return Err(ConfigError::at(
                    &format!("{at}.pools[{i}].name"),
                    "duplicate pool name",
                ));
            }
            pools.push(pool);
        }

        let priority = raw.priority.unwrap_or_default();
        let priority_header = priority
            .header
            .map(|name| check_request_header_name(&name, &format!("{at}.priority.header")))
            .transpose()?;
        let mut trusted_sources = Vec::new();
        for (i, source) in priority
            .trusted_sources
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let cidr = Cidr::parse(source).ok_or_else(|| {
                ConfigError::at(
                    &format!("{at}.priority.trusted_sources[{i}]"),
                    "must be an address or CIDR block, e.g. 10.0.0.0/8",
                )
            })?;
            trusted_sources.push(cidr);
        }
        if priority_header.is_some() && trusted_sources.is_empty() {
            return Err(ConfigError::at(
                &format!("{at}.priority.trusted_sources"),
                "a priority header needs the sources allowed to set it, or any client could promote itself",
            ));
        }
        let mut class_rules = Vec::new();
        for (i, rule) in priority.rules.unwrap_or_default().into_iter().enumerate() {
            class_rules.push((
                Match::compile(rule.matcher, &format!("{at}.priority.rules[{i}].match"))?,
                rule.class,
            ));
        }

        let shed = raw.shed_at.unwrap_or_default();
        let shares = [
            shed.critical.unwrap_or(1.0),
            shed.high.unwrap_or(0.9),
            shed.normal.unwrap_or(0.8),
            shed.low.unwrap_or(0.5),
        ];
        let mut shed_at = [0; 4];
        for ((class, share), millionths) in Class::ALL.iter().zip(shares).zip(&mut shed_at) {
            let field = format!("{at}.shed_at.{}", class.name());
            if !(0.01..=1.0).contains(&share) {
                return Err(ConfigError::at(&field, "must be between 0.01 and 1"));
            }
            let scaled = (share * 1e6).round();
            if (scaled / 1e6 - share).abs() > 1e-12 {
                return Err(ConfigError::at(&field, "may have at most 6 decimal places"));
            }
            *millionths = scaled as u32;
        }
        if shed_at.windows(2).any(|pair| pair[0] < pair[1]) {
            return Err(ConfigError::at(
                &format!("{at}.shed_at"),
                "a less important class may not outlast a more important one",
            ));
        }

        let retry_after = check_duration(
            raw.retry_after
                .map_or(std::time::Duration::from_secs(1), |d| d.0),
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(3600),
            &format!("{at}.retry_after"),
        )?;
        Ok(LoadSheddingConfig {
            pools,
            priority_header,
            trusted_sources,
            class_rules,
            default_class: priority.default.unwrap_or(Class::Normal),
            shed_at,
            response: Response::compile(
                raw.response,
                &format!("{at}.response"),
                503,
                GrpcStatus::UNAVAILABLE,
            )?,
            retry_after,
        })
    }
}

/// A slot lease as written (1 s to 24 h), or `default`.
fn slot_lease(
    raw: Option<Duration>,
    default: std::time::Duration,
    at: &str,
) -> Result<std::time::Duration, ConfigError> {
    check_duration(
        raw.map_or(default, |d| d.0),
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(86_400),
        at,
    )
}

impl PoolConfig {
    /// Whether the request takes a slot in this pool.
    pub fn counts(&self, request: &RequestInfo) -> bool {
        let kind = match self.long_lived {
            LongLived::Exclude => !request.long_lived,
            LongLived::Include => true,
            LongLived::Only => request.long_lived,
        };
        kind && self
            .scope
            .as_ref()
            .is_none_or(|scope| scope.contains(request))
    }

    fn validate(
        raw: RawPool,
        section_lease: std::time::Duration,
        at: &str,
    ) -> Result<PoolConfig, ConfigError> {
        let lease = slot_lease(raw.slot_lease, section_lease, &format!("{at}.slot_lease"))?;
        // Whole nanoseconds: the lease is at least what was written, at most a third longer.
        let epoch_ns = nanos_saturating(lease).div_ceil(super::pool::EPOCHS as u64 - 1);
        check_name(&raw.name, &format!("{at}.name"))?;
        let scope = raw
            .scope
            .map(|s| Scope::compile(s, &format!("{at}.scope")))
            .transpose()?;
        if !(1..=MAX_IN_FLIGHT).contains(&raw.max_in_flight) {
            return Err(ConfigError::at(
                &format!("{at}.max_in_flight"),
                format!("must be between 1 and {MAX_IN_FLIGHT}"),
            ));
        }
        let adaptive = match raw.adaptive {
            None => None,
            Some(a) => {
                let min_limit = a.min_limit.unwrap_or(1);
                if min_limit == 0 || min_limit > raw.max_in_flight {
                    return Err(ConfigError::at(
                        &format!("{at}.adaptive.min_limit"),
                        "must be between 1 and max_in_flight",
                    ));
                }
                let sample_interval = check_duration(
                    a.sample_interval
                        .map_or(std::time::Duration::from_secs(1), |d| d.0),
                    std::time::Duration::from_millis(10),
                    std::time::Duration::from_secs(60),
                    &format!("{at}.adaptive.sample_interval"),
                )?;
                let min_rtt_window = a
                    .min_rtt_window
                    .map_or(std::time::Duration::from_secs(30), |d| d.0);
                if min_rtt_window < sample_interval
                    || min_rtt_window > std::time::Duration::from_secs(3600)
                {
                    return Err(ConfigError::at(
                        &format!("{at}.adaptive.min_rtt_window"),
                        "must be between sample_interval and 1h",
                    ));
                }
                let tolerance = a.tolerance.unwrap_or(1.5);
                if !(1.0..=10.0).contains(&tolerance) {
                    return Err(ConfigError::at(
                        &format!("{at}.adaptive.tolerance"),
                        "must be between 1 and 10",
                    ));
                }
                Some(Adaptive {
                    min_limit,
                    sample_interval,
                    min_rtt_window,
                    tolerance,
                })
            }
        };
        let long_lived = raw.long_lived.unwrap_or_default();
        if long_lived == LongLived::Only && adaptive.is_some() {
            return Err(ConfigError::at(
                &format!("{at}.adaptive"),
                "an adaptive limit learns from latencies, and a pool of long-lived requests has none: set `max_in_flight` alone",
            ));
        }
        Ok(PoolConfig {
            name: raw.name,
            scope,
            max_in_flight: raw.max_in_flight,
            adaptive,
            long_lived,
            epoch_ns,
            shadow: raw.shadow.unwrap_or(false),
        })
    }
}
