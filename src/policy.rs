//! The shape every policy has, and what each is given.
//!
//! A policy is a validated configuration section that says which request parts it reads
//! ([`Needs`]), admits a request or refuses it with a [`Reply`], and gets back what it lent the
//! request when the stream ends, with how it ended ([`Completion`]). The pipeline runs the
//! policies in their fixed order; everything they need from outside (the store, the time,
//! randomness, where to report) comes in an [`Env`].

use crate::clock::Instant;
use crate::grpc::GrpcStatus;
use crate::reply::Reply;
use crate::request::RequestInfo;
use crate::store::{FailureMode, Namespace, SharedDataSettings, Store, StoreError};
use crate::telemetry::{Catalog, Level, MetricId, Telemetry};
use std::time::Duration;

pub trait Policy {
    /// What an admitted request holds until its stream ends (an in-flight slot, a claim, a
    /// probe permit), or what it carries to its response (rate-limit headers).
    type Loan;

    /// The request parts admission reads, for the host to gather.
    fn needs(&self) -> Needs;

    fn admit<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
    ) -> Result<Self::Loan, Reply>;

    /// Takes back the loan of a stream that ended, however it ended.
    fn release<S: Store>(&self, env: &mut Env<'_, S>, loan: Self::Loan, completion: &Completion);
}

/// The request parts admission reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Anything at all: false only for a filter with no policy.
    pub request: bool,
    /// `:method` and `:path`: for matchers and keys on them, and the logs of dry-run
    /// refusals, which name them. Without them and without headers, the host reads only
    /// `content-type` (every policy answers gRPC calls as gRPC), one value instead of the map.
    pub request_line: bool,
    /// Lower-case header names, each once.
    pub headers: Vec<String>,
    /// The downstream peer address (`source.address`).
    pub peer: bool,
    /// The cluster the route selected (`xds.cluster_name`).
    pub cluster: bool,
}

impl Needs {
    pub fn merge(&mut self, other: Needs) {
        for name in other.headers {
            if !self.headers.contains(&name) {
                self.headers.push(name);
            }
        }
        self.request |= other.request;
        self.request_line |= other.request_line;
        self.peer |= other.peer;
        self.cluster |= other.cluster;
    }
}

/// What the policies of one filter instance share.
#[derive(Debug)]
pub struct Instance {
    pub name: String,
    pub namespace: Namespace,
    pub settings: SharedDataSettings,
    pub requests: MetricId,
    pub vms: MetricId,
    store_errors: MetricId,
    store_conflicts: MetricId,
}

impl Instance {
    pub fn new(name: &str, settings: SharedDataSettings, catalog: &mut Catalog) -> Instance {
        Instance {
            name: name.to_owned(),
            namespace: Namespace::new(name),
            settings,
            requests: catalog.counter("requests"),
            vms: catalog.gauge("vms"),
            store_errors: catalog.counter("shared_data.errors"),
            store_conflicts: catalog.counter("shared_data.conflicts"),
        }
    }
}

/// Everything a policy call gets from outside.
pub struct Env<'a, S> {
    pub store: &'a S,
    pub instance: &'a Instance,
    pub now: Instant,
    /// A fresh random number per call (claim ids); tests pass a deterministic source.
    pub random: fn() -> u64,
    pub telemetry: &'a mut Telemetry,
}

impl<S: Store> Env<'_, S> {
    pub fn namespace(&self) -> &Namespace {
        &self.instance.namespace
    }

    pub fn settings(&self) -> SharedDataSettings {
        self.instance.settings
    }

    /// Compare-and-swap attempts lost to other workers and retried.
    pub fn conflicts(&mut self, n: u32) {
        self.telemetry
            .add(self.instance.store_conflicts, u64::from(n));
    }

    /// Applies `shared_data.on_error` to an admission shared data could not answer: the one
    /// place that decides. `Ok`: go on without this policy's protection; `Err`: refuse.
    /// `policy` is the policy's section name (`rate_limit`). A rule, pool or breaker in dry run
    /// (`shadow`) refuses nothing, not even when its state is out of reach.
    pub fn admission_failed(
        &mut self,
        policy: &'static str,
        what: &str,
        error: StoreError,
        shadow: bool,
    ) -> Result<(), Reply> {
        if shadow {
            self.store_failed(&format!("shadow {what}"), error);
            return Ok(());
        }
        self.store_failed(what, error);
        match self.instance.settings.on_error {
            FailureMode::Allow => Ok(()),
            FailureMode::Deny => Err(Reply::unavailable(policy)),
        }
    }

    /// Counts and logs a store call that failed where nothing can be refused any more (a
    /// release at the end of a stream, a sweep).
    pub fn store_failed(&mut self, what: &str, error: StoreError) {
        self.telemetry.increment(self.instance.store_errors);
        self.telemetry.log(Level::Warn, format!("{what}: {error}"));
    }
}

