//! The proxy-wasm adapter: the only code that talks to Envoy.
//!
//! It reads what the core asks for (headers as bytes, properties, bodies), calls the
//! [`pipeline`](crate::pipeline), turns each [`Step`] into an Envoy action, and applies the
//! core's telemetry to Envoy's stats and log. Every hostcall goes through [`abi`], which
//! never panics.

mod abi;
mod exports;
mod shared_data;
mod tally;

use crate::etcd::AnswerError;
use crate::etcd::StoreCall;
use crate::grpc::GrpcStatus;
use crate::hashing::Seed;
use crate::idempotency::{FleetWrite, FleetWrites, MAX_WRITES_IN_FLIGHT};
use crate::pipeline::{Exchange, Filter, ResponseView, Step, Sweeper};
use crate::policy::{Completion, Env};
use crate::reply::Reply;
use crate::request::{parse_peer, RequestInfo};
use crate::telemetry::{Counts, Event, Level, MetricId, Telemetry, METRICS_FLUSH};
use abi::{Buffer, Map};
use exports::Action;
use shared_data::SharedData;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use tally::{count, Call};

/// A configured filter instance and the Envoy stats its metrics live in.
struct Configured {
    filter: Filter,
    /// Envoy's metric id for each catalog entry, in catalog order.
    metrics: Vec<Option<u32>>,
    /// Counter increments not yet handed to Envoy; each tick flushes them.
    counts: RefCell<Counts>,
    /// Whether a tick flushes `counts`: without a timer, every report flushes.
    ticking: Cell<bool>,
}

impl Configured {
    fn new(filter: Filter) -> Configured {
        let metrics: Vec<Option<u32>> = filter
            .catalog()
            .metrics()
            .iter()
            .map(|(kind, name)| abi::define_metric(*kind, name).ok())
            .collect();
        let counts = RefCell::new(Counts::new(filter.catalog()));
        Configured {
            filter,
            metrics,
            counts,
            ticking: Cell::new(false),
        }
    }

