//! The rate-limit policy: every matching rule applies, and a request refused by one rule
//! takes no tokens from the others.
//!
//! A global rule may have to ask etcd for tokens (`global.rs`): the admission then stops at
//! that rule and the pipeline resumes it with etcd's answer, or at its next tick when the
//! request waits for another worker's grant.

use super::config::{Global, KeyPart, MissingKey, RateLimitConfig, Rule};
use super::global::{self, AskStep, Asking, Granted, Lease, Taking};
use super::table::{admit, refund, Slot};
use crate::clock::{ceil_secs, retry_after_secs, Instant};
use crate::decision::Decision;
use crate::etcd::{self, AnswerError, Expected, StoreCall, Swapped};
use crate::hashing::{fleet_place, KeyHasher};
use crate::policy::{Env, Needs};
use crate::reply::{Refusal, Reply, QUOTA_EXCEEDED};
use crate::request::{Field, KeyBuilder, RequestInfo};
use crate::store::{self, FailureMode, Namespace, Store};
use crate::telemetry::{Catalog, Level, MetricId};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::time::Duration;

pub struct RateLimit {
    config: RateLimitConfig,
    hasher: KeyHasher,
    /// Per rule, in configuration order.
    metrics: Vec<RuleMetrics>,
    /// Per rule: the shared-data key of its slots, but for the slot's index.
    slot_prefixes: Vec<String>,
}

struct RuleMetrics {
    allowed: MetricId,
    limited: MetricId,
    shadow_limited: MetricId,
    /// Global rules only: transactions sent to etcd, and grants etcd did not answer.
    store_calls: Option<MetricId>,
    store_unavailable: Option<MetricId>,
}

/// Headers an admitted request carries to its response: the tightest rule's state.
pub type ResponseHeaders = Vec<(String, String)>;

/// One request's way through the rules. Tokens are spent, not lent: a request that a later
/// stage refuses still counted against its client's rate, as with Envoy's `local_ratelimit`;
/// only a later rule's refusal gives back what earlier rules took.
#[derive(Debug, Default)]
pub struct Admission {
    /// The next rule to decide.
    next: usize,
    taken: Vec<Taken>,
    /// The admitted rule with the fewest tokens left, for the `RateLimit` header.
    tightest: Option<Quota>,
    pending: Option<Pending>,
    /// Once every rule admitted the request: what its response carries.
    headers: ResponseHeaders,
}

impl Admission {
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Whether the admission waits for etcd's answer to its grant.
    pub fn asks(&self) -> bool {
        matches!(
            self.pending,
            Some(Pending {
                kind: Kind::Ask { .. },
                ..
            })
        )
    }

    /// Whether the admission waits for another worker's grant, to be polled at each tick.
    pub fn waits(&self) -> bool {
        matches!(
            self.pending,
            Some(Pending {
                kind: Kind::Wait,
                ..
            })
        )
    }
}

/// A token taken that must be given back if a later rule refuses the request.
#[derive(Debug)]
struct Taken {
    rule: usize,
    from: Source,
    partition: Option<u64>,
}

/// One rule's state as the `RateLimit` header shows it; formatted only if it is sent.
#[derive(Clone, Copy, Debug)]
struct Quota {
    rule: usize,
    remaining: u64,
    /// Until another token is there; `None` when the bucket is full and none is coming.
    more_in: Option<Duration>,
    partition: Option<u64>,
}

#[derive(Debug)]
enum Source {
    /// A local rule's slot, drawn as `holder`'s bucket.
    Slot { key: String, holder: u64 },
    /// This Envoy's lease of a global bucket, from the grant `grant`.
    Lease { key: String, owner: u64, grant: u64 },
    /// A grant for this request alone: what is not spent of it goes back to nobody.
    Grant,
}

/// A global rule the admission stopped at.
#[derive(Debug)]
struct Pending {
    lease_key: String,
    owner: u64,
    /// When the rule started waiting: all its waiting together takes at most the timeout.
    since: Instant,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// Another worker's grant is on its way to the lease.
    Wait,
    /// This request's grant; `lease`: it refills the lease (else it is for this request).
    Ask { lease: bool, asking: Asking },
}

