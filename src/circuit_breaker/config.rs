//! The `circuit_breaker` section: named breakers, each with a scope, a failure definition,
//! trip conditions, an open duration and a half-open probe budget.

use super::window::{WindowSpec, MAX_CALLS, TIME_BUCKETS};
use crate::clock::nanos_saturating;
use crate::config::json::{child, json_object, misused, variant, FromJson, Json};
use crate::config::{check_name, check_range as range, ConfigError, Duration};
use crate::grpc::{GrpcStatus, GrpcStatusSet};
use crate::matcher::{RawScope, Scope};
use crate::reply::{RawResponse, Response};

#[derive(Debug)]
pub struct RawCircuitBreaker {
    pub breakers: Vec<RawBreaker>,
}

json_object!(RawCircuitBreaker {
    breakers: "breakers"
});

#[derive(Debug)]
pub struct RawBreaker {
    pub name: String,
    pub scope: RawScope,
    pub failure: Option<RawFailure>,
    pub trip: RawTrip,
    pub open: Option<RawOpen>,
    pub half_open: Option<RawHalfOpen>,
    pub response: Option<RawResponse>,
    pub long_lived: Option<RawBreakerLongLived>,
    pub shadow: Option<bool>,
}

json_object!(RawBreaker {
    name: "name",
    scope: "scope",
    failure: "failure",
    trip: "trip",
    open: "open",
    half_open: "half_open",
    response: "response",
    long_lived: "long_lived",
    shadow: "shadow"
});

#[derive(Debug, Default)]
pub struct RawBreakerLongLived {
    pub counted: Option<bool>,
    pub slow_call: Option<Duration>,
}

json_object!(RawBreakerLongLived {
    counted: "counted",
    slow_call: "slow_call"
});

#[derive(Debug, Default)]
pub struct RawFailure {
    pub statuses: Option<Vec<RawStatus>>,
    pub grpc_statuses: Option<Vec<String>>,
    pub local_failures: Option<bool>,
    pub slow_call: Option<Duration>,
}

json_object!(RawFailure {
    statuses: "statuses",
    grpc_statuses: "grpc_statuses",
    local_failures: "local_failures",
    slow_call: "slow_call"
});

/// A status, or a class such as `"5xx"`.
#[derive(Debug)]
pub enum RawStatus {
    Code(u16),
    Class(String),
}

impl FromJson for RawStatus {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        match value {
            Json::String(class) => Ok(RawStatus::Class(class)),
            code => u16::from_json(code, at).map(RawStatus::Code),
        }
    }
}

#[derive(Debug)]
pub struct RawTrip {
    pub consecutive_failures: Option<u32>,
    pub failure_rate_percent: Option<u8>,
    pub slow_call_rate_percent: Option<u8>,
    pub minimum_calls: Option<u32>,
    pub window: Option<RawWindow>,
}

json_object!(RawTrip {
    consecutive_failures: "consecutive_failures",
    failure_rate_percent: "failure_rate_percent",
    slow_call_rate_percent: "slow_call_rate_percent",
    minimum_calls: "minimum_calls",
    window: "window"
});

#[derive(Debug)]
pub enum RawWindow {
    Calls(u16),
    Duration(Duration),
}

impl FromJson for RawWindow {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        const NAMES: &[&str] = &["calls", "duration"];
        match variant(value, at)? {
            (name, Some(calls)) if name == "calls" => {
                u16::from_json(calls, &child(at, "calls")).map(RawWindow::Calls)
            }
            (name, Some(duration)) if name == "duration" => {
                Duration::from_json(duration, &child(at, "duration")).map(RawWindow::Duration)
            }
            (name, inner) => Err(misused(&name, inner.as_ref(), NAMES, at)),
        }
    }
}

#[derive(Debug, Default)]
pub struct RawOpen {
    pub duration: Option<Duration>,
    pub backoff_multiplier: Option<f64>,
    pub max_duration: Option<Duration>,
}

json_object!(RawOpen {
    duration: "duration",
    backoff_multiplier: "backoff_multiplier",
    max_duration: "max_duration"
});