    /// Runs one call into the core with Envoy's store and clock, then reports what it said.
    fn run<R>(&self, call: impl FnOnce(&Filter, &mut Env<'_, SharedData>) -> R) -> R {
        let mut telemetry = Telemetry::default();
        let mut env = Env {
            store: &SharedData,
            instance: &self.filter.instance,
            now: abi::now(),
            random: random_u64,
            telemetry: &mut telemetry,
        };
        let result = call(&self.filter, &mut env);
        self.report(&mut telemetry);
        result
    }

    /// Counter increments wait for the next [`Configured::flush`]; gauges and logs go now.
    fn report(&self, telemetry: &mut Telemetry) {
        for event in telemetry.drain() {
            // Never borrowed twice (nothing reports while a flush runs); were it ever, the
            // increment goes at once rather than trapping.
            let now = match self.counts.try_borrow_mut() {
                Ok(mut counts) => counts.absorb(event),
                Err(_) => Some(event),
            };
            // Stats must never fail a request: a change that cannot be recorded is dropped.
            match now {
                Some(Event::Add(id, n)) => {
                    let _ = self.metric(id).map(|m| abi::increment_metric(m, n));
                }
                Some(Event::Set(id, value)) => {
                    let _ = self.metric(id).map(|m| abi::record_metric(m, value));
                }
                Some(Event::Log(level, message)) => {
                    log(level, &self.filter.instance.name, &message);
                }
                None => {}
            }
        }
        if !self.ticking.get() {
            self.flush();
        }
    }

    /// Hands the counter increments owed to Envoy.
    fn flush(&self) {
        let owed = match self.counts.try_borrow_mut() {
            Ok(mut counts) => counts.take(),
            Err(_) => return,
        };
        for (id, n) in owed {
            if let Some(metric) = self.metric(id) {
                let _ = abi::increment_metric(metric, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    fn metric(&self, id: MetricId) -> Option<u32> {
        self.metrics.get(id.0 as usize).copied().flatten()
    }

    /// The request parts the filter needs, as bytes: one read of the header map, so that a
    /// header sent on several lines is seen whole.
    fn request_info(&self) -> RequestInfo {
        let needs = self.filter.needs();
        if !needs.request {
            return RequestInfo::default();
        }
        let map = if needs.request_line || !needs.headers.is_empty() {
            abi::headers_named(Map::Request, |name| {
                RequestInfo::reads(name) || needs.headers.iter().any(|n| n.as_bytes() == name)
            })
            .unwrap_or_default()
        } else {
            abi::header(Map::Request, "content-type")
                .ok()
                .flatten()
                .map(|value| vec![("content-type".to_owned(), value)])
                .unwrap_or_default()
        };
        let mut request = RequestInfo::from_header_map(map, &needs.headers);
        request.peer = needs
            .peer
            .then(|| abi::property(&["source", "address"]).ok().flatten())
            .flatten()
            .and_then(|address| parse_peer(&address));
        request.cluster = needs
            .cluster
            .then(|| abi::property(&["xds", "cluster_name"]).ok().flatten())
            .flatten()
            .and_then(|name| String::from_utf8(name).ok());
        request
    }
}

/// The last stream of a replaced configuration hands over what it still owes.
impl Drop for Configured {
    fn drop(&mut self) {
        self.flush();
    }
}

fn log(level: Level, instance: &str, message: &str) {
    abi::log(level, &format!("resilience filter {instance:?}: {message}"));
}

/// A fresh SipHash key from the VM's randomness (WASI `random_get` behind `RandomState`).
fn random_seed() -> Seed {
    Seed([random_u64(), random_u64()])
}

/// A number no other call draws: a fresh `RandomState` takes new keys from the VM's randomness.
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(abi::now().as_nanos())
}

/// A stream of this VM, by context id, for the root context to act on.
type StreamRef = (u32, Weak<RefCell<Exchange>>);

/// Streams of this VM polled at each tick: waiting for their request body (each until its
/// deadline), or for another worker's grant of global tokens.
type Waiting = Rc<RefCell<Vec<StreamRef>>>;

/// The most waiting streams one tick answers or resumes; the rest go at the next ticks. Envoy runs
/// the local replies a VM call asked for when the call returns, and each reply's response
/// callback into this VM runs the next one from inside itself: the stack grows by a level per
/// reply, and about 300 at once overflowed V8's (seen here). 32 a tick keep it shallow and
/// still answer 320 stalled requests a second per worker.
const REPLIES_PER_TICK: usize = 32;

/// Fleet writes of finished streams, waiting for the root context to send them.
type Writes = Rc<RefCell<FleetWrites>>;

#[derive(Default)]
struct Root {
    /// Envoy's id for this root context: calls it sends are answered to it.
    id: u32,
    configured: Option<Rc<Configured>>,
    sweeper: Option<Sweeper>,
    waiting: Waiting,
    writes: Writes,
    /// Fleet writes sent and not yet answered, by call token.
    sent: HashMap<u32, FleetWrite>,
    /// Calls the root sent for a waiting stream (it became the one to ask for a grant at a
    /// tick), by call token: the answer goes to that stream.
    calls: HashMap<u32, StreamRef>,
    /// Configurations replaced while streams of theirs still run (a WebSocket may run for
    /// hours): their counters are flushed at each tick until the last of them ends.
    replaced: Vec<Weak<Configured>>,
}

/// Sends a call to the fleet store for context `from`; its answer comes back to that
/// context's `on_http_call_response`.
fn dispatch(from: u32, call: &StoreCall) -> Result<u32, abi::Status> {
    let headers = [
        (":method", "POST".as_bytes()),
        (":path", call.path.as_bytes()),
        (":authority", call.authority.as_bytes()),
        ("content-type", b"application/json"),
    ]
    .map(|(name, value)| (name.to_owned(), value.to_vec()));
    let token = abi::http_call(&call.cluster, &headers, &call.body, call.timeout)?;
    exports::calls_back(token, from);
    Ok(token)
}

/// The answer to a call: its status and body (Envoy's own 503 or 504 when no member
/// answered in time), or `None` when it came back without headers (a reset).
fn call_answer(num_headers: usize, body_size: usize) -> Option<(u16, Vec<u8>)> {
    if num_headers == 0 {
        return None;
    }
    let status = abi::header(Map::CallResponse, ":status").ok()??;
    let status = std::str::from_utf8(&status).ok()?.parse().ok()?;
    let body = abi::buffer(Buffer::HttpCallResponseBody, body_size).unwrap_or_default();
    Some((status, body))
}

/// The request body Envoy buffered so far, up to `max` bytes, read in the effective context.
fn request_body(max: usize) -> Vec<u8> {
    abi::buffer(Buffer::RequestBody, max).unwrap_or_default()
}

impl Root {
    /// Does what a step says for a stream other than the one whose callback runs (from a
    /// tick, or an answer to a call the root sent for it).
    fn act_for(&mut self, configured: &Configured, stream: StreamRef, step: Step) {
        let (id, exchange) = stream;
        let publish_for = |exchange: &Weak<RefCell<Exchange>>| {
            if let Some(exchange) = exchange.upgrade() {
                if let Ok(mut exchange) = exchange.try_borrow_mut() {
                    publish(configured, &mut exchange);
                }
            }
        };
        match step {
            Step::Continue => {
                if abi::set_effective_context(id).is_ok() {
                    publish_for(&exchange);
                    let _ = abi::continue_request();
                }
            }
            Step::Reply(reply) => {
                if abi::set_effective_context(id).is_ok() {
                    publish_for(&exchange);
                    send(configured, &reply);
                }
            }
            Step::Pause => {
                if abi::set_effective_context(id).is_ok() {
                    publish_for(&exchange);
                }
                let polls = exchange
                    .upgrade()
                    .is_some_and(|e| e.try_borrow().is_ok_and(|e| e.polls()));
                if let Ok(mut waiting) = self.waiting.try_borrow_mut() {
                    if polls && !waiting.iter().any(|(waiting_id, _)| *waiting_id == id) {
                        waiting.push((id, exchange));
                    }
                }
            }
            Step::Call(call) => match dispatch(self.id, &call) {
                Ok(token) => {
                    self.calls.insert(token, (id, exchange));
                }
                Err(_) => self.answer_for(configured, (id, exchange), Err(AnswerError::NotSent)),
            },
        }
    }

    /// Hands a store answer to a stream the root sent the call for.
    fn answer_for(
        &mut self,
        configured: &Configured,
        stream: StreamRef,
        answer: Result<(u16, &[u8]), AnswerError>,
    ) {
        let Some(exchange) = stream.1.upgrade() else {
            return;
        };
        if abi::set_effective_context(stream.0).is_err() {
            return;
        }
        let Ok(mut borrowed) = exchange.try_borrow_mut() else {
            return;
        };
        let step = configured
            .run(|filter, env| borrowed.on_store_answer(filter, env, answer, request_body));
        drop(borrowed);
        self.act_for(configured, stream, step);
    }

    /// Sends the fleet writes that are due; one that cannot be sent now waits its backoff.
    fn send_writes(&mut self, configured: &Configured) {
        let room = MAX_WRITES_IN_FLIGHT.saturating_sub(self.sent.len());
        let Ok(due) = self
            .writes
            .try_borrow_mut()
            .map(|mut writes| writes.take_due(abi::now(), room))
        else {
            return;
        };
        for mut write in due {
            match dispatch(self.id, &write.call()) {
                Ok(token) => {
                    self.sent.insert(token, write);
                }
                Err(_) => configured.run(|filter, env| {
                    if filter.on_fleet_write_answer(env, &mut write, None) {
                        queue(&self.writes, filter, env, write);
                    }
                }),
            }
        }
    }
}

impl Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(configured) = self.configured.clone() else {
            return;
        };
        let answer = call_answer(num_headers, body_size);
        if let Some(stream) = self.calls.remove(&token_id) {
            let answer = answer
                .as_ref()
                .map(|(status, body)| (*status, body.as_slice()))
                .ok_or(AnswerError::NoAnswer);
            self.answer_for(&configured, stream, answer);
            return;
        }
        let Some(mut write) = self.sent.remove(&token_id) else {
            return;
        };
        configured.run(|filter, env| {
            let answer = answer
                .as_ref()
                .map(|(status, body)| (*status, body.as_slice()));
            if filter.on_fleet_write_answer(env, &mut write, answer) {
                queue(&self.writes, filter, env, write);
            }
        });
    }

    fn on_done(&mut self) -> bool {
        if let Some(configured) = self.configured.take() {
            let mut telemetry = Telemetry::default();
            telemetry.move_gauge(configured.filter.instance.vms, -1);
            configured.report(&mut telemetry);
            configured.flush();
        }
        true
    }
}

impl Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let name = abi::property(&["plugin_name"])
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let bytes = abi::buffer(Buffer::PluginConfiguration, usize::MAX).unwrap_or_default();
        let mut telemetry = Telemetry::default();
        let configured = Filter::configure(
            &name,
            &bytes,
            &SharedData,
            random_seed(),
            abi::now(),
            &mut telemetry,
        );
        let filter = match configured {
            Ok(filter) => filter,
            Err(message) => {
                log(Level::Error, &name, &message);
                return false;
            }
        };
        let configured = Rc::new(Configured::new(filter));
        if self.configured.is_none() {
            telemetry.move_gauge(configured.filter.instance.vms, 1);
        }
        configured.report(&mut telemetry);
        let period = configured.filter.tick_period();
        match abi::set_tick_period(period.map_or(METRICS_FLUSH, |p| p.min(METRICS_FLUSH))) {
            Ok(()) => configured.ticking.set(true),
            Err(status) => log(
                Level::Error,
                &name,
                &format!("cannot set a timer ({status:?}): request bodies will wait without a deadline, and counters are handed to Envoy at every request"),
            ),
        }
        if period.is_some() {
            self.sweeper = Some(configured.filter.sweeper(random_u64()));
        }
        if let Some(replaced) = self.configured.replace(configured) {
            replaced.flush();
            self.replaced.push(Rc::downgrade(&replaced));
        }
        true
    }

