//! Which requests a rule applies to: host, path (prefix or exact), methods, headers.
//!
//! Paths are compared after [`normalize_path`], so a rule written for `/reports/` also covers
//! `//reports/`, `/%72eports/` and `/x/../reports/`. Header values are compared as bytes.

use crate::config::json::{child, json_object, misused, variant, FromJson, Json};
use crate::config::{check_methods, check_request_header_name, ConfigError};
use crate::request::{normalize_path, percent_decode, RequestInfo};

#[derive(Debug, Default)]
pub struct RawMatch {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub path: Option<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<Vec<RawHeaderMatch>>,
}

json_object!(RawMatch {
    host: "host",
    path_prefix: "path_prefix",
    path: "path",
    methods: "methods",
    headers: "headers"
});

#[derive(Debug)]
pub struct RawHeaderMatch {
    pub name: String,
    pub exact: Option<String>,
    pub present: Option<bool>,
}

json_object!(RawHeaderMatch {
    name: "name",
    exact: "exact",
    present: "present"
});

/// What a breaker or a pool covers: the upstream cluster the route selected, or a match.
#[derive(Debug)]
pub enum RawScope {
    Cluster(String),
    Match(RawMatch),
}

impl FromJson for RawScope {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        const NAMES: &[&str] = &["cluster", "match"];
        match variant(value, at)? {
            (name, Some(cluster)) if name == "cluster" => {
                String::from_json(cluster, &child(at, "cluster")).map(RawScope::Cluster)
            }
            (name, Some(matcher)) if name == "match" => {
                RawMatch::from_json(matcher, &child(at, "match")).map(RawScope::Match)
            }
            (name, inner) => Err(misused(&name, inner.as_ref(), NAMES, at)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Cluster(String),
    Match(Match),
}

impl Scope {
    pub fn compile(raw: RawScope, at: &str) -> Result<Scope, ConfigError> {
        match raw {
            RawScope::Cluster(cluster) if cluster.is_empty() => Err(ConfigError::at(
                &format!("{at}.cluster"),
                "must name a cluster",
            )),
            RawScope::Cluster(cluster) => Ok(Scope::Cluster(cluster)),
            RawScope::Match(m) => Ok(Scope::Match(Match::compile(m, &format!("{at}.match"))?)),
        }
    }

    pub fn contains(&self, request: &RequestInfo) -> bool {
        match self {
            Scope::Cluster(cluster) => request.cluster.as_deref() == Some(cluster.as_str()),
            Scope::Match(m) => m.matches(request),
        }
    }

    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        match self {
            Scope::Match(m) => Some(m.header_names()),
            Scope::Cluster(_) => None,
        }
        .into_iter()
        .flatten()
    }

    pub fn needs_cluster(&self) -> bool {
        matches!(self, Scope::Cluster(_))
    }

    pub fn reads_request_line(&self) -> bool {
        matches!(self, Scope::Match(m) if m.reads_request_line())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// Lower-case, compared with `:authority` without its port.
    host: Option<String>,
    path: PathMatch,
    /// Upper-case; empty matches every method.
    methods: Vec<String>,
    headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct HeaderMatch {
    /// Lower-case.
    name: String,
    rule: HeaderRule,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HeaderRule {
    Present(bool),
    Exact(Vec<u8>),
}

impl Match {
    /// Validates `raw`, found at `path` in the configuration.
    pub fn compile(raw: RawMatch, path: &str) -> Result<Match, ConfigError> {
        let path_match = match (raw.path_prefix, raw.path) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::at(
                    path,
                    "set `path_prefix` or `path`, not both",
                ));
            }
            (Some(prefix), None) => {
                PathMatch::Prefix(check_path(prefix, &format!("{path}.path_prefix"))?)
            }
            (None, Some(exact)) => PathMatch::Exact(check_path(exact, &format!("{path}.path"))?),
            (None, None) => PathMatch::Any,
        };
        let methods = check_methods(raw.methods.unwrap_or_default(), &format!("{path}.methods"))?;
        let mut headers = Vec::new();
        for (i, header) in raw.headers.unwrap_or_default().into_iter().enumerate() {
            let at = format!("{path}.headers[{i}]");
            let name = check_request_header_name(&header.name, &format!("{at}.name"))?;
            let rule = match (header.exact, header.present) {
                (Some(exact), None) => HeaderRule::Exact(exact.into_bytes()),
                (None, Some(present)) => HeaderRule::Present(present),
                _ => {
                    return Err(ConfigError::at(
                        &at,
                        "set exactly one of `exact` and `present`",
                    ))
                }
            };
            headers.push(HeaderMatch { name, rule });
        }
        let host = match raw.host {
            Some(host) if host.is_empty() || host.contains(['/', ' ', ':']) => {
                return Err(ConfigError::at(
                    &format!("{path}.host"),
                    "must be a host name without port",
                ));
            }
            host => host.map(|h| h.to_ascii_lowercase()),
        };
        Ok(Match {
            host,
            path: path_match,
            methods,
            headers,
        })
    }

    pub fn matches(&self, request: &RequestInfo) -> bool {
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(prefix) => request.path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => request.path == *exact,
        };
        let host_ok = self.host.as_ref().is_none_or(|host| {
            request
                .values(":authority")
                .next()
                .is_some_and(|authority| {
                    authority_host(authority).eq_ignore_ascii_case(host.as_bytes())
                })
        });
        host_ok
            && path_ok
            && (self.methods.is_empty() || self.methods.contains(&request.method))
            && self.headers.iter().all(|h| match &h.rule {
                HeaderRule::Present(present) => {
                    request.values(&h.name).next().is_some() == *present
                }
                // Any line: a second line cannot step a request around a rule.
                HeaderRule::Exact(value) => request.values(&h.name).any(|v| v == value.as_slice()),
            })
    }

