//! Clients that do what well-behaved HTTP libraries will not: raw HTTP/1.1 bytes (paths with
//! dot segments, bodies that arrive late) and HTTP/2 requests that end in trailers.

use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as it came over the wire.
#[derive(Debug)]
pub struct WireResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// HTTP/2 only.
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl WireResponse {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `head` (a request line and headers, without the blank line; `Connection: close` is
/// added), then each body part after its delay, and reads the response to the end.
pub async fn http1(port: u16, head: &str, parts: &[(Duration, &[u8])]) -> WireResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to Envoy");
    let head = format!("{head}\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send head");
    for (delay, part) in parts {
        tokio::time::sleep(*delay).await;
        // Envoy may answer and close before the body is all in: that is a result, not an error.
        if stream.write_all(part).await.is_err() {
            break;
        }
    }
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw)).await;
    parse_http1(&raw)
}

fn parse_http1(raw: &[u8]) -> WireResponse {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = &raw[..end];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
            Some((name, line[colon + 1..].trim_ascii().to_vec()))
        })
        .collect();
    let rest = &raw[end + 4..];
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok());
    let body = match length {
        Some(length) => rest[..length.min(rest.len())].to_vec(),
        None => rest.to_vec(),
    };
    WireResponse {
        status,
        headers,
        body,
        trailers: Vec::new(),
    }
}

/// An HTTP/2 request (prior knowledge) whose body is sent in `parts`, each after its delay,
/// ending in `trailers` if there are any.
pub async fn http2(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    parts: Vec<(Duration, Bytes)>,
    trailers: &[(&str, &str)],
) -> WireResponse {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to Envoy");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        request = request.header(*name, HeaderValue::from_bytes(value).expect("header bytes"));
    }
    let request = request.body(body).expect("request");
    let mut trailer_map = HeaderMap::new();
    for (name, value) in trailers {
        trailer_map.insert(
            HeaderName::try_from(*name).expect("trailer name"),
            HeaderValue::try_from(*value).expect("trailer value"),
        );
    }
    let feed = tokio::spawn(async move {
        for (delay, part) in parts {
            tokio::time::sleep(delay).await;
            if tx.send_data(part).await.is_err() {
                return;
            }
        }
        if !trailer_map.is_empty() {
            let _ = tx.send_trailers(trailer_map).await;
        }
    });
    let response = sender.send_request(request).await.expect("HTTP/2 response");
    let status = response.status().as_u16();
    let headers = pairs(response.headers());
    let collected = response.into_body().collect().await.expect("response body");
    feed.abort();
    WireResponse {
        status,
        headers,
        trailers: collected.trailers().map(pairs).unwrap_or_default(),
        body: collected.to_bytes().to_vec(),
    }
}

fn pairs(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}