/// How a stream ended, as Envoy reports it when it logs the stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// `response.code`; `None` when no response was sent.
    pub status: Option<u16>,
    /// Envoy's response flags (`response.flags`).
    pub flags: u64,
    /// `response.code_details` is `via_upstream`: the response is the upstream's. A local reply
    /// (this filter's, another instance's, any other filter's) has other details.
    pub via_upstream: bool,
    /// The router picked an upstream host for the request (`upstream.address` is set). A
    /// request answered before the router (by another filter, for want of a route) has none.
    /// The host reads it only for a stream holding an idempotency claim (see
    /// [`crate::pipeline::Exchange::holds_claim`]); for others it is `false`.
    pub upstream_host: bool,
    /// From the request's headers to the end of the stream.
    pub duration: Duration,
    /// A gRPC call's status, as Envoy reports it (`response.grpc_status`): from its trailers,
    /// or the headers of a trailers-only answer, else derived from `:status`. `None` for a
    /// request that is not a gRPC call, and for a call that got no answer.
    pub grpc_status: Option<GrpcStatus>,
    /// The request was long-lived ([`crate::request::RequestInfo::long_lived`]): its
    /// duration is its life, never a measure of the upstream's speed.
    pub long_lived: bool,
}

/// Response flags meaning Envoy could not get an answer from the upstream: no healthy upstream
/// (UH), upstream timeout (UT), remote reset (UR), connect failure (UF), connection termination
/// (UC), overflow (UO), retries exhausted (URX), max stream duration (UMSDR), protocol error
/// (UPE).
pub const UPSTREAM_FAILURE_FLAGS: u64 =
    0x2 | 0x4 | 0x10 | 0x20 | 0x40 | 0x80 | 0x8000 | 0x8_0000 | 0x80_0000;
/// The upstream failures that happened after the request reached it: UT, UR, UC, UMSDR, UPE.
/// Connect failures, no healthy host and overflow never reached it; retries exhausted (URX)
/// comes with the last attempt's own flag.
const REACHED_UPSTREAM_FLAGS: u64 = 0x4 | 0x10 | 0x40 | 0x8_0000 | 0x80_0000;
/// Envoy never had a connection to send the request on: connect failure (UF), no healthy
/// upstream (UH), overflow (UO), DNS resolution failure (DF).
const NEVER_CONNECTED_FLAGS: u64 = 0x20 | 0x2 | 0x80 | 0x400_0000;
/// The client went away first: downstream connection termination (DC), downstream remote reset
/// (DR, an HTTP/2 stream reset).
pub const DOWNSTREAM_GONE_FLAGS: u64 = 0x4000 | 0x1000_0000;

impl Completion {
    pub fn upstream_failed(&self) -> bool {
        self.flags & UPSTREAM_FAILURE_FLAGS != 0
    }

    pub fn downstream_gone(&self) -> bool {
        self.flags & DOWNSTREAM_GONE_FLAGS != 0
    }

    /// The request reached the upstream: it answered, or failed after it had the request.
    fn reached_upstream(&self) -> bool {
        self.via_upstream || self.flags & REACHED_UPSTREAM_FLAGS != 0
    }

    /// Whether the upstream may have the request. Only two endings say it never did: the
    /// router never picked a host (the request was answered before it), or Envoy never got a
    /// connection to send it on. Every other ending without the upstream's answer (a client
    /// that left, any local timeout: route, idle, max duration; a reset; an overload) may
    /// have left it executing.
    pub fn may_have_reached_upstream(&self) -> bool {
        self.reached_upstream() || (self.upstream_host && self.flags & NEVER_CONNECTED_FLAGS == 0)
    }

    /// The request's duration, if it measures the upstream: a short request that reached the
    /// upstream, whose client waited for the end.
    pub fn latency_sample(&self) -> Option<Duration> {
        (self.reached_upstream() && !self.downstream_gone() && !self.long_lived)
            .then_some(self.duration)
    }
}
