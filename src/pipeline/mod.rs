//! The pipeline: what one filter instance does with one stream, from its request headers to
//! the moment Envoy logs it, with no proxy-wasm in sight.
//!
//! A [`Filter`] is one configured instance, shared read-only by every stream of a VM. An
//! [`Exchange`] is one stream. The host gathers the request parts the filter [`Needs`], feeds
//! each Envoy callback to the exchange, and does what the returned [`Step`] says; everything
//! else — the policies' fixed order, what each stage lends and gets back, waiting for the body,
//! capturing the response, what counts as an upstream outcome — happens here, and is tested
//! natively with an in-memory store and a fake clock.
//!
//! Policies run in a fixed order: load shedding, rate limiting, idempotency (replays and
//! conflicts are answered before any upstream capacity is spent), circuit breaking. A stage
//! that refuses gives back at once what it took itself; what earlier stages lent the request
//! is given back when the stream ends, in [`Exchange::finish`], which the host calls from
//! `on_log` — once for every stream Envoy handles, however it ended — except that breakers
//! judge a long-lived request, and take back its permit, at its response headers
//! ([`Exchange::judge_start`]).

pub mod config;

use crate::circuit_breaker::{CircuitBreaker, Permits};
use crate::clock::Instant;
use crate::decision::{self, Decision};
use crate::etcd::{self, AnswerError, StoreCall};
use crate::grpc::{self, GrpcStatus};
use crate::hashing::{shared_seed, KeyHasher, Seed};
use crate::idempotency::{self, Claim, FleetStep, FleetWrite, FleetWrites, Idempotency};
use crate::load_shedding::{LoadShedding, Slots};
use crate::matcher::Match;
use crate::policy::{Completion, Env, Instance, Needs, Policy};
use crate::rate_limit::{Admission, RateLimit, RateStep};
use crate::reply::Reply;
use crate::request::RequestInfo;
use crate::store::Store;
use crate::telemetry::{Catalog, Level, Telemetry};
use config::Config;
use std::time::Duration;

/// One configured filter instance.
pub struct Filter {
    pub instance: Instance,
    catalog: Catalog,
    needs: Needs,
    load_shedding: Option<LoadShedding>,
    rate_limit: Option<RateLimit>,
    idempotency: Option<Idempotency>,
    circuit_breaker: Option<CircuitBreaker>,
    /// Requests that are long-lived besides upgrades and `CONNECT`.
    long_lived: Vec<Match>,
    decision_header: Option<String>,
    /// The filter state key of the stream's decisions (Envoy prefixes it with `wasm.`).
    decision_state: String,
}

