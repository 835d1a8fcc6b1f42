//! A local upstream the test controls: it answers with a chosen status after a chosen delay,
//! counts what it is asked, tracks how many requests it holds at once, and records each one.
//! A request can also ask for response headers in any bytes and for trailers (which reach
//! Envoy's client through the `upstream_h2` cluster, see [`H2_ROUTE_HEADER`]).

use bytes::Bytes;
use envoy_resilience::request::percent_decode;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Per-request overrides a test can send through Envoy.
pub const STATUS_HEADER: &str = "x-upstream-status";
pub const DELAY_HEADER: &str = "x-upstream-delay-ms";
/// Set on every response the upstream itself produced: the request's sequence number.
pub const SEQUENCE_HEADER: &str = "x-upstream-seq";
/// `name: value` with the value percent-encoded: a response header in any bytes. Repeatable.
pub const RESPOND_HEADER: &str = "x-upstream-respond-header";
/// `name: value`: end the response with this trailer. Repeatable.
pub const TRAILER_HEADER: &str = "x-upstream-trailer";
/// Present: the upstream takes the request (it is recorded and executed), then drops the
/// connection instead of answering: Envoy sees an upstream reset.
pub const RESET_HEADER: &str = "x-upstream-reset";
/// `h2`: Envoy routes the request to the upstream over HTTP/2, which carries trailers.
pub const H2_ROUTE_HEADER: &str = "x-upstream-protocol";

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    status: AtomicU16,
    delay_ms: AtomicU64,
    count: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    received: Mutex<Vec<Received>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let state = Arc::new(State {
            status: AtomicU16::new(200),
            ..State::default()
        });
        let server_state = Arc::clone(&state);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&server_state);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move {
                            let reset = request.headers().contains_key(RESET_HEADER);
                            let response = respond(&state, request).await;
                            if reset {
                                Err(std::io::Error::other("reset, as the request asked"))
                            } else {
                                Ok(response)
                            }
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            state,
            server,
        }
    }

    /// The status every later response has, unless a request asks for another.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// How long every later response waits, unless a request asks for another delay.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests that reached the upstream (counted on arrival, before any delay).
    pub fn count(&self) -> u64 {
        self.state.count.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests the upstream held at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .expect("upstream records")
            .clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn respond(state: &State, request: Request<Incoming>) -> Response<Frames> {
    let sequence = state.count.fetch_add(1, Ordering::SeqCst) + 1;
    let in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(in_flight, Ordering::SeqCst);
    // Decrements even if Envoy drops the connection and this future is cancelled.
    let _in_flight = InFlight(&state.in_flight);

    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let status = header(STATUS_HEADER).map_or(state.status.load(Ordering::SeqCst), |s| s as u16);
    let delay = header(DELAY_HEADER).unwrap_or(state.delay_ms.load(Ordering::SeqCst));
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state
        .received
        .lock()
        .expect("upstream records")
        .push(Received {
            method: parts.method.to_string(),
            uri: parts
                .uri
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut response = Response::builder()
        .status(status)
        .header(SEQUENCE_HEADER, sequence.to_string())
        .header("content-type", "application/octet-stream");
    let asked = |control: &str| {
        parts
            .headers
            .get_all(control)
            .iter()
            .filter_map(|v| v.to_str().ok()?.split_once(": "))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect::<Vec<_>>()
    };
    // A name asked once replaces the default; asked again, it gets another line.
    let mut named = Vec::new();
    for (name, value) in asked(RESPOND_HEADER) {
        let value =
            HeaderValue::from_bytes(&percent_decode(value.as_bytes())).expect("header bytes");
        if let Some(headers) = response.headers_mut() {
            let header = HeaderName::try_from(name).expect("header name");
            if named.contains(&header) {
                headers.append(header, value);
            } else {
                named.push(header.clone());
                headers.insert(header, value);
            }
        }
    }
    let mut trailers = HeaderMap::new();
    for (name, value) in asked(TRAILER_HEADER) {
        trailers.insert(
            HeaderName::try_from(name).expect("trailer name"),
            HeaderValue::try_from(value).expect("trailer value"),
        );
    }
    let data = Bytes::from(format!(
        "upstream response {sequence}: {} bytes received\n",
        body.len()
    ));
    response
        .body(Frames::new(data, trailers))
        .expect("upstream response")
}

/// A response body of fixed frames: the data, then the trailers if there are any.
pub struct Frames {
    frames: VecDeque<Frame<Bytes>>,
    exact: Option<u64>,
}

impl Frames {
    fn new(data: Bytes, trailers: HeaderMap) -> Frames {
        let exact = trailers.is_empty().then_some(data.len() as u64);
        let mut frames = VecDeque::from([Frame::data(data)]);
        if !trailers.is_empty() {
            frames.push_back(Frame::trailers(trailers));
        }
        Frames { frames, exact }
    }
}

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        self.exact
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
