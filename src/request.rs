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

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is its own block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (
                address.parse::<IpAddr>().ok()?,
                Some(prefix.parse::<u8>().ok()?),
            ),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        (prefix <= bits).then_some(Cidr {
            network: address,
            prefix,
        })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let (network, address, bits) = match (self.network, address) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                (u128::from(u32::from(n)), u128::from(u32::from(a)), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
            (IpAddr::V4(n), IpAddr::V6(a)) => match a.to_ipv4_mapped() {
                Some(a) => (u128::from(u32::from(n)), u128::from(u32::from(a)), 32),
                None => return false,
            },
            (IpAddr::V6(_), IpAddr::V4(_)) => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
        network & mask == address & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn ip(text: &str) -> IpAddr {
        text.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn cidr_blocks_contain_their_addresses_only() {
        let ten = Cidr::parse("10.0.0.0/8");
        assert!(ten.is_some_and(|c| c.contains(ip("10.255.1.2"))));
        assert!(ten.is_some_and(|c| !c.contains(ip("11.0.0.1"))));
        assert!(
            ten.is_some_and(|c| c.contains(ip("::ffff:10.1.2.3"))),
            "IPv4-mapped IPv6"
        );
        assert!(Cidr::parse("127.0.0.1")
            .is_some_and(|c| c.contains(ip("127.0.0.1")) && !c.contains(ip("127.0.0.2"))));
        assert!(Cidr::parse("0.0.0.0/0").is_some_and(|c| c.contains(ip("203.0.113.9"))));
        assert!(Cidr::parse("2001:db8::/32")
            .is_some_and(|c| c.contains(ip("2001:db8:1::1")) && !c.contains(ip("2001:db9::1"))));
        assert!(Cidr::parse("::/0").is_some_and(|c| !c.contains(ip("10.0.0.1"))));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/", ""] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn peers_parse_from_envoy_addresses() {
        assert_eq!(parse_peer("10.0.0.1:5678"), Some(ip("10.0.0.1")));
        assert_eq!(parse_peer("[::1]:5678"), Some(ip("::1")));
        assert_eq!(parse_peer("::1"), Some(ip("::1")));
        assert_eq!(parse_peer("pipe:/tmp/x"), None);
        assert_eq!(path_without_query("/a/b?c=d#e"), "/a/b");
    }
}
