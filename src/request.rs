//! The parts of a request that policies look at, gathered once by the host.
//!
//! The host fills in only what the configuration needs (see
//! [`crate::pipeline::config::Needs`]), as bytes: header values may hold any byte Envoy
//! accepts (≥ 0x80 included), so nothing here assumes UTF-8, and every reader has a defined
//! outcome for a value that is not text.

use std::net::IpAddr;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `:method`; a method that is not UTF-8 reads as U+FFFD and matches no rule.
    pub method: String,
    /// `:path` as rules see it: without its query, normalized by [`normalize_path`].
    pub path: String,
    /// `:path` exactly as received, query included: what an idempotency fingerprint covers.
    pub path_and_query: Vec<u8>,
    /// Lower-case names, as Envoy delivers them (`:authority` among them when a match needs it);
    /// a header sent on several lines has an entry per line, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The upstream cluster the route selected, when a policy is scoped by cluster.
    pub cluster: Option<String>,
    /// The downstream connection's peer address.
    pub peer: Option<IpAddr>,
    /// The whole body, once a stage waited for it (idempotency fingerprints it); else empty.
    pub body: Vec<u8>,
    /// A gRPC call ([`crate::grpc::is_grpc`]): its outcome is its `grpc-status`, and it is
    /// refused with a gRPC answer.
    pub grpc: bool,
    /// The method and path arrived as rules see them: the method upper-case, the path (up to
    /// its query) already normalized. Only such a request may be exempted by a rule: an
    /// upstream may read another spelling as another method or path than the rule did.
    pub canonical: bool,
    /// A request the `long_lived` section names (streaming RPCs, WebSockets): its duration is
    /// its life, not the upstream's speed, so pools and breakers count it as they are told to.
    pub long_lived: bool,
}

/// A header as a policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field<'a> {
    Missing,
    One(&'a [u8]),
    /// Sent on several lines. Servers disagree on which line counts (the first, the last, all
    /// joined), so a value that keys or proves something is ambiguous.
    Repeated,
}

impl RequestInfo {
    /// A request from the raw `:method` and `:path`, normalizing the path once for all rules.
    /// Methods are case-sensitive, but upstreams that take `post` for `POST` exist: rules see
    /// the method upper-cased, so `post` cannot step around a rule written for `POST`.
    pub fn new(method: &[u8], path: &[u8]) -> RequestInfo {
        let normalized = normalize_path(path);
        let before_query = path
            .split(|&b| b == b'?' || b == b'#')
            .next()
            .unwrap_or(path);
        let upper = String::from_utf8_lossy(method).to_ascii_uppercase();
        RequestInfo {
            canonical: upper.as_bytes() == method && before_query == normalized.as_bytes(),
            method: upper,
            path: normalized,
            path_and_query: path.to_vec(),
            ..RequestInfo::default()
        }
    }

    /// The headers [`RequestInfo::from_header_map`] reads whatever a configuration needs.
    pub fn reads(name: &[u8]) -> bool {
        matches!(name, b":method" | b":path" | b"content-type")
    }

    /// A request from Envoy's request header map: `:method`, `:path`, and every line of the
    /// headers in `names`.
    pub fn from_header_map(map: Vec<(String, Vec<u8>)>, names: &[String]) -> RequestInfo {
        let pseudo = |name: &str| {
            map.iter()
                .find(|(n, _)| n == name)
                .map_or(&[][..], |(_, v)| v.as_slice())
        };
        let mut request = RequestInfo::new(pseudo(":method"), pseudo(":path"));
        request.grpc = crate::grpc::is_grpc(pseudo("content-type"));
        request.headers = map
            .into_iter()
            .filter(|(name, _)| names.contains(name))
            .collect();
        request
    }