    fn on_tick(&mut self) {
        let Some(configured) = self.configured.clone() else {
            return;
        };
        self.send_writes(&configured);
        let waiting = Rc::clone(&self.waiting);
        let due = configured.run(|filter, env| {
            if let Some(sweeper) = &mut self.sweeper {
                filter.tick(env, sweeper);
            }
            let mut due: Vec<(StreamRef, Step)> = Vec::new();
            let Ok(mut waiting) = waiting.try_borrow_mut() else {
                return Vec::new();
            };
            waiting.retain(|(id, exchange)| {
                let Some(strong) = exchange.upgrade() else {
                    return false;
                };
                let Ok(mut borrowed) = strong.try_borrow_mut() else {
                    return true;
                };
                if due.len() == REPLIES_PER_TICK || abi::set_effective_context(*id).is_err() {
                    return true;
                }
                match borrowed.on_tick(filter, env, request_body) {
                    Some(step) => {
                        due.push(((*id, Weak::clone(exchange)), step));
                        false
                    }
                    None => borrowed.polls(),
                }
            });
            due
        });
        for (stream, step) in due {
            self.act_for(&configured, stream, step);
        }
        configured.flush();
        self.replaced.retain(|replaced| {
            replaced
                .upgrade()
                .inspect(|replaced| replaced.flush())
                .is_some()
        });
    }

