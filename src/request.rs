//! The parts of a request that policies look at, gathered once by the host.
//!
//! The host fills in only the headers the configuration names (see
//! [`crate::config::Config::request_headers`]), so the core never asks the host for anything.

use std::net::IpAddr;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub method: String,
    /// The `:path` without its query string.
    pub path: String,
    /// Lower-case names, as Envoy delivers them (`:authority` among them when a match needs it).
    pub headers: Vec<(String, String)>,
    /// The upstream cluster the route selected, when a policy is scoped by cluster.
    pub cluster: Option<String>,
    /// The downstream connection's peer address.
    pub peer: Option<IpAddr>,
}

impl RequestInfo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `:path` without the query string or fragment.
pub fn path_without_query(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// The peer IP from Envoy's `source.address` property (`"10.0.0.1:5678"`, `"[::1]:5678"`).
pub fn parse_peer(address: &str) -> Option<IpAddr> {
    address
        .parse::<std::net::SocketAddr>()
        .map(|socket| socket.ip())
        .or_else(|_| address.parse::<IpAddr>())
        .ok()
}