/// How often a VM whose filter waits for request bodies checks their deadlines.
pub const TICK: Duration = crate::idempotency::BODY_TIMER;
/// With a fleet store, the writes of finished streams go out at the next tick (until one
/// lands, other Envoys still see its key in flight), and requests waiting for another
/// worker's grant of global tokens look again: so ticks come this often.
pub const FLEET_TICK: Duration = Duration::from_millis(10);
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Filter {
    /// Builds instance `name` from its configuration. Keyed tables share one hashing seed per
    /// instance: the first VM's `candidate` wins, every other VM reads it from `store`.
    pub fn configure<S: Store>(
        name: &str,
        configuration: &[u8],
        store: &S,
        candidate: Seed,
        now: Instant,
        telemetry: &mut Telemetry,
    ) -> Result<Filter, String> {
        let config = Config::parse(configuration).map_err(|err| err.to_string())?;
        let Config {
            shared_data,
            rate_limit,
            circuit_breaker,
            load_shedding,
            idempotency,
            long_lived,
            decision_header,
        } = config;
        let mut catalog = Catalog::new(name);
        let decision_state = catalog.full_name("decision");
        let instance = Instance::new(name, shared_data, &mut catalog);
        if let Err(err) = instance.namespace.prepare(store) {
            // Not fatal: creation writes the witness itself when it finds it missing.
            telemetry.log(Level::Warn, err.to_string());
        }
        // Only keyed tables need the shared seed; it exists exactly when one is configured.
        let hasher = if rate_limit.is_some() || idempotency.is_some() {
            let seed = shared_seed(
                store,
                &instance.namespace,
                candidate,
                shared_data.max_attempts,
            )
            .map_err(|err| format!("cannot share the key-hashing seed: {err}"))?;
            Some(KeyHasher::new(seed))
        } else {
            None
        };
        let load_shedding =
            load_shedding.map(|c| LoadShedding::new(c, &mut catalog, &instance.namespace));
        let rate_limit = rate_limit
            .zip(hasher)
            .map(|(c, hasher)| RateLimit::new(c, hasher, &mut catalog, &instance.namespace));
        let idempotency = idempotency
            .zip(hasher)
            .map(|(c, hasher)| Idempotency::new(c, hasher, &mut catalog));
        let circuit_breaker =
            circuit_breaker.map(|c| CircuitBreaker::new(c, &mut catalog, &instance.namespace));
        let mut filter = Filter {
            instance,
            catalog,
            needs: Needs::default(),
            load_shedding,
            rate_limit,
            idempotency,
            circuit_breaker,
            long_lived,
            decision_header,
            decision_state,
        };
        filter.needs = filter.count_needs();
        if let Some(policy) = &filter.load_shedding {
            let mut env = Env {
                store,
                instance: &filter.instance,
                now,
                random: || 0,
                telemetry,
            };
            policy.report_limits(&mut env);
        }
        Ok(filter)
    }

    /// Every request part any policy reads. Destructured, so that a new policy does not
    /// compile until it is counted here.
    fn count_needs(&self) -> Needs {
        let Filter {
            instance: _,
            catalog: _,
            needs: _,
            load_shedding,
            rate_limit,
            idempotency,
            circuit_breaker,
            // Matched on the method and path alone.
            long_lived,
            decision_header: _,
            decision_state: _,
        } = self;
        let mut needs = Needs::default();
        load_shedding.iter().for_each(|p| needs.merge(p.needs()));
        rate_limit.iter().for_each(|p| needs.merge(p.needs()));
        idempotency.iter().for_each(|p| needs.merge(p.needs()));
        circuit_breaker.iter().for_each(|p| needs.merge(p.needs()));
        needs.request_line |= !long_lived.is_empty();
        needs.headers.sort();
        needs
    }

    pub fn needs(&self) -> &Needs {
        &self.needs
    }

    /// The response header that carries the decisions, if one is configured.
    pub fn decision_header(&self) -> Option<&str> {
        self.decision_header.as_deref()
    }

    /// The filter state key under which the host publishes a stream's decisions
    /// ([`Exchange::unpublished_decisions`]): `resilience.<instance>.decision`.
    pub fn decision_state(&self) -> &str {
        &self.decision_state
    }

    /// Every metric of the instance, for the host to define.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// How often the host should call [`Filter::tick`] and poll waiting streams, if at all.
    pub fn tick_period(&self) -> Option<Duration> {
        let global = self
            .rate_limit
            .as_ref()
            .is_some_and(|p| p.config().store.is_some());
        let fleet = self
            .idempotency
            .as_ref()
            .is_some_and(|p| p.config().store.is_some());
        match (&self.idempotency, global || fleet) {
            (_, true) => Some(FLEET_TICK),
            (Some(_), false) => Some(TICK),
            (None, false) => None,
        }
    }

    /// Where a VM's sweep of expired idempotency records starts: somewhere random, so that
    /// the VMs spread over the table.
    pub fn sweeper(&self, random: u64) -> Sweeper {
        let records = self.idempotency.as_ref().map_or(1, |p| p.config().records);
        Sweeper {
            cursor: (random % u64::from(records)) as u32,
            next: Instant::default(),
        }
    }

    /// etcd's answer to a [`FleetWrite`] the host sent for a finished stream: `true` to
    /// send it again.
    pub fn on_fleet_write_answer<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        write: &mut FleetWrite,
        answer: Option<(u16, &[u8])>,
    ) -> bool {
        self.idempotency
            .as_ref()
            .is_some_and(|policy| policy.fleet_written(env, write, answer))
    }

    /// Queues a fleet write for the host to send; one the full queue drops is counted.
    pub fn queue_fleet_write<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        writes: &mut FleetWrites,
        write: FleetWrite,
    ) {
        if !writes.push(write) {
            if let Some(policy) = &self.idempotency {
                policy.fleet_write_dropped(env);
            }
        }
    }

    /// Periodic work: once a second, frees a batch of expired idempotency records.
    pub fn tick<S: Store>(&self, env: &mut Env<'_, S>, sweeper: &mut Sweeper) {
        let Some(policy) = &self.idempotency else {
            return;
        };
        if env.now < sweeper.next {
            return;
        }
        sweeper.next = env.now.saturating_add(SWEEP_EVERY);
        sweeper.cursor = policy.sweep_step(env, sweeper.cursor);
    }
}