    /// A stream of this root's configuration; an unconfigured VM's passes everything.
    fn create_http_context(&self, context_id: u32) -> Stream {
        count(Call::OnContextCreate);
        Stream {
            id: context_id,
            configured: self.configured.clone(),
            exchange: Rc::default(),
            waiting: Rc::clone(&self.waiting),
            writes: Rc::clone(&self.writes),
        }
    }
}

/// Puts the stream's new decisions in Envoy's filter state, in the stream's context, before
/// its reply or its access log: a decision that cannot be published is still in the header.
fn publish(configured: &Configured, exchange: &mut Exchange) {
    if let Some(decisions) = exchange.unpublished_decisions() {
        let _ = abi::set_filter_state(configured.filter.decision_state(), decisions.as_bytes());
    }
}

/// Queues a fleet write for the root to send. The queue is never borrowed twice (nothing
/// queues while a tick takes from it); were it ever, the write would be lost, not trap.
fn queue(writes: &Writes, filter: &Filter, env: &mut Env<'_, SharedData>, write: FleetWrite) {
    if let Ok(mut writes) = writes.try_borrow_mut() {
        filter.queue_fleet_write(env, &mut writes, write);
    }
}

/// Sends a local reply; a reply that cannot be sent is logged, and the stream stays paused.
fn send(configured: &Configured, reply: &Reply) {
    if let Err(status) = abi::send_local_response(reply) {
        log(
            Level::Error,
            &configured.filter.instance.name,
            &format!("cannot send a {} reply: status {status:?}", reply.status),
        );
    }
}

struct Stream {
    id: u32,
    configured: Option<Rc<Configured>>,
    exchange: Rc<RefCell<Exchange>>,
    waiting: Waiting,
    writes: Writes,
}

impl Stream {
    /// The fleet store answered the call the exchange asked for: the paused request goes on,
    /// is answered, or waits for the next call.
    fn on_http_call_response(
        &self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let answer = call_answer(num_headers, body_size);
        let action = self.step(|exchange, filter, env| {
            let answer = answer
                .as_ref()
                .map(|(status, body)| (*status, body.as_slice()))
                .ok_or(AnswerError::NoAnswer);
            exchange.on_store_answer(filter, env, answer, request_body)
        });
        if action == Action::Continue {
            let _ = abi::continue_request();
        }
    }
}