#[derive(Debug, Default)]
pub struct RawHalfOpen {
    pub max_probes: Option<u32>,
    pub successes_to_close: Option<u32>,
    pub probe_timeout: Option<Duration>,
}

json_object!(RawHalfOpen {
    max_probes: "max_probes",
    successes_to_close: "successes_to_close",
    probe_timeout: "probe_timeout"
});

/// Which response statuses count as failures: one bit per status 0..=639.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    fn insert(&mut self, status: u16) {
        let i = usize::from(status);
        if let Some(word) = self.0.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
    }

    pub fn contains(&self, status: u16) -> bool {
        let i = usize::from(status);
        self.0
            .get(i / 64)
            .is_some_and(|word| word & (1 << (i % 64)) != 0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    pub name: String,
    pub scope: Scope,
    pub failure_statuses: StatusSet,
    /// A gRPC call's outcome is its `grpc-status`, judged by this set instead.
    pub failure_grpc_statuses: GrpcStatusSet,
    pub local_failures: bool,
    pub slow_call: Option<std::time::Duration>,
    pub consecutive_failures: Option<u32>,
    pub failure_rate_percent: Option<u8>,
    pub slow_call_rate_percent: Option<u8>,
    pub minimum_calls: u32,
    pub window: WindowSpec,
    pub open_duration: std::time::Duration,
    pub backoff_multiplier: f64,
    pub max_open_duration: std::time::Duration,
    pub max_probes: u32,
    pub successes_to_close: u32,
    /// How long probe slots may stay taken before they are presumed lost.
    pub probe_timeout: std::time::Duration,
    pub response: Response,
    /// Whether long-lived requests count: each is judged once, when its response headers
    /// arrive (a stream that started is a success), not when it ends.
    pub long_lived_counted: bool,
    /// A long-lived request whose response headers took longer than this is slow; without
    /// it, none is.
    pub long_lived_slow_call: Option<std::time::Duration>,
    /// Dry run: the breaker opens, probes and closes as it would, but lets through what it
    /// would refuse (counted as `shadow_rejected`, never as calls it judged).
    pub shadow: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CircuitBreakerConfig {
    pub breakers: Vec<BreakerConfig>,
}

pub const MAX_BREAKERS: usize = 64;

/// The gRPC codes that say the server failed, not the call: as the HTTP 5xx are.
const DEFAULT_FAILURE_GRPC_STATUSES: [GrpcStatus; 5] = [
    GrpcStatus::UNAVAILABLE,
    GrpcStatus::DEADLINE_EXCEEDED,
    GrpcStatus::INTERNAL,
    GrpcStatus::UNKNOWN,
    GrpcStatus::DATA_LOSS,
];

impl CircuitBreakerConfig {
    pub fn validate(raw: RawCircuitBreaker, at: &str) -> Result<CircuitBreakerConfig, ConfigError> {
        if raw.breakers.is_empty() || raw.breakers.len() > MAX_BREAKERS {
            return Err(ConfigError::at(
                &format!("{at}.breakers"),
                format!("must hold 1 to {MAX_BREAKERS} breakers"),
            ));
        }
        let mut breakers: Vec<BreakerConfig> = Vec::new();
        for (i, raw) in raw.breakers.into_iter().enumerate() {
            let breaker = BreakerConfig::validate(raw, &format!("{at}.breakers[{i}]"))?;
            if breakers.iter().any(|b| b.name == breaker.name) {
                return Err(ConfigError::at(
                    &format!("{at}.breakers[{i}].name"),
                    "duplicate breaker name",
                ));
            }
            breakers.push(breaker);
        }
        Ok(CircuitBreakerConfig { breakers })
    }
}

impl BreakerConfig {
    fn validate(raw: RawBreaker, at: &str) -> Result<BreakerConfig, ConfigError> {
        check_name(&raw.name, &format!("{at}.name"))?;
        let scope = Scope::compile(raw.scope, &format!("{at}.scope"))?;

        let failure = raw.failure.unwrap_or_default();
        let mut failure_statuses = StatusSet([0; 10]);
        for (i, status) in failure
            .statuses
            .unwrap_or_else(|| vec![RawStatus::Class("5xx".into())])
            .into_iter()
            .enumerate()
        {
            let status_at = format!("{at}.failure.statuses[{i}]");
            match status {
                RawStatus::Code(code) => {
                    failure_statuses.insert(range(code, 100, 599, &status_at)?)
                }
                RawStatus::Class(class) => {
                    let first = match class.as_str() {
                        "4xx" => 400,
                        "5xx" => 500,
                        _ => {
                            return Err(ConfigError::at(
                                &status_at,
                                "must be a status (100-599), \"4xx\" or \"5xx\"",
                            ))
                        }
                    };
                    (first..first + 100).for_each(|code| failure_statuses.insert(code));
                }
            }
        }
        let failure_grpc_statuses = match failure.grpc_statuses {
            None => GrpcStatusSet::of(&DEFAULT_FAILURE_GRPC_STATUSES),
            Some(names) => {
                let mut set = GrpcStatusSet::default();
                for (i, name) in names.iter().enumerate() {
                    let status_at = format!("{at}.failure.grpc_statuses[{i}]");
                    set.insert(GrpcStatus::parse(name, &status_at)?);
                }
                set
            }
        };
        let slow_call = failure.slow_call.map(|d| d.0);
        if slow_call.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::at(
                &format!("{at}.failure.slow_call"),
                "must be longer than zero",
            ));
        }
        let long_lived = raw.long_lived.unwrap_or_default();
        let long_lived_counted = long_lived.counted.unwrap_or(true);
        let long_lived_slow_call = long_lived.slow_call.map(|d| d.0);
        let slow_at = format!("{at}.long_lived.slow_call");
        if long_lived_slow_call.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::at(&slow_at, "must be longer than zero"));
        }
        if long_lived_slow_call.is_some() && !long_lived_counted {
            return Err(ConfigError::at(
                &slow_at,
                "long-lived requests are not counted (`counted: false`)",
            ));
        }

        let trip = raw.trip;
        let trip_at = format!("{at}.trip");
        let consecutive_failures = trip
            .consecutive_failures
            .map(|n| range(n, 1, 1_000_000, &format!("{trip_at}.consecutive_failures")))
            .transpose()?;
        let failure_rate_percent = trip
            .failure_rate_percent
            .map(|p| range(p, 1, 100, &format!("{trip_at}.failure_rate_percent")))
            .transpose()?;
        let slow_call_rate_percent = trip
            .slow_call_rate_percent
            .map(|p| range(p, 1, 100, &format!("{trip_at}.slow_call_rate_percent")))
            .transpose()?;
        if slow_call_rate_percent.is_some() && slow_call.is_none() && long_lived_slow_call.is_none()
        {
            return Err(ConfigError::at(
                &format!("{trip_at}.slow_call_rate_percent"),
                "needs `failure.slow_call` or `long_lived.slow_call`",
            ));
        }
        if long_lived_slow_call.is_some() && slow_call_rate_percent.is_none() {
            return Err(ConfigError::at(
                &format!("{at}.long_lived.slow_call"),
                "needs `trip.slow_call_rate_percent`, or slow calls trip nothing",
            ));
        }
        let rates = failure_rate_percent.is_some() || slow_call_rate_percent.is_some();
        if consecutive_failures.is_none() && !rates {
            return Err(ConfigError::at(
                &trip_at,
                "set `consecutive_failures`, `failure_rate_percent` or `slow_call_rate_percent`",
            ));
        }
        let window = match (trip.window, rates) {
            (None, false) => WindowSpec::None,
            (Some(_), false) => {
                return Err(ConfigError::at(
                    &format!("{trip_at}.window"),
                    "only rates use a window",
                ));
            }
            (None, true) => {
                return Err(ConfigError::at(
                    &format!("{trip_at}.window"),
                    "rates need a window",
                ))
            }
            (Some(RawWindow::Calls(calls)), true) => WindowSpec::Calls(range(
                calls,
                1,
                MAX_CALLS,
                &format!("{trip_at}.window.calls"),
            )?),
            (Some(RawWindow::Duration(span)), true) => {
                let (min, max) = (
                    std::time::Duration::from_secs(1),
                    std::time::Duration::from_secs(3600),
                );
                if span.0 < min || span.0 > max {
                    return Err(ConfigError::at(
                        &format!("{trip_at}.window.duration"),
                        "must be between 1s and 1h",
                    ));
                }
                WindowSpec::Time {
                    bucket_ns: nanos_saturating(span.0) / TIME_BUCKETS as u64,
                }
            }
        };
        let minimum_calls = match trip.minimum_calls {
            Some(n) if !rates => {
                return Err(ConfigError::at(
                    &format!("{trip_at}.minimum_calls"),
                    format!("only rates use it, got {n}"),
                ));
            }
            Some(n) => range(n, 1, 1_000_000, &format!("{trip_at}.minimum_calls"))?,
            None => 10,
        };
        if let (WindowSpec::Calls(calls), true) = (window, rates) {
            if minimum_calls > u32::from(calls) {
                return Err(ConfigError::at(
                    &format!("{trip_at}.minimum_calls"),
                    "must not exceed the window's calls",
                ));
            }
        }

        let open = raw.open.unwrap_or_default();
        let seconds = |d: Option<Duration>, default: u64| {
            d.map_or(std::time::Duration::from_secs(default), |d| d.0)
        };
        let day = std::time::Duration::from_secs(86_400);
        let open_duration = seconds(open.duration, 30);
        if open_duration < std::time::Duration::from_millis(1) || open_duration > day {
            return Err(ConfigError::at(
                &format!("{at}.open.duration"),
                "must be between 1ms and 24h",
            ));
        }
        let backoff_multiplier = open.backoff_multiplier.unwrap_or(1.0);
        if !(1.0..=10.0).contains(&backoff_multiplier) {
            return Err(ConfigError::at(
                &format!("{at}.open.backoff_multiplier"),
                "must be between 1 and 10",
            ));
        }
        // Without a cap the backoff may grow to the longest open duration allowed.
        let max_open_duration = open.max_duration.map_or(day, |d| d.0);
        if max_open_duration < open_duration || max_open_duration > day {
            return Err(ConfigError::at(
                &format!("{at}.open.max_duration"),
                "must be between `open.duration` and 24h",
            ));
        }

        let half_open = raw.half_open.unwrap_or_default();
        let max_probes = range(
            half_open.max_probes.unwrap_or(1),
            1,
            1000,
            &format!("{at}.half_open.max_probes"),
        )?;
        let successes_to_close = range(
            half_open.successes_to_close.unwrap_or(max_probes),
            1,
            1000,
            &format!("{at}.half_open.successes_to_close"),
        )?;

        let probe_timeout = half_open
            .probe_timeout
            .map_or(std::time::Duration::from_secs(60), |d| d.0);
        if probe_timeout < std::time::Duration::from_millis(1) || probe_timeout > day {
            return Err(ConfigError::at(
                &format!("{at}.half_open.probe_timeout"),
                "must be between 1ms and 24h",
            ));
        }

        let response = Response::compile(
            raw.response,
            &format!("{at}.response"),
            503,
            GrpcStatus::UNAVAILABLE,
        )?;
        Ok(BreakerConfig {
            name: raw.name,
            scope,
            failure_statuses,
            failure_grpc_statuses,
            local_failures: failure.local_failures.unwrap_or(true),
            slow_call,
            consecutive_failures,
            failure_rate_percent,
            slow_call_rate_percent,
            minimum_calls,
            window,
            open_duration,
            backoff_multiplier,
            max_open_duration,
            max_probes,
            successes_to_close,
            probe_timeout,
            response,
            long_lived_counted,
            long_lived_slow_call,
            shadow: raw.shadow.unwrap_or(false),
        })
    }
}