/// Where a VM's sweep goes on at its next tick.
#[derive(Debug)]
pub struct Sweeper {
    cursor: u32,
    next: Instant,
}

/// What the host does next with a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Let the stream go on.
    Continue,
    /// Hold it (Envoy buffers the body meanwhile) until the exchange decides.
    Pause,
    /// Answer locally; the stream never reaches the upstream.
    Reply(Reply),
    /// Keep holding the stream, send this to the fleet store, and hand its answer to
    /// [`Exchange::on_store_answer`].
    Call(StoreCall),
}

/// What the host changes in a response's headers.
#[derive(Debug, PartialEq, Eq)]
pub struct HeaderEdits<'a> {
    /// Added: the RateLimit fields.
    pub added: &'a [(String, String)],
    /// The decision header: set to the stream's decisions, replacing any value the response
    /// came with, or removed when there are none. `None`: left alone (no header is configured,
    /// or the response is this filter's own reply, which carries it).
    pub decision: Option<(&'a str, Option<&'a str>)>,
}

/// The response as the host can show it, read only when the exchange asks.
pub trait ResponseView {
    /// `:status`.
    fn status(&self) -> Option<u16>;
    /// Whether `response.code_details` is `via_upstream`.
    fn via_upstream(&self) -> bool;
    /// Every header, values as bytes.
    fn headers(&self) -> Vec<(String, Vec<u8>)>;
    /// One header's value (its first line).
    fn header(&self, name: &str) -> Option<Vec<u8>>;
}

#[derive(Debug, Default)]
enum Stage {
    #[default]
    Admitting,
    /// Held until the body is in, or until the deadline.
    AwaitingBody { deadline: Instant },
    /// Held until the fleet store answers.
    AwaitingStore,
    /// Held until another worker's grant of global tokens lands, polled at each tick.
    AwaitingGrant,
    /// Every stage let it through.
    Forwarded,
    /// Answered locally.
    Answered,
    /// Envoy logged the stream; nothing more happens to it.
    Finished,
}

/// One stream, and everything it holds.
#[derive(Debug, Default)]
pub struct Exchange {
    request: RequestInfo,
    started: Instant,
    stage: Stage,
    /// What the stages lent the request; `None` where there is nothing to give back.
    slots: Option<Slots>,
    /// Rate limiting's progress, then what the response carries from it.
    rate: Option<Admission>,
    /// The request ended (its headers, last body chunk or trailers said so) while a stage
    /// before the body's was still deciding.
    request_ended: bool,
    claim: Option<Claim>,
    permits: Option<Permits>,
    /// The request is a gRPC call and its response is a gRPC answer.
    grpc_response: bool,
    /// Every policy that answered the request, or would have in dry run, as the RFC 9651
    /// list the decision header and filter state carry.
    decisions: String,
    /// How much of `decisions` the host has published to Envoy's filter state.
    published: usize,
}