/// Where an admission stands.
#[derive(Debug, PartialEq, Eq)]
pub enum RateStep {
    /// Every rule decided: `Ok` when all admitted (the headers are in the [`Admission`]).
    Done(Result<(), Reply>),
    /// Send this to etcd and hand its answer to [`RateLimit::on_answer`].
    Call(StoreCall),
    /// Ask again at the next tick, with [`RateLimit::on_tick`].
    Wait,
}

/// What one rule decided.
enum Outcome {
    Admitted {
        remaining: u64,
        more_in: Option<Duration>,
        from: Source,
    },
    Refused {
        remaining: u64,
        more_in: Option<Duration>,
        retry_after: Duration,
    },
    /// The rule could not decide and its failure mode lets the request through.
    Skipped,
    /// The rule could not decide and its failure mode refuses the request.
    Failed(Reply),
}

/// How a rule's decision went, when it did not decide at once.
enum Flow {
    Decided(Outcome),
    Call(StoreCall),
    Wait,
}

impl RateLimit {
    pub fn new(
        config: RateLimitConfig,
        hasher: KeyHasher,
        catalog: &mut Catalog,
        namespace: &Namespace,
    ) -> Self {
        let slot_prefixes = config
            .rules
            .iter()
            .map(|rule| namespace.key(&format!("rl/{}/", rule.name)))
            .collect();
        let metrics = config
            .rules
            .iter()
            .map(|rule| {
                let mut counter =
                    |what: &str| catalog.counter(&format!("rate_limit.{}.{what}", rule.name));
                RuleMetrics {
                    allowed: counter("allowed"),
                    limited: counter("limited"),
                    shadow_limited: counter("shadow_limited"),
                    store_calls: rule.global.map(|_| counter("store_calls")),
                    store_unavailable: rule.global.map(|_| counter("store_unavailable")),
                }
            })
            .collect();
        Self {
            config,
            hasher,
            metrics,
            slot_prefixes,
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    pub fn needs(&self) -> Needs {
        let keyed = self.config.rules.iter().flat_map(|rule| {
            rule.key.iter().filter_map(|part| match part {
                KeyPart::Header(name) => Some(name.as_str()),
                _ => None,
            })
        });
        let matched = self
            .config
            .rules
            .iter()
            .flat_map(|rule| rule.matcher.header_names());
        let forwarded = (self.config.trusted_hops > 0).then_some("x-forwarded-for");
        let request_line = self.config.rules.iter().any(|rule| {
            rule.shadow
                || rule.matcher.reads_request_line()
                || rule
                    .key
                    .iter()
                    .any(|part| matches!(part, KeyPart::Method | KeyPart::Path))
        });
        Needs {
            request: true,
            request_line,
            headers: keyed
                .chain(matched)
                .chain(forwarded)
                .map(str::to_owned)
                .collect(),
            peer: self
                .config
                .rules
                .iter()
                .any(|rule| rule.key.contains(&KeyPart::ClientAddress)),
            cluster: false,
        }
    }

    /// Decides the request against every rule, as far as it can without etcd.
    pub fn start<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
    ) -> (Admission, RateStep) {
        let mut admission = Admission::default();
        let step = self.run(env, request, &mut admission);
        (admission, step)
    }

    /// etcd's answer to the last [`RateStep::Call`].
    pub fn on_answer<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
        admission: &mut Admission,
        answer: Result<Swapped, AnswerError>,
    ) -> RateStep {
        let Some(pending) = &mut admission.pending else {
            return RateStep::Wait;
        };
        let Kind::Ask { asking, .. } = &mut pending.kind else {
            return RateStep::Wait;
        };
        let index = admission.next;
        let rule = &self.config.rules[index];
        let left = self.time_left(pending.since, env.now);
        match asking.answer(&rule.bucket, answer, env.now, left) {
            AskStep::Send => match self.send(env, index, asking, left) {
                Some(call) => RateStep::Call(call),
                None => self.resolve(env, request, admission, Granted::TooLate),
            },
            AskStep::Done(granted) => self.resolve(env, request, admission, granted),
        }
    }