    /// Every line of a header, in order.
    pub fn values<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn field(&self, name: &str) -> Field<'_> {
        let mut values = self.values(name);
        match (values.next(), values.next()) {
            (None, _) => Field::Missing,
            (Some(value), None) => Field::One(value),
            (Some(_), Some(_)) => Field::Repeated,
        }
    }

    /// A header's lines joined with `, `, as HTTP combines a list (RFC 9110 §5.3).
    pub fn joined(&self, name: &str) -> Option<Vec<u8>> {
        let mut joined: Option<Vec<u8>> = None;
        for value in self.values(name) {
            let bytes = joined.get_or_insert_with(Vec::new);
            if !bytes.is_empty() {
                bytes.extend_from_slice(b", ");
            }
            bytes.extend_from_slice(value);
        }
        joined
    }

    /// The client's address, for an Envoy whose connection manager has `use_remote_address:
    /// true` (without it Envoy itself takes the downstream address from `X-Forwarded-For`,
    /// and any client can choose it).
    ///
    /// With `trusted_hops` = 0 it is the connection's peer, and `X-Forwarded-For` is ignored.
    /// With N > 0 trusted proxies in front of Envoy, each appending the address it saw, the
    /// client is the N-th entry from the right of the header as it arrived; the last entry,
    /// which Envoy appended itself, is skipped. A header with too few entries did not come
    /// through those proxies, and an entry that is not an IP address (or not text) was not
    /// written by one: both fall back to the connection's peer.
    pub fn client_address(&self, trusted_hops: u32) -> Option<IpAddr> {
        if trusted_hops == 0 {
            return self.peer;
        }
        let Some(forwarded) = self.joined("x-forwarded-for") else {
            return self.peer;
        };
        let entries: Vec<&[u8]> = forwarded.split(|&b| b == b',').collect();
        let arrived = &entries[..entries.len().saturating_sub(1)];
        arrived
            .len()
            .checked_sub(trusted_hops as usize)
            .and_then(|index| arrived.get(index))
            .and_then(|entry| std::str::from_utf8(entry.trim_ascii()).ok())
            .and_then(|entry| entry.parse().ok())
            .or(self.peer)
    }
}

/// An address as `Display` writes it (an IPv4 address is written here: `core::fmt` cost more
/// than the rest of building a client's key).
pub fn address_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(itoa::Buffer::new().format(octet));
            }
            text
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

/// Builds a key from several request parts: each part length-prefixed, so no choice of values
/// makes two different part lists collide; a missing part has its own marker.
#[derive(Debug, Default)]
pub struct KeyBuilder(Vec<u8>);