impl Stream {
    /// Runs `call` on the exchange, then does what it says.
    fn step(
        &self,
        call: impl FnOnce(&mut Exchange, &Filter, &mut Env<'_, SharedData>) -> Step,
    ) -> Action {
        let Some(configured) = &self.configured else {
            return Action::Continue;
        };
        // Envoy defers what a callback asks for, so the exchange is never borrowed twice;
        // were it ever, the stream passes rather than trapping.
        let Ok(mut exchange) = self.exchange.try_borrow_mut() else {
            return Action::Continue;
        };
        let step = configured.run(|filter, env| call(&mut exchange, filter, env));
        publish(configured, &mut exchange);
        let waiting = exchange.polls();
        drop(exchange);
        self.act(configured, step, waiting)
    }

    /// Does what a step says; `waiting`: the exchange is to be polled at each tick.
    fn act(&self, configured: &Configured, step: Step, waiting: bool) -> Action {
        match step {
            Step::Continue => Action::Continue,
            Step::Pause => {
                if waiting {
                    self.watch();
                }
                Action::Pause
            }
            Step::Reply(reply) => {
                send(configured, &reply);
                Action::Pause
            }
            Step::Call(call) => match dispatch(self.id, &call) {
                Ok(_) => Action::Pause,
                Err(_) => self.step(|exchange, filter, env| {
                    exchange.on_store_answer(filter, env, Err(AnswerError::NotSent), request_body)
                }),
            },
        }
    }

    fn watch(&self) {
        if let Ok(mut waiting) = self.waiting.try_borrow_mut() {
            if !waiting.iter().any(|(id, _)| *id == self.id) {
                waiting.push((self.id, Rc::downgrade(&self.exchange)));
            }
        }
    }
}

/// Reports the tally when the stream's last callback returns, however it returns.
#[cfg(feature = "host-calls")]
struct Report;

#[cfg(feature = "host-calls")]
impl Drop for Report {
    fn drop(&mut self) {
        tally::report();
    }
}

/// The response, read from Envoy only when the exchange asks; once the whole map was read,
/// single headers come from it rather than from another hostcall.
#[derive(Default)]
struct EnvoyResponse {
    map: RefCell<Option<HeaderMap>>,
}

type HeaderMap = Vec<(String, Vec<u8>)>;

impl EnvoyResponse {
    fn kept_header(&self, name: &str) -> Option<Option<Vec<u8>>> {
        let map = self.map.try_borrow().ok()?;
        let map = map.as_ref()?;
        Some(
            map.iter()
                .find(|(n, _)| n == name)
                .map(|(_, value)| value.clone()),
        )
    }
}

impl ResponseView for EnvoyResponse {
    fn status(&self) -> Option<u16> {
        let status = self.header(":status")?;
        std::str::from_utf8(&status).ok()?.parse().ok()
    }

    fn via_upstream(&self) -> bool {
        via_upstream()
    }

    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let map = abi::headers(Map::Response).unwrap_or_default();
        if let Ok(mut kept) = self.map.try_borrow_mut() {
            *kept = Some(map.clone());
        }
        map
    }

    fn header(&self, name: &str) -> Option<Vec<u8>> {
        match self.kept_header(name) {
            Some(value) => value,
            None => abi::header(Map::Response, name).ok()?,
        }
    }
}

fn via_upstream() -> bool {
    abi::property(&["response", "code_details"])
        .ok()
        .flatten()
        .is_some_and(|details| details == b"via_upstream")
}

impl Stream {
    fn on_http_request_headers(&self, _num_headers: usize, end_of_stream: bool) -> Action {
        count(Call::OnRequestHeaders);
        #[cfg(feature = "fault-injection")]
        if abi::header(Map::Request, "x-resilience-fault")
            .ok()
            .flatten()
            .is_some_and(|value| value == b"trap")
        {
            core::arch::wasm32::unreachable();
        }
        let Some(configured) = self.configured.clone() else {
            return Action::Continue;
        };
        let request = configured.request_info();
        self.step(|exchange, filter, env| {
            exchange.on_request_headers(filter, env, request, end_of_stream)
        })
    }

