//! The `store` section a policy names to share its state with every Envoy of a fleet.

use crate::config::json::json_object;
use crate::config::{check_duration, ConfigError, Duration};
use crate::store::FailureMode;

/// `store`: a second tier shared by every Envoy of a fleet.
#[derive(Debug)]
pub struct RawStore {
    pub etcd: RawEtcd,
    pub on_store_error: Option<FailureMode>,
}

json_object!(RawStore {
    etcd: "etcd",
    on_store_error: "on_store_error"
});

#[derive(Debug)]
pub struct RawEtcd {
    pub cluster: String,
    pub authority: Option<String>,
    pub prefix: Option<String>,
    pub timeout: Option<Duration>,
}

json_object!(RawEtcd {
    cluster: "cluster",
    authority: "authority",
    prefix: "prefix",
    timeout: "timeout"
});

/// etcd, reached through its HTTP/JSON gateway by an Envoy cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetStore {
    /// The Envoy cluster of etcd's client URLs.
    pub cluster: String,
    /// `:authority` of the calls.
    pub authority: String,
    /// Every key this filter writes starts with it, then the instance's name.
    pub prefix: String,
    /// How long one call may take; past it, the call has failed.
    pub timeout: std::time::Duration,
    /// What a request gets when etcd gives no answer in time: `deny` refuses it (503);
    /// `allow` lets it through without the fleet (idempotency: protected by this Envoy's own
    /// table only; rate limiting: the global rule does not count it).
    pub on_store_error: FailureMode,
}

pub const MIN_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(10);
pub const MAX_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl FleetStore {
    /// `on_store_error` defaults to `default_mode`: each policy has its own safe default.
    pub fn validate(
        raw: RawStore,
        at: &str,
        default_mode: FailureMode,
    ) -> Result<FleetStore, ConfigError> {
        let text = |value: &str, name: &str, max: usize| {
            let ok =
                (1..=max).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
            if ok {
                Ok(value.to_owned())
            } else {
                Err(ConfigError::at(
                    &format!("{at}.etcd.{name}"),
                    format!("must be 1 to {max} visible ASCII characters"),
                ))
            }
        };
        let cluster = text(&raw.etcd.cluster, "cluster", 255)?;
        let authority = text(
            raw.etcd.authority.as_deref().unwrap_or(&cluster),
            "authority",
            255,
        )?;
        let prefix = text(
            raw.etcd.prefix.as_deref().unwrap_or("envoy-resilience/"),
            "prefix",
            256,
        )?;
        let timeout = check_duration(
            raw.etcd
                .timeout
                .map_or(std::time::Duration::from_millis(500), |d| d.0),
            MIN_STORE_TIMEOUT,
            MAX_STORE_TIMEOUT,
            &format!("{at}.etcd.timeout"),
        )?;
        Ok(FleetStore {
            cluster,
            authority,
            prefix,
            timeout,
            on_store_error: raw.on_store_error.unwrap_or(default_mode),
        })
    }
}