impl KeyBuilder {
    pub fn part(&mut self, value: Option<&[u8]>) {
        match value {
            // Request parts are far below 4 GiB: a header that long never reaches a filter.
            Some(value) => {
                let len = u32::try_from(value.len()).unwrap_or(u32::MAX - 2);
                self.0.extend_from_slice(&len.to_le_bytes());
                self.0.extend_from_slice(value);
            }
            None => self.0.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }

    /// A part the request sent on several lines: its own marker, shared by all such requests.
    pub fn repeated(&mut self) {
        self.0.extend_from_slice(&(u32::MAX - 1).to_le_bytes());
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// The path as an upstream that normalizes would serve it, so that no other spelling of a path
/// escapes a rule written for it: the query and fragment cut off; `%XX` escapes of unreserved
/// characters and of `/` and `\` decoded, other escapes upper-cased; `\` read as `/`; bytes
/// that are not printable ASCII percent-encoded; dot segments removed (RFC 3986 §5.2.4); runs
/// of slashes merged. This is what Envoy's `normalize_path` and `merge_slashes` do, and more:
/// an upstream that decodes `%2F` cannot reach `/reports/` through `/reports%2F`.
pub fn normalize_path(raw: &[u8]) -> String {
    let end = raw
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(raw.len());
    let raw = &raw[..end];
    let mut decoded = String::with_capacity(end + 1);
    let mut i = 0;
    while let Some(&byte) = raw.get(i) {
        let escaped = escape_at(raw, i);
        i += 1;
        match escaped {
            Some(b) if b.is_ascii_alphanumeric() || b"-._~/\\".contains(&b) => {
                decoded.push(if b == b'\\' { '/' } else { char::from(b) });
                i += 2;
            }
            Some(b) => {
                push_escaped(&mut decoded, b);
                i += 2;
            }
            None if byte == b'\\' => decoded.push('/'),
            None if byte.is_ascii_graphic() => decoded.push(char::from(byte)),
            None => push_escaped(&mut decoded, byte),
        }
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut ends_in_directory = false;
    for segment in decoded.split('/') {
        ends_in_directory = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => {
                segments.push(segment);
                ends_in_directory = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if ends_in_directory || segments.is_empty() {
        path.push('/');
    }
    path
}

/// The byte a `%XX` escape starting at `at` encodes, if one starts there.
fn escape_at(bytes: &[u8], at: usize) -> Option<u8> {
    let hex_value = |digit: u8| char::from(digit).to_digit(16).map(|d| d as u8);
    match bytes.get(at..at.checked_add(3)?)? {
        [b'%', high, low] => Some((hex_value(*high)? << 4) | hex_value(*low)?),
        _ => None,
    }
}

/// Every `%XX` escape decoded; a `%` that starts no escape stays.
pub fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match escape_at(bytes, i) {
            Some(decoded) => {
                out.push(decoded);
                i += 3;
            }
            None => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn push_escaped(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xF)]));
}

/// The peer IP from Envoy's `source.address` property (`"10.0.0.1:5678"`, `"[::1]:5678"`).
pub fn parse_peer(address: &[u8]) -> Option<IpAddr> {
    let address = std::str::from_utf8(address).ok()?;
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

    /// The text is the bucket's key: any difference from `Display` would move every client
    /// to another bucket after an upgrade.
    #[test]
    fn address_text_is_what_display_writes() {
        for octets in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [10, 0, 9, 100],
            [1, 20, 199, 7],
        ] {
            let v4 = IpAddr::from(octets);
            assert_eq!(address_text(v4), v4.to_string());
        }
        for text in ["::1", "2001:db8::8a2e:370:7334", "::ffff:10.0.0.1"] {
            assert_eq!(address_text(ip(text)), ip(text).to_string());
        }
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
        assert_eq!(parse_peer(b"10.0.0.1:5678"), Some(ip("10.0.0.1")));
        assert_eq!(parse_peer(b"[::1]:5678"), Some(ip("::1")));
        assert_eq!(parse_peer(b"::1"), Some(ip("::1")));
        assert_eq!(parse_peer(b"pipe:/tmp/x"), None);
        assert_eq!(parse_peer(b"10.0.0.\xe9:1"), None);
    }

    #[test]
    fn every_spelling_of_a_path_normalizes_to_one() {
        for spelling in [
            "/reports/a",
            "//reports/a",
            "/reports//a",
            "/%72eports/a",
            "/%72%65ports/a",
            "/x/../reports/a",
            "/x/%2e%2e/reports/a",
            "/x/%2E%2E/reports/./a",
            "/./reports/a",
            "/../reports/a",
            "/healthz/../reports/a",
            "/reports%2Fa",
            "/reports%2fa",
            "/reports\\a",
            "/reports%5Ca",
            "/reports/a?x=/../b",
            "/reports/a#frag",
        ] {
            assert_eq!(
                normalize_path(spelling.as_bytes()),
                "/reports/a",
                "{spelling}"
            );
        }
    }

    #[test]
    fn normalization_keeps_what_is_not_a_path_separator_or_unreserved() {
        assert_eq!(normalize_path(b""), "/");
        assert_eq!(normalize_path(b"*"), "/*");
        assert_eq!(normalize_path(b"/"), "/");
        assert_eq!(normalize_path(b"/a/"), "/a/");
        assert_eq!(normalize_path(b"/a/b/.."), "/a/");
        assert_eq!(normalize_path(b"/a/."), "/a/");
        assert_eq!(normalize_path(b"/.."), "/");
        assert_eq!(normalize_path(b"/a%20b"), "/a%20b");
        assert_eq!(
            normalize_path(b"/a%3fb"),
            "/a%3Fb",
            "escapes are upper-cased"
        );
        assert_eq!(
            normalize_path(b"/%252e%252e/a"),
            "/%252e%252e/a",
            "decoded once only"
        );
        assert_eq!(normalize_path(b"/caf\xc3\xa9"), "/caf%C3%A9");
        assert_eq!(normalize_path(b"/caf\xe9"), "/caf%E9", "not UTF-8");
        assert_eq!(normalize_path(b"/a%zz%4"), "/a%zz%4", "broken escapes stay");
        assert_eq!(normalize_path(b"/a b\x00"), "/a%20b%00");
    }

    #[test]
    fn key_parts_cannot_collide() {
        let key = |parts: &[Option<&[u8]>]| {
            let mut key = KeyBuilder::default();
            parts.iter().for_each(|part| key.part(*part));
            key.finish()
        };
        assert_ne!(
            key(&[Some(b"ab"), Some(b"c")]),
            key(&[Some(b"a"), Some(b"bc")])
        );
        assert_ne!(key(&[None]), key(&[Some(b"")]));
        assert_ne!(key(&[Some(b"caf\xe9")]), key(&[Some(b"caf\xc3\xa9")]));
    }

    fn forwarded(value: &[u8]) -> RequestInfo {
        RequestInfo {
            headers: vec![("x-forwarded-for".to_owned(), value.to_vec())],
            peer: Some(ip("10.9.9.9")),
            ..RequestInfo::default()
        }
    }

    #[test]
    fn the_client_is_the_entry_the_trusted_hops_wrote() {
        let request = forwarded(b"6.6.6.6, 203.0.113.7, 10.0.0.1");
        assert_eq!(request.client_address(0), Some(ip("10.9.9.9")));
        assert_eq!(request.client_address(1), Some(ip("203.0.113.7")));
        assert_eq!(request.client_address(2), Some(ip("6.6.6.6")));
        assert_eq!(
            request.client_address(3),
            Some(ip("10.9.9.9")),
            "too few entries: not through the proxies"
        );
    }

    #[test]
    fn forwarded_lines_are_one_list() {
        let mut request = forwarded(b"6.6.6.6");
        request.headers.push((
            "x-forwarded-for".to_owned(),
            b"203.0.113.7, 10.0.0.1".to_vec(),
        ));
        assert_eq!(request.client_address(1), Some(ip("203.0.113.7")));
        assert_eq!(request.client_address(2), Some(ip("6.6.6.6")));
    }

    /// Found in review: only a header's first line was read, so `x-api-key: rotate` then
    /// `x-api-key: alice` was keyed on `rotate` while the upstream may take `alice`.
    #[test]
    fn a_header_on_several_lines_is_repeated_not_its_first_line() {
        let map = vec![
            (":method".to_owned(), b"post".to_vec()),
            (":path".to_owned(), b"//a/../b?q".to_vec()),
            ("x-api-key".to_owned(), b"rotate".to_vec()),
            ("x-other".to_owned(), b"unread".to_vec()),
            ("x-api-key".to_owned(), b"alice".to_vec()),
            ("x-tier".to_owned(), b"free".to_vec()),
        ];
        let names = ["x-api-key".to_owned(), "x-tier".to_owned()];
        let request = RequestInfo::from_header_map(map, &names);
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/b");
        assert_eq!(request.path_and_query, b"//a/../b?q");
        assert_eq!(request.field("x-api-key"), Field::Repeated);
        assert_eq!(request.field("x-tier"), Field::One(b"free"));
        assert_eq!(request.field("x-other"), Field::Missing, "not asked for");
        assert_eq!(
            request.joined("x-api-key").as_deref(),
            Some(&b"rotate, alice"[..])
        );
        assert_eq!(request.values("x-api-key").count(), 2);
    }

    #[test]
    fn a_forwarded_entry_that_is_no_address_falls_back_to_the_peer() {
        for value in [
            &b"caf\xe9, 10.0.0.1"[..],
            b"not-an-ip, 10.0.0.1",
            b", 10.0.0.1",
            b"\xff\xfe",
        ] {
            assert_eq!(forwarded(value).client_address(1), Some(ip("10.9.9.9")));
        }
    }
}