impl Exchange {
    pub fn on_request_headers<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        request: RequestInfo,
        end_of_stream: bool,
    ) -> Step {
        env.telemetry.increment(filter.instance.requests);
        self.request = request;
        self.request.long_lived =
            self.request.canonical && filter.long_lived.iter().any(|m| m.matches(&self.request));
        self.started = env.now;
        if let Some(policy) = &filter.load_shedding {
            let admitted = policy.admit(env, &self.request);
            self.heard(env);
            match admitted {
                Ok(slots) => self.slots = Some(slots).filter(|s| !s.is_empty()),
                Err(reply) => return self.answer(filter, reply),
            }
        }
        self.request_ended = end_of_stream;
        if let Some(policy) = &filter.rate_limit {
            let (admission, step) = policy.start(env, &self.request);
            self.rate = Some(admission);
            return self.on_rate_step(filter, env, step, |_| Vec::new());
        }
        self.admit_before_body(filter, env, |_| Vec::new())
    }

    /// Where rate limiting left the request: decided, or waiting for etcd.
    fn on_rate_step<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        step: RateStep,
        read_body: impl FnOnce(usize) -> Vec<u8>,
    ) -> Step {
        self.heard(env);
        match step {
            RateStep::Done(Ok(())) => self.admit_before_body(filter, env, read_body),
            RateStep::Done(Err(reply)) => self.answer(filter, reply),
            RateStep::Call(call) => {
                self.stage = Stage::AwaitingStore;
                Step::Call(call)
            }
            RateStep::Wait => {
                self.stage = Stage::AwaitingGrant;
                Step::Pause
            }
        }
    }

    /// Idempotency waits for the body, unless it is already all in (it may have arrived while
    /// rate limiting waited for etcd: Envoy keeps it buffered, and `read_body` reads it).
    fn admit_before_body<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        read_body: impl FnOnce(usize) -> Vec<u8>,
    ) -> Step {
        match &filter.idempotency {
            Some(policy) if !self.request.long_lived && policy.awaits_body(&self.request) => {
                let deadline = env.now.saturating_add(policy.config().body_timeout);
                if !self.request_ended {
                    self.stage = Stage::AwaitingBody { deadline };
                    return Step::Pause;
                }
                self.admit_whole_body(filter, env, policy.config().max_body_bytes, read_body)
            }
            _ => self.admit_after_body(filter, env),
        }
    }

    /// Whether rate limiting still decides: the body waits, buffered, until it has.
    fn rate_limiting(&self) -> bool {
        matches!(self.stage, Stage::AwaitingGrant)
            || (matches!(self.stage, Stage::AwaitingStore)
                && self.rate.as_ref().is_some_and(Admission::asks))
    }

    /// A chunk of the request body: `size` is all of it so far, which Envoy keeps buffered
    /// while the exchange pauses. `read_body(n)` reads up to `n` bytes of it.
    pub fn on_request_body<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        size: usize,
        end_of_stream: bool,
        read_body: impl FnOnce(usize) -> Vec<u8>,
    ) -> Step {
        if self.rate_limiting() {
            self.request_ended |= end_of_stream;
            return Step::Pause;
        }
        let (Stage::AwaitingBody { .. }, Some(policy)) = (&self.stage, &filter.idempotency) else {
            return Step::Continue;
        };
        policy.saw_body();
        if let Some(reply) = self.on_body_timeout(filter, env) {
            return self.idempotency_answers(filter, env, reply);
        }
        if size > policy.config().max_body_bytes {
            return self.body_too_large(filter, env);
        }
        if !end_of_stream {
            return Step::Pause;
        }
        self.request.body = read_body(size);
        self.admit_after_body(filter, env)
    }

    /// The request ended in trailers, so no body chunk said it was the last.
    pub fn on_request_trailers<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        read_body: impl FnOnce(usize) -> Vec<u8>,
    ) -> Step {
        if self.rate_limiting() {
            self.request_ended = true;
            return Step::Pause;
        }
        let (Stage::AwaitingBody { .. }, Some(policy)) = (&self.stage, &filter.idempotency) else {
            return Step::Continue;
        };
        if let Some(reply) = self.on_body_timeout(filter, env) {
            return self.idempotency_answers(filter, env, reply);
        }
        self.admit_whole_body(filter, env, policy.config().max_body_bytes, read_body)
    }

    /// The whole body is in Envoy's buffer (no chunk said it was the last): reads it, at
    /// most one byte past `limit` to tell a body too large, and admits the request with it.
    fn admit_whole_body<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        limit: usize,
        read_body: impl FnOnce(usize) -> Vec<u8>,
    ) -> Step {
        let body = read_body(limit.saturating_add(1));
        if body.len() > limit {
            return self.body_too_large(filter, env);
        }
        self.request.body = body;
        self.admit_after_body(filter, env)
    }

    /// When the body wait ends, if the exchange is waiting for one.
    pub fn body_deadline(&self) -> Option<Instant> {
        match self.stage {
            Stage::AwaitingBody { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Whether the host should hand the exchange its ticks: it waits for its body, or for
    /// another worker's grant.
    pub fn polls(&self) -> bool {
        matches!(
            self.stage,
            Stage::AwaitingBody { .. } | Stage::AwaitingGrant
        )
    }

    /// A tick: what a waiting exchange does now, if anything (`None`: it waits on).
    pub fn on_tick<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        read_body: impl FnOnce(usize) -> Vec<u8>,
    ) -> Option<Step> {
        match self.stage {
            Stage::AwaitingBody { .. } => self
                .on_body_timeout(filter, env)
                .map(|reply| self.idempotency_answers(filter, env, reply)),
            Stage::AwaitingGrant => {
                let (Some(policy), Some(admission)) = (&filter.rate_limit, &mut self.rate) else {
                    return Some(Step::Continue);
                };
                let step = policy.on_tick(env, &self.request, admission);
                // Rules decided before the one that waits again may have made decisions: taken
                // now, or the next stream of this tick would take them for its own.
                self.heard(env);
                match step {
                    RateStep::Wait => None,
                    step => Some(self.on_rate_step(filter, env, step, read_body)),
                }
            }
            _ => None,
        }
    }

    /// The answer for a request whose body did not arrive in time, once its deadline passed:
    /// from the host's timer, or when the rest of the body arrives too late.
    fn on_body_timeout<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
    ) -> Option<Reply> {
        let deadline = self.body_deadline()?;
        let policy = filter.idempotency.as_ref()?;
        if env.now < deadline {
            return None;
        }
        Some(policy.body_timed_out(env))
    }

    /// What to change in the response's headers; a held claim starts capturing it.
    pub fn on_response_headers<'a>(
        &'a mut self,
        filter: &'a Filter,
        response: &impl ResponseView,
        end_of_stream: bool,
    ) -> HeaderEdits<'a> {
        // Only a gRPC answer has a grpc-status: a client claiming gRPC to an HTTP service
        // must not make its 200s and 400s count as UNKNOWN and INTERNAL.
        self.grpc_response = self.request.grpc
            && response
                .header("content-type")
                .is_some_and(|t| grpc::is_grpc(&t));
        if let (Some(claim), Some(policy)) = (&mut self.claim, &filter.idempotency) {
            // The map first: the host then answers the status from it.
            let headers = response.headers();
            claim.capture.headers(
                policy.config(),
                response.status(),
                response.via_upstream(),
                &headers,
                end_of_stream,
            );
        }
        // A local reply of this filter carries its decisions already. Any other response
        // gets the header from this filter alone: never the upstream's, which could claim a
        // refusal that never happened.
        let decision = filter
            .decision_header
            .as_deref()
            .filter(|_| !matches!(self.stage, Stage::Answered))
            .map(|name| {
                (
                    name,
                    Some(self.decisions.as_str()).filter(|d| !d.is_empty()),
                )
            });
        HeaderEdits {
            added: self.rate.as_ref().map_or(&[][..], Admission::headers),
            decision,
        }
    }

    /// Whether breakers judge the stream by the response headers just seen: the host then
    /// hands them to [`Exchange::judge_start`].
    pub fn judged_at_start(&self) -> bool {
        self.request.long_lived && self.permits.is_some()
    }

    /// A long-lived request is judged by the upstream's response headers: the stream started
    /// (a success, slow if they came late) or was refused. How long it then lives, and how it
    /// ends (a server that drains its streams ends them `UNAVAILABLE`), says nothing about
    /// the upstream's health; and a probe must not hold its half-open slot for hours.
    /// Headers that are not the upstream's (a local reply) leave it to be judged when it
    /// ends, by Envoy's flags.
    pub fn judge_start<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        response: &impl ResponseView,
        end_of_stream: bool,
    ) {
        if !response.via_upstream() {
            return;
        }
        let (Some(permits), Some(policy)) = (self.permits.take(), &filter.circuit_breaker) else {
            return;
        };
        let status = response.status();
        // As Envoy reports a call's status: its grpc-status, else gRPC's reading of the HTTP
        // status; a 200 whose trailers are still to come is a call under way.
        let grpc_status =
            self.grpc_response
                .then(|| match (response.header("grpc-status"), status) {
                    (Some(code), _) => GrpcStatus::from_header(&code),
                    (None, Some(200)) if !end_of_stream => GrpcStatus::OK,
                    (None, status) => GrpcStatus::from_http(status.unwrap_or(0)),
                });
        let completion = Completion {
            status,
            via_upstream: true,
            upstream_host: true,
            duration: env.now.saturating_since(self.started),
            grpc_status,
            long_lived: true,
            ..Completion::default()
        };
        policy.release(env, permits, &completion);
    }

    /// A gRPC call answered as one: the host reads its `grpc-status` when it ends.
    pub fn grpc_response(&self) -> bool {
        self.grpc_response
    }

    /// Whether the stream holds an idempotency claim: the host then hands over the response
    /// body, and reads `upstream_host` for its [`Completion`] (only a claim asks whether the
    /// upstream may have the request, and the property costs a hostcall).
    pub fn holds_claim(&self) -> bool {
        self.claim.is_some()
    }

    pub fn on_response_body(&mut self, filter: &Filter, chunk: &[u8], end_of_stream: bool) {
        if let (Some(claim), Some(policy)) = (&mut self.claim, &filter.idempotency) {
            claim.capture.body(policy.config(), chunk, end_of_stream);
        }
    }

    pub fn on_response_trailers(&mut self) {
        if let Some(claim) = &mut self.claim {
            claim.capture.trailers();
        }
    }

    /// Whether the stream holds anything to give back, so the host reads how it ended.
    pub fn holds_loans(&self) -> bool {
        self.slots.is_some()
            || self.claim.is_some()
            || self.permits.is_some()
            || self.rate.as_ref().is_some_and(Admission::asks)
    }

    /// Whether a policy holding this stream's loans judges how it ended (a breaker, an
    /// idempotency claim, an adaptive pool's latency): only then does the host read the
    /// response's code, flags and details for [`Exchange::finish`], three hostcalls that cost
    /// more than everything a pool that only counts does. For the others it passes
    /// [`Completion::default`].
    pub fn judges_outcome(&self, filter: &Filter) -> bool {
        self.permits
            .as_ref()
            .is_some_and(|permits| !permits.is_empty())
            || self.claim.is_some()
            || self.slots.as_ref().is_some_and(|slots| {
                filter
                    .load_shedding
                    .as_ref()
                    .is_some_and(|policy| policy.samples_latency(slots))
            })
    }

    /// The stream ended holding nothing: nothing to give back, nothing to read.
    pub fn end(&mut self) {
        self.stage = Stage::Finished;
    }

    /// The stream ended: every loan goes back to its policy, latest first, with how it ended.
    /// What must still be written to the fleet store comes back, for the host to send.
    pub fn finish<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        completion: impl FnOnce() -> Completion,
    ) -> Option<FleetWrite> {
        self.end();
        if !self.holds_loans() {
            return None;
        }
        let completion = Completion {
            duration: env.now.saturating_since(self.started),
            long_lived: self.request.long_lived,
            ..completion()
        };
        if let (Some(permits), Some(policy)) = (self.permits.take(), &filter.circuit_breaker) {
            policy.release(env, permits, &completion);
        }
        let write = match (self.claim.take(), &filter.idempotency) {
            (Some(claim), Some(policy)) => policy.finish_claim(env, claim, &completion),
            _ => None,
        };
        if let (Some(admission), Some(policy)) = (&mut self.rate, &filter.rate_limit) {
            policy.abandon(env, admission);
        }
        if let (Some(slots), Some(policy)) = (self.slots.take(), &filter.load_shedding) {
            policy.release(env, slots, &completion);
        }
        write
    }

    /// The fleet store's answer to the last [`Step::Call`]: its HTTP status and body, or
    /// why there is none (`NotSent`: the host could not send it). `read_body` reads the
    /// request body Envoy buffered meanwhile.
    pub fn on_store_answer<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        answer: Result<(u16, &[u8]), AnswerError>,
        read_body: impl FnOnce(usize) -> Vec<u8>,
    ) -> Step {
        if self.rate_limiting() {
            let (Some(policy), Some(admission)) = (&filter.rate_limit, &mut self.rate) else {
                return Step::Continue;
            };
            let answer = answer.and_then(|(status, body)| etcd::swapped(status, body));
            let step = policy.on_answer(env, &self.request, admission, answer);
            return self.on_rate_step(filter, env, step, read_body);
        }
        let (Stage::AwaitingStore, Some(policy), Some(claim)) =
            (&self.stage, &filter.idempotency, &mut self.claim)
        else {
            return Step::Continue;
        };
        let Some(fleet) = &mut claim.fleet else {
            return Step::Continue;
        };
        let answer = answer.and_then(|(status, body)| etcd::swapped(status, body));
        let step = policy.fleet_answer(fleet, claim.id, answer, env.now);
        self.on_fleet_step(filter, env, step)
    }

    fn on_fleet_step<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        step: FleetStep,
    ) -> Step {
        let Some(policy) = &filter.idempotency else {
            return Step::Continue;
        };
        let settled = match step {
            FleetStep::Call(call) => {
                self.stage = Stage::AwaitingStore;
                return Step::Call(call);
            }
            FleetStep::Decided(idempotency::KeyCheck::Claimed) => {
                policy.fleet_claimed(env);
                Ok(())
            }
            FleetStep::Decided(decision) => policy.fleet_decided(env, &mut self.claim, decision),
            FleetStep::Unavailable(err) => policy.fleet_unavailable(env, &self.claim, err),
        };
        match settled {
            Ok(()) => self.admit_breakers(filter, env),
            Err(reply) => self.idempotency_answers(filter, env, reply),
        }
    }

    /// Idempotency, then circuit breaking: the stages that see the body.
    fn admit_after_body<S: Store>(&mut self, filter: &Filter, env: &mut Env<'_, S>) -> Step {
        // A streaming call has no one request to fingerprint nor one response to replay.
        if let Some(policy) = filter
            .idempotency
            .as_ref()
            .filter(|_| !self.request.long_lived)
        {
            match policy.admit(env, &self.request) {
                Ok(claim) => self.claim = claim,
                Err(reply) => return self.idempotency_answers(filter, env, reply),
            }
            if let Some(claim) = &mut self.claim {
                if let Some(fleet) = &mut claim.fleet {
                    let step = policy.fleet_start(fleet, claim.id, env.now);
                    return self.on_fleet_step(filter, env, step);
                }
            }
        }
        self.admit_breakers(filter, env)
    }

    fn admit_breakers<S: Store>(&mut self, filter: &Filter, env: &mut Env<'_, S>) -> Step {
        if let Some(policy) = &filter.circuit_breaker {
            let admitted = policy.admit(env, &self.request);
            self.heard(env);
            match admitted {
                Ok(permits) => self.permits = Some(permits).filter(|p| !p.is_empty()),
                Err(reply) => return self.answer(filter, reply),
            }
        }
        self.stage = Stage::Forwarded;
        Step::Continue
    }

    /// A body over `max_body_bytes`: refused, or let through without idempotency.
    fn body_too_large<S: Store>(&mut self, filter: &Filter, env: &mut Env<'_, S>) -> Step {
        let refusal = filter
            .idempotency
            .as_ref()
            .and_then(|policy| policy.body_too_large());
        match refusal {
            Some(problem) => self.idempotency_answers(filter, env, problem.reply()),
            None => self.admit_breakers(filter, env),
        }
    }

    /// Idempotency answers the request itself, unless it runs dry: then the request goes on
    /// to the breakers, and the answer is only a decision.
    fn idempotency_answers<S: Store>(
        &mut self,
        filter: &Filter,
        env: &mut Env<'_, S>,
        reply: Reply,
    ) -> Step {
        match &filter.idempotency {
            Some(policy) if policy.config().shadow => {
                policy.shadow_pass(env, &self.request, &reply);
                self.decided(&reply.decision.shadow());
                self.admit_breakers(filter, env)
            }
            _ => self.answer(filter, reply),
        }
    }

    /// Takes the refusals dry-run policies would have made in the call just made.
    fn heard<S: Store>(&mut self, env: &mut Env<'_, S>) {
        for decision in env.telemetry.take_shadow_decisions() {
            self.decided(&decision);
        }
    }

    fn decided(&mut self, decision: &Decision) {
        decision::append(&mut self.decisions, decision);
    }

    /// The stream's decisions, when some were made since the host last published them to
    /// Envoy's filter state (under [`Filter::decision_state`]): then it publishes them now.
    pub fn unpublished_decisions(&mut self) -> Option<&str> {
        if self.decisions.len() == self.published {
            return None;
        }
        self.published = self.decisions.len();
        Some(&self.decisions)
    }

    /// Every local reply goes out through here: a gRPC call gets it as a gRPC answer.
    fn answer(&mut self, filter: &Filter, mut reply: Reply) -> Step {
        self.stage = Stage::Answered;
        self.decided(&reply.decision);
        if let Some(name) = &filter.decision_header {
            // A replay may carry the header, stored under a configuration that stored it.
            reply.headers.retain(|(stored, _)| stored != name);
            reply
                .headers
                .push((name.clone(), self.decisions.clone().into_bytes()));
        }
        Step::Reply(if self.request.grpc {
            reply.for_grpc_call()
        } else {
            reply
        })
    }
}

#[cfg(test)]
mod tests;