    fn on_http_request_body(&self, body_size: usize, end_of_stream: bool) -> Action {
        count(Call::OnRequestBody);
        self.step(|exchange, filter, env| {
            exchange.on_request_body(filter, env, body_size, end_of_stream, |max| {
                abi::buffer(Buffer::RequestBody, max).unwrap_or_default()
            })
        })
    }

    fn on_http_request_trailers(&self, _num_trailers: usize) -> Action {
        count(Call::OnRequestTrailers);
        self.step(|exchange, filter, env| {
            exchange.on_request_trailers(filter, env, |max| {
                abi::buffer(Buffer::RequestBody, max).unwrap_or_default()
            })
        })
    }

    fn on_http_response_headers(&self, _num_headers: usize, end_of_stream: bool) -> Action {
        count(Call::OnResponseHeaders);
        let (Some(configured), Ok(mut exchange)) =
            (&self.configured, self.exchange.try_borrow_mut())
        else {
            return Action::Continue;
        };
        let edits = exchange.on_response_headers(
            &configured.filter,
            &EnvoyResponse::default(),
            end_of_stream,
        );
        for (name, value) in edits.added {
            let _ = abi::add_header(Map::Response, name, value.as_bytes());
        }
        // Removed first: Envoy's replace sets only the first of several lines.
        if let Some((name, decisions)) = edits.decision {
            let _ = abi::remove_header(Map::Response, name);
            if let Some(decisions) = decisions {
                let _ = abi::add_header(Map::Response, name, decisions.as_bytes());
            }
        }
        if exchange.judged_at_start() {
            configured.run(|filter, env| {
                exchange.judge_start(filter, env, &EnvoyResponse::default(), end_of_stream);
            });
        }
        Action::Continue
    }

    fn on_http_response_body(&self, body_size: usize, end_of_stream: bool) -> Action {
        count(Call::OnResponseBody);
        if let (Some(configured), Ok(mut exchange)) =
            (&self.configured, self.exchange.try_borrow_mut())
        {
            if exchange.holds_claim() {
                let chunk = abi::buffer(Buffer::ResponseBody, body_size).unwrap_or_default();
                exchange.on_response_body(&configured.filter, &chunk, end_of_stream);
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&self, _num_trailers: usize) -> Action {
        count(Call::OnResponseTrailers);
        if let Ok(mut exchange) = self.exchange.try_borrow_mut() {
            exchange.on_response_trailers();
        }
        // gRPC clients read the filter's decisions as trailing metadata (its refusals are
        // trailers-only): no upstream may put the header there either.
        if let Some(name) = self
            .configured
            .as_ref()
            .and_then(|c| c.filter.decision_header())
        {
            let _ = abi::remove_header(Map::ResponseTrailers, name);
        }
        Action::Continue
    }

    fn on_log(&self) {
        count(Call::OnLog);
        #[cfg(feature = "host-calls")]
        let _report = Report;
        let (Some(configured), Ok(mut exchange)) =
            (&self.configured, self.exchange.try_borrow_mut())
        else {
            return;
        };
        // Decisions made while the stream waited on a call the root sent: the last chance,
        // for the filters and loggers that read the state after this one.
        publish(configured, &mut exchange);
        if !exchange.holds_loans() {
            exchange.end();
            return;
        }
        let grpc_response = exchange.grpc_response();
        let needs_upstream_host = exchange.holds_claim();
        let judged = exchange.judges_outcome(&configured.filter);
        configured.run(|filter, env| {
            let write = exchange.finish(filter, env, || {
                if !judged {
                    return Completion::default();
                }
                Completion {
                    // Envoy reports a grpc-status that is missing or not a code as -1; a gRPC
                    // client takes it as UNKNOWN.
                    grpc_status: grpc_response.then(|| {
                        abi::int_property(&["response", "grpc_status"])
                            .and_then(|code| GrpcStatus::from_code(i64::try_from(code).ok()?))
                            .unwrap_or(GrpcStatus::UNKNOWN)
                    }),
                    status: abi::int_property(&["response", "code"])
                        .and_then(|code| u16::try_from(code).ok())
                        .filter(|&code| code > 0),
                    flags: abi::int_property(&["response", "flags"]).unwrap_or(0),
                    via_upstream: via_upstream(),
                    upstream_host: needs_upstream_host
                        && abi::property(&["upstream", "address"])
                            .is_ok_and(|address| address.is_some_and(|a| !a.is_empty())),
                    ..Completion::default()
                }
            });
            if let Some(write) = write {
                queue(&self.writes, filter, env, write);
            }
        });
    }
}