    /// The stream ended while its grant was on its way: the lease is no longer marked as
    /// asking, so the next request asks rather than waits out the timeout. (Should the
    /// grant land, its tokens are lost: fewer admitted, never more.)
    pub fn abandon<S: Store>(&self, env: &mut Env<'_, S>, admission: &mut Admission) {
        let Some(pending) = admission.pending.take() else {
            return;
        };
        if !matches!(pending.kind, Kind::Ask { lease: true, .. }) {
            return;
        }
        let rule = &self.config.rules[admission.next];
        let now = env.now;
        let settled =
            store::settle::<Lease, _>(env.store, env.namespace(), &pending.lease_key, |current| {
                global::settle(current, pending.owner, now, rule.cost, &Granted::TooLate)
            });
        if let Err(err) = settled {
            env.store_failed(&format!("rate limit rule {:?} lease", rule.name), err);
        }
    }

    /// A tick while the admission waits for another worker's grant: decides again.
    pub fn on_tick<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
        admission: &mut Admission,
    ) -> RateStep {
        if !admission.waits() {
            return RateStep::Wait;
        }
        self.run(env, request, admission)
    }

    /// Decides rules from the admission's next one on.
    fn run<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
        admission: &mut Admission,
    ) -> RateStep {
        while let Some(rule) = self.config.rules.get(admission.next) {
            let key = rule
                .matcher
                .matches(request)
                .then(|| self.key(rule, request))
                .flatten();
            let Some(key) = key else {
                admission.next += 1;
                continue;
            };
            // A global rule's fleet has no secret to hash with: it names no partition.
            let partition = (!rule.key.is_empty() && rule.global.is_none())
                .then(|| self.hasher.partition(&key));
            let flow = match rule.global {
                None => Flow::Decided(self.decide_local(env, admission.next, &key)),
                Some(global) => self.decide_global(env, admission, &key, global),
            };
            let outcome = match flow {
                Flow::Decided(outcome) => outcome,
                Flow::Call(call) => return RateStep::Call(call),
                Flow::Wait => return RateStep::Wait,
            };
            if let Err(reply) = self.decided(env, request, admission, outcome, partition) {
                return RateStep::Done(Err(reply));
            }
            admission.next += 1;
        }
        self.admitted(env, admission);
        RateStep::Done(Ok(()))
    }

    /// A global rule's grant came back (or could not): the rule decides, and the rest follow.
    fn resolve<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
        admission: &mut Admission,
        granted: Granted,
    ) -> RateStep {
        let Some(pending) = admission.pending.take() else {
            return RateStep::Wait;
        };
        let lease = matches!(pending.kind, Kind::Ask { lease: true, .. });
        let outcome = self.granted(env, admission.next, &pending, lease, granted);
        if let Err(reply) = self.decided(env, request, admission, outcome, None) {
            return RateStep::Done(Err(reply));
        }
        admission.next += 1;
        self.run(env, request, admission)
    }

    fn decide_local<S: Store>(&self, env: &mut Env<'_, S>, index: usize, key: &[u8]) -> Outcome {
        let rule = &self.config.rules[index];
        let placement = self.hasher.place(key, rule.table_size);
        let mut slot_key = self.slot_prefixes[index].clone();
        slot_key.push_str(itoa::Buffer::new().format(placement.index));
        let now = env.now;
        let updated = store::update::<Slot, _>(
            env.store,
            env.namespace(),
            &slot_key,
            env.settings().max_attempts,
            |slot| {
                let (check, holder, next) =
                    admit(&rule.bucket, slot, placement.owner, now, rule.cost);
                ((check, holder), next)
            },
        );
        let (check, holder) = match updated {
            Ok(updated) => {
                env.conflicts(updated.conflicts);
                updated.decision
            }
            Err(err) => return self.shared_data_failed(env, rule, err),
        };
        if check.admitted {
            Outcome::Admitted {
                remaining: check.remaining,
                more_in: (!check.more_in.is_zero()).then_some(check.more_in),
                from: Source::Slot {
                    key: slot_key,
                    holder,
                },
            }
        } else {
            Outcome::Refused {
                remaining: check.remaining,
                more_in: (!check.more_in.is_zero()).then_some(check.more_in),
                retry_after: check.retry_after,
            }
        }
    }

    /// A global rule: spends from this Envoy's lease, or asks etcd, or waits for a grant.
    fn decide_global<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        admission: &mut Admission,
        key: &[u8],
        global: Global,
    ) -> Flow {
        let index = admission.next;
        let rule = &self.config.rules[index];
        let Some(store) = &self.config.store else {
            return Flow::Decided(Outcome::Skipped);
        };
        let place = self.hasher.place(key, rule.table_size);
        let lease_key = env
            .namespace()
            .key(&format!("rlg/{}/{}", rule.name, place.index));
        let fleet = fleet_place(&fleet_scoped(&rule.name, key), rule.table_size);
        let now = env.now;
        let updated = store::update::<Lease, _>(
            env.store,
            env.namespace(),
            &lease_key,
            env.settings().max_attempts,
            |lease| {
                global::take(
                    lease,
                    fleet.owner,
                    now,
                    rule.cost,
                    global.chunk,
                    store.timeout,
                )
            },
        );
        let taking = match updated {
            Ok(updated) => {
                env.conflicts(updated.conflicts);
                updated.decision
            }
            Err(err) => return Flow::Decided(self.shared_data_failed(env, rule, err)),
        };
        let since = admission.pending.as_ref().map_or(now, |p| p.since);
        let mut pending = Pending {
            lease_key,
            owner: fleet.owner,
            since,
            kind: Kind::Wait,
        };
        match taking {
            Taking::Spent {
                left,
                more_in,
                grant,
            } => Flow::Decided(Outcome::Admitted {
                remaining: left,
                more_in: Some(more_in),
                from: Source::Lease {
                    key: pending.lease_key,
                    owner: pending.owner,
                    grant,
                },
            }),
            Taking::Refused {
                retry_after,
                more_in,
            } => Flow::Decided(Outcome::Refused {
                remaining: 0,
                // No more quota reaches this Envoy before it may ask etcd again.
                more_in: Some(more_in.max(retry_after)),
                retry_after,
            }),
            Taking::Unavailable => {
                Flow::Decided(self.unavailable(env, index, AnswerError::NoAnswer))
            }
            Taking::Wait if self.time_left(since, now) < global::MIN_CALL_TIME => {
                admission.pending = None;
                Flow::Decided(self.unavailable(env, index, AnswerError::NoAnswer))
            }
            Taking::Wait => {
                admission.pending = Some(pending);
                Flow::Wait
            }
            Taking::Ask { ask, lease, seen } => {
                let mut asking = Asking {
                    key: format!(
                        "{}{}/rl/{}/{}",
                        store.prefix, env.instance.name, rule.name, fleet.index
                    )
                    .into_bytes(),
                    owner: fleet.owner,
                    ask,
                    cost: rule.cost,
                    reserve: global.chunk,
                    calls: 0,
                    writer: (env.random)(),
                    in_doubt: false,
                    expected: Expected::Absent,
                    value: Vec::new(),
                    grant: None,
                };
                let left = self.time_left(since, now);
                match asking.start(&rule.bucket, seen, now) {
                    AskStep::Done(granted) => {
                        admission.pending = None;
                        Flow::Decided(self.granted(env, index, &pending, lease, granted))
                    }
                    AskStep::Send => match self.send(env, index, &mut asking, left) {
                        Some(call) => {
                            pending.kind = Kind::Ask { lease, asking };
                            admission.pending = Some(pending);
                            Flow::Call(call)
                        }
                        None => {
                            admission.pending = None;
                            let granted = Granted::TooLate;
                            Flow::Decided(self.granted(env, index, &pending, lease, granted))
                        }
                    },
                }
            }
        }
    }

    /// The call for an ask's next transaction, if there is time left for one.
    fn send<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        index: usize,
        asking: &mut Asking,
        left: Duration,
    ) -> Option<StoreCall> {
        let store = self.config.store.as_ref()?;
        if left < global::MIN_CALL_TIME {
            return None;
        }
        asking.calls += 1;
        if let Some(calls) = self.metrics[index].store_calls {
            env.telemetry.increment(calls);
        }
        Some(StoreCall {
            cluster: store.cluster.clone(),
            authority: store.authority.clone(),
            path: etcd::TXN_PATH,
            body: etcd::swap(&asking.key, &asking.expected, &asking.value),
            timeout: left,
        })
    }

    fn time_left(&self, since: Instant, now: Instant) -> Duration {
        let timeout = self
            .config
            .store
            .as_ref()
            .map_or(Duration::ZERO, |s| s.timeout);
        timeout.saturating_sub(now.saturating_since(since))
    }

    /// What a grant means for the request, once written into the lease it refills.
    fn granted<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        index: usize,
        pending: &Pending,
        lease: bool,
        granted: Granted,
    ) -> Outcome {
        let rule = &self.config.rules[index];
        let now = env.now;
        let left = if lease {
            let settled = store::settle::<Lease, _>(
                env.store,
                env.namespace(),
                &pending.lease_key,
                |current| global::settle(current, pending.owner, now, rule.cost, &granted),
            );
            match settled {
                Ok(updated) => {
                    env.conflicts(updated.conflicts);
                    updated.decision
                }
                Err(err) => {
                    env.store_failed(&format!("rate limit rule {:?} lease", rule.name), err);
                    0
                }
            }
        } else {
            match granted {
                Granted::Tokens { grant, .. } => grant.granted.saturating_sub(rule.cost),
                _ => 0,
            }
        };
        match granted {
            Granted::Tokens { grant, writer, .. } => Outcome::Admitted {
                remaining: left,
                more_in: Some(grant.more_in),
                from: if lease {
                    Source::Lease {
                        key: pending.lease_key.clone(),
                        owner: pending.owner,
                        grant: writer,
                    }
                } else {
                    Source::Grant
                },
            },
            Granted::Empty { grant, .. } => Outcome::Refused {
                remaining: 0,
                more_in: Some(grant.more_in.max(grant.retry_after)),
                retry_after: grant.retry_after,
            },
            Granted::Unavailable(err) => self.unavailable(env, index, err),
            Granted::TooLate => self.unavailable(env, index, AnswerError::Contended),
        }
    }

    /// etcd gave no usable answer in time: the store's `on_store_error` decides.
    fn unavailable<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        index: usize,
        err: AnswerError,
    ) -> Outcome {
        let rule = &self.config.rules[index];
        if let Some(unavailable) = self.metrics[index].store_unavailable {
            env.telemetry.increment(unavailable);
        }
        if rule.shadow {
            return Outcome::Skipped;
        }
        env.telemetry.log(
            Level::Warn,
            format!(
                "rate limit rule {:?}: etcd gave no grant ({err:?})",
                rule.name
            ),
        );
        let mode = self
            .config
            .store
            .as_ref()
            .map_or(FailureMode::Allow, |store| store.on_store_error);
        match mode {
            FailureMode::Allow => Outcome::Skipped,
            FailureMode::Deny => {
                let mut reply = Reply::unavailable("rate_limit");
                reply
                    .headers
                    .push(("retry-after".to_owned(), b"1".to_vec()));
                Outcome::Failed(reply)
            }
        }
    }

    fn shared_data_failed<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        rule: &Rule,
        err: store::StoreError,
    ) -> Outcome {
        let what = format!("rate limit rule {:?}", rule.name);
        match env.admission_failed("rate_limit", &what, err, rule.shadow) {
            Ok(()) => Outcome::Skipped,
            Err(reply) => Outcome::Failed(reply),
        }
    }

    /// Records one rule's decision; a refusal gives back what earlier rules took.
    fn decided<S: Store>(
        &self,
        env: &mut Env<'_, S>,
        request: &RequestInfo,
        admission: &mut Admission,
        outcome: Outcome,
        partition: Option<u64>,
    ) -> Result<(), Reply> {
        admission.pending = None;
        let index = admission.next;
        let rule = &self.config.rules[index];
        let metrics = &self.metrics[index];
        match outcome {
            Outcome::Admitted {
                remaining,
                more_in,
                from,
            } => {
                // A shadow rule is a trial: a client following the RateLimit headers must
                // never back off for it, nor learn it exists.
                if !rule.shadow
                    && admission
                        .tightest
                        .is_none_or(|tightest| remaining < tightest.remaining)
                {
                    admission.tightest = Some(Quota {
                        rule: index,
                        remaining,
                        more_in,
                        partition,
                    });
                }
                admission.taken.push(Taken {
                    rule: index,
                    from,
                    partition,
                });
                Ok(())
            }
            Outcome::Skipped => Ok(()),
            Outcome::Refused { .. } if rule.shadow => {
                env.telemetry.increment(metrics.shadow_limited);
                env.telemetry
                    .would_refuse(Decision::new("rate_limit", "limited").of("rule", &rule.name));
                env.telemetry.log(
                    Level::Info,
                    format!(
                        "shadow rule {:?} would refuse {} {}",
                        rule.name, request.method, request.path
                    ),
                );
                Ok(())
            }
            Outcome::Refused {
                remaining,
                more_in,
                retry_after,
            } => {
                env.telemetry.increment(metrics.limited);
                self.give_back(env, admission);
                let own = vec![
                    (
                        "retry-after".to_owned(),
                        retry_after_secs(retry_after).to_string(),
                    ),
                    ("ratelimit-policy".to_owned(), policy_item(rule, partition)),
                    (
                        "ratelimit".to_owned(),
                        self.quota_item(&Quota {
                            rule: index,
                            remaining,
                            more_in,
                            partition,
                        }),
                    ),
                ];
                Err(Reply::configured(
                    &self.config.limited_response,
                    own,
                    "resilience_rate_limited",
                    Refusal {
                        problem_type: QUOTA_EXCEEDED,
                        title: "Quota exceeded",
                        detail: format!("rate limited by rule {}", rule.name),
                        violated_policies: &[&rule.name],
                        decision: Decision::new("rate_limit", "limited").of("rule", &rule.name),
                    },
                ))
            }
            Outcome::Failed(reply) => {
                self.give_back(env, admission);
                Err(reply)
            }
        }
    }

    /// Every rule admitted the request: counts it, and sets the response's headers.
    fn admitted<S: Store>(&self, env: &mut Env<'_, S>, admission: &mut Admission) {
        // Counted once the request passed every rule: a token refunded was not an admission.
        for taken in &admission.taken {
            env.telemetry.increment(self.metrics[taken.rule].allowed);
        }
        if let (Some(tightest), true) = (admission.tightest.take(), self.config.headers_on_allowed)
        {
            let policies: Vec<String> = admission
                .taken
                .iter()
                .map(|t| (&self.config.rules[t.rule], t.partition))
                .filter(|(rule, _)| !rule.shadow)
                .map(|(rule, partition)| policy_item(rule, partition))
                .collect();
            admission.headers = vec![
                ("ratelimit-policy".to_owned(), policies.join(", ")),
                ("ratelimit".to_owned(), self.quota_item(&tightest)),
            ];
        }
        admission.taken.clear();
    }

    /// A `RateLimit` item (draft-ietf-httpapi-ratelimit-headers-10, section 4): the tokens
    /// left and, unless the bucket is full, the seconds until another one is there.
    fn quota_item(&self, quota: &Quota) -> String {
        let rule = &self.config.rules[quota.rule];
        let mut item = String::with_capacity(rule.name.len() + 64);
        item.push('"');
        item.push_str(&rule.name);
        item.push_str("\";r=");
        item.push_str(itoa::Buffer::new().format(quota.remaining));
        if let Some(more_in) = quota.more_in {
            item.push_str(";t=");
            item.push_str(itoa::Buffer::new().format(ceil_secs(more_in)));
        }
        push_partition(&mut item, quota.partition);
        item
    }

    /// Refunds what earlier rules took for a request that will not go ahead. It retries until
    /// it lands: a lost refund would leave a client with fewer tokens than it is owed.
    fn give_back<S: Store>(&self, env: &mut Env<'_, S>, admission: &mut Admission) {
        let now = env.now;
        for taken in admission.taken.drain(..) {
            let rule = &self.config.rules[taken.rule];
            let refunded = match &taken.from {
                Source::Slot { key, holder } => {
                    store::settle::<Slot, _>(env.store, env.namespace(), key, |slot| {
                        ((), refund(&rule.bucket, slot, *holder, rule.cost))
                    })
                }
                Source::Lease { key, owner, grant } => {
                    store::settle::<Lease, _>(env.store, env.namespace(), key, |lease| {
                        ((), global::refund(lease, *owner, *grant, now, rule.cost))
                    })
                }
                Source::Grant => continue,
            };
            match refunded {
                Ok(updated) => env.conflicts(updated.conflicts),
                Err(err) => {
                    env.store_failed(&format!("rate limit rule {:?} refund", rule.name), err)
                }
            }
        }
    }

    /// The rule's bucket key for this request. `None`: the rule does not apply.
    ///
    /// A key header sent on several lines is ambiguous (which line would the upstream take?):
    /// every such request shares one bucket of the rule, whatever `on_missing_key` says, so
    /// rotating a first line buys no fresh bucket.
    fn key(&self, rule: &Rule, request: &RequestInfo) -> Option<Vec<u8>> {
        let mut key = KeyBuilder::default();
        for part in &rule.key {
            let address;
            let value = match part {
                KeyPart::ClientAddress => {
                    address = request
                        .client_address(self.config.trusted_hops)
                        .map(crate::request::address_text);
                    address.as_deref().map(str::as_bytes)
                }
                KeyPart::Method => Some(request.method.as_bytes()),
                KeyPart::Path => Some(request.path.as_bytes()),
                KeyPart::Header(name) => match request.field(name) {
                    Field::One(value) => Some(value),
                    Field::Missing => None,
                    Field::Repeated => {
                        key.repeated();
                        continue;
                    }
                },
            };
            if value.is_none() && rule.on_missing_key == MissingKey::Skip {
                return None;
            }
            key.part(value);
        }
        Some(key.finish())
    }
}