    /// Whether it looks at `:method` or `:path`.
    pub fn reads_request_line(&self) -> bool {
        self.path != PathMatch::Any || !self.methods.is_empty()
    }

    /// Header names this match reads.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        let authority = self.host.as_ref().map(|_| ":authority");
        self.headers
            .iter()
            .map(|h| h.name.as_str())
            .chain(authority)
    }
}

/// The host an authority names, read as leniently as any server might: userinfo dropped,
/// `%XX` escapes decoded, the port dropped (everything from the host's first `:`, so `:80:80`
/// and `:` too), and trailing dots dropped (`example.com.` is a fully qualified
/// `example.com`). Lenient reading only ever makes a host rule cover more spellings.
fn authority_host(authority: &[u8]) -> Vec<u8> {
    let authority = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let decoded = percent_decode(authority);
    let end = if decoded.starts_with(b"[") {
        decoded
            .iter()
            .position(|&b| b == b']')
            .map_or(decoded.len(), |i| i + 1)
    } else {
        decoded
            .iter()
            .position(|&b| b == b':')
            .unwrap_or(decoded.len())
    };
    let mut host = decoded[..end].to_vec();
    while host.last() == Some(&b'.') {
        host.pop();
    }
    host
}

/// A configured path must be written as requests are compared: normalized.
fn check_path(path: String, at: &str) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return Err(ConfigError::at(at, "must start with `/`"));
    }
    let normalized = normalize_path(path.as_bytes());
    if normalized != path {
        return Err(ConfigError::at(
            at,
            format!(
                "requests are matched on their normalized path, so write {normalized:?} instead"
            ),
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn compile(json: &str) -> Result<Match, ConfigError> {
        let raw: RawMatch = crate::config::json::read(json)?;
        Match::compile(raw, "m")
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestInfo {
        RequestInfo {
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            ..RequestInfo::new(method.as_bytes(), path.as_bytes())
        }
    }

    #[test]
    fn everything_matches_an_empty_match() {
        let m = compile("{}").ok();
        assert_eq!(
            m.map(|m| m.matches(&request("DELETE", "/x", &[]))),
            Some(true)
        );
    }

    #[test]
    fn path_methods_and_headers_all_have_to_match() {
        let m = compile(
            r#"{"path_prefix": "/api/", "methods": ["post", "PUT"], "headers": [{"name": "X-Tier", "exact": "free"}, {"name": "x-debug", "present": false}]}"#,
        );
        let Ok(m) = m else { panic!("{m:?}") };
        assert!(m.matches(&request("POST", "/api/orders", &[("x-tier", "free")])));
        assert!(m.matches(&request("PUT", "/api/", &[("x-tier", "free")])));
        assert!(!m.matches(&request("GET", "/api/orders", &[("x-tier", "free")])));
        assert!(!m.matches(&request("POST", "/apix", &[("x-tier", "free")])));
        assert!(!m.matches(&request("POST", "/api/orders", &[("x-tier", "paid")])));
        assert!(!m.matches(&request(
            "POST",
            "/api/orders",
            &[("x-tier", "free"), ("x-debug", "1")]
        )));
        assert_eq!(m.header_names().collect::<Vec<_>>(), ["x-tier", "x-debug"]);
    }

    #[test]
    fn host_is_compared_without_port_or_case() {
        let Ok(m) = compile(r#"{"host": "API.example.com"}"#) else {
            panic!()
        };
        assert!(m.matches(&request(
            "GET",
            "/",
            &[(":authority", "api.example.com:8443")]
        )));
        assert!(m.matches(&request("GET", "/", &[(":authority", "Api.Example.Com")])));
        assert!(!m.matches(&request("GET", "/", &[(":authority", "www.example.com")])));
        // Found in review: spellings Envoy forwards unchanged and lenient servers read as the
        // same host.
        for spelling in [
            "api.example.com.",
            "api.example.com..",
            "api.example.com:",
            "api.example.com.:80",
            "api.example.com:80:80",
            "api.example.com::80",
            "api.example.com:+80",
            "user@api.example.com:80",
            "user:pw@api.example.com",
            "api%2eexample.com",
            "API%2Eexample.com",
            "api.example.com%2e",
        ] {
            assert!(
                m.matches(&request("GET", "/", &[(":authority", spelling)])),
                "{spelling}"
            );
        }
        for other in [
            "api.example.com.evil",
            "api.example.com@evil.com",
            "evil.com",
        ] {
            assert!(
                !m.matches(&request("GET", "/", &[(":authority", other)])),
                "{other}"
            );
        }
        assert!(!m.matches(&request("GET", "/", &[])));
        assert_eq!(m.header_names().collect::<Vec<_>>(), [":authority"]);
        assert!(compile(r#"{"host": "a.com:80"}"#).is_err());
    }

    #[test]
    fn exact_path_matches_only_itself() {
        let Ok(m) = compile(r#"{"path": "/login"}"#) else {
            panic!()
        };
        assert!(m.matches(&request("GET", "/login", &[])));
        assert!(!m.matches(&request("GET", "/login/x", &[])));
    }

    #[test]
    fn bad_matches_name_the_field() {
        let at = |json| compile(json).err().map(|e| e.path);
        assert_eq!(
            at(r#"{"path": "/a", "path_prefix": "/b"}"#).as_deref(),
            Some("m")
        );
        assert_eq!(
            at(r#"{"path_prefix": "api"}"#).as_deref(),
            Some("m.path_prefix")
        );
        assert_eq!(
            at(r#"{"methods": ["GET", "P O"]}"#).as_deref(),
            Some("m.methods[1]")
        );
        assert_eq!(
            at(r#"{"headers": [{"name": "a b", "present": true}]}"#).as_deref(),
            Some("m.headers[0].name")
        );
        assert_eq!(
            at(r#"{"headers": [{"name": "a"}]}"#).as_deref(),
            Some("m.headers[0]")
        );
    }

    #[test]
    fn other_spellings_of_a_path_match_the_rule_written_for_it() {
        let Ok(m) = compile(r#"{"path_prefix": "/reports/"}"#) else {
            panic!()
        };
        for spelling in [
            "//reports/a",
            "/%72eports/a",
            "/x/../reports/a",
            "/reports%2Fa",
        ] {
            assert!(m.matches(&request("GET", spelling, &[])), "{spelling}");
        }
        assert!(!m.matches(&request("GET", "/reports", &[])));
        assert!(!m.matches(&request("GET", "/other/a", &[])));
    }

    #[test]
    fn configured_paths_must_be_written_normalized() {
        let reason = |json| compile(json).err().map(|e| (e.path, e.reason));
        assert_eq!(
            reason(r#"{"path_prefix": "/api//v1/"}"#),
            Some((
                "m.path_prefix".to_owned(),
                "requests are matched on their normalized path, so write \"/api/v1/\" instead"
                    .to_owned()
            ))
        );
        assert!(compile(r#"{"path": "/a/../b"}"#).is_err());
        assert!(compile(r#"{"path": "/%7Eu"}"#).is_err());
        assert!(compile(r#"{"path_prefix": "/a%20b/"}"#).is_ok());
    }

    #[test]
    fn header_values_compare_as_bytes() {
        let Ok(m) = compile(r#"{"headers": [{"name": "x-tier", "exact": "free"}]}"#) else {
            panic!()
        };
        let mut request = request("GET", "/", &[]);
        request.headers = vec![("x-tier".to_owned(), b"fr\xe9e".to_vec())];
        assert!(!m.matches(&request));
        request.headers = vec![("x-tier".to_owned(), b"free".to_vec())];
        assert!(m.matches(&request));
        let Ok(host) = compile(r#"{"host": "api.example.com"}"#) else {
            panic!()
        };
        request.headers = vec![(":authority".to_owned(), b"api.example.com\xe9".to_vec())];
        assert!(!host.matches(&request));
    }

    /// A second line cannot step a request around a rule: any line may match.
    #[test]
    fn any_line_of_a_repeated_header_matches() {
        let Ok(m) = compile(r#"{"headers": [{"name": "x-tier", "exact": "free"}]}"#) else {
            panic!()
        };
        let twice = request("GET", "/", &[("x-tier", "paid"), ("x-tier", "free")]);
        assert!(m.matches(&twice));
    }
}