/// A global rule's key as every Envoy places it: the rule's name, then the key.
fn fleet_scoped(rule: &str, key: &[u8]) -> Vec<u8> {
    let mut scoped = Vec::with_capacity(rule.len() + 1 + key.len());
    scoped.extend_from_slice(rule.as_bytes());
    scoped.push(0);
    scoped.extend_from_slice(key);
    scoped
}

/// A rule's `RateLimit-Policy` item (section 3), with its partition if it is keyed.
fn policy_item(rule: &Rule, partition: Option<u64>) -> String {
    let mut item = String::with_capacity(rule.policy_item.len() + PARTITION_PARAM_LEN);
    item.push_str(&rule.policy_item);
    push_partition(&mut item, partition);
    item
}

/// `;pk=:` + 12 base64 characters + `:`.
const PARTITION_PARAM_LEN: usize = 18;

/// `;pk=:…:`, the draft's partition key (a Byte Sequence): a keyed hash of the request's key,
/// the same for every request of one client, that shows nothing of the key itself.
fn push_partition(item: &mut String, partition: Option<u64>) {
    if let Some(pk) = partition {
        item.push_str(";pk=:");
        STANDARD.encode_string(pk.to_be_bytes(), item);
        item.push(':');
    }
}

#[cfg(test)]
mod tests;
