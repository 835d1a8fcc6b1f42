//! Global rules: one bucket for the whole fleet, kept in etcd and spent in leases of tokens.
//!
//! The bucket is the same GCRA state as a local rule's, in a bounded table of `table_size`
//! etcd keys per rule (same eviction rule as `table.rs`; keys placed by SHA-256, so every
//! Envoy finds a key's bucket in the same place). An Envoy takes up to `chunk` tokens at a
//! time with one compare-and-swap transaction, keeps them as a [`Lease`] in its shared data,
//! and spends them with one local compare-and-swap per request, as a local rule does. etcd
//! sees about one transaction per `chunk` requests, and two when another Envoy wrote the
//! bucket since this one last saw it.
//!
//! What holds exactly: a grant never hands out the bucket's last `chunk` tokens, and a lease
//! expires [`Bucket::grant`]'s `valid_until`; together, the tokens the fleet spends never
//! exceed the bucket's capacity plus its refill (see there for why). The price is bounded
//! under-admission: in a burst the fleet admits at least `capacity − chunk × (Envoys + 1)`
//! (each Envoy's last lease may go unspent), and a lease that expires unspent is lost, so
//! an Envoy asks for twice what it spent from its last lease when that lease ran out of time.

use super::bucket::{Bucket, Grant, Tat};
use super::table::{holding, Slot};
use crate::clock::Instant;
use crate::etcd::{AnswerError, Expected, Found, Swapped};
use crate::store::{decode, encode, DecodeError, Reader, Record};
use std::time::Duration;

/// How long an Envoy whose grant found etcd unavailable answers `on_store_error` at once,
/// without asking: during an outage requests are not each held for the timeout.
pub const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Transactions one grant may take: a lost race for the bucket costs one more.
const MAX_CALLS: u32 = 4;
/// The least time worth giving a call.
pub const MIN_CALL_TIME: Duration = Duration::from_millis(5);

/// This Envoy's lease on one global bucket, in shared data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// The fleet owner tag of the key whose bucket it is.
    pub owner: u64,
    /// Tokens left to spend.
    pub tokens: u64,
    /// Tokens spent from the current grant: what the next ask is sized by.
    pub spent: u64,
    /// Its tokens may be spent before this instant only.
    pub valid_until: Instant,
    /// A worker's grant is on its way until then: others wait for it rather than ask too.
    pub asking_until: Instant,
    /// etcd's bucket was empty: requests are refused here until then, without asking.
    pub refused_until: Instant,
    /// etcd did not answer: requests get `on_store_error` until then, without asking.
    pub unavailable_until: Instant,
    /// When the global bucket has another token, as of etcd's last answer.
    pub more_at: Instant,
    /// The ask whose grant the tokens came from: a token given back goes only to its grant.
    pub grant: u64,
    /// The latest time a request wrote the lease: a clock found well before it stepped back.
    pub stamp: Instant,
    /// The bucket as etcd last showed it, so that the next grant needs no read.
    pub seen: Option<Seen>,
}

/// How far before the lease's stamp a request's clock may read (workers read the clock at
/// slightly different moments) before it counts as a step back, which voids the lease.
const CLOCK_SLACK: Duration = Duration::from_secs(1);

/// A bucket as etcd showed it: its slot and the revision that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub revision: i64,
    pub slot: Slot,
}

impl Record for Lease {
    const FORMAT: u8 = 0x16;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        for word in [
            self.owner,
            self.tokens,
            self.spent,
            self.valid_until.as_nanos(),
            self.asking_until.as_nanos(),
            self.refused_until.as_nanos(),
            self.unavailable_until.as_nanos(),
            self.more_at.as_nanos(),
            self.grant,
            self.stamp.as_nanos(),
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        // A revision is positive: 0 says nothing was seen.
        let seen = self.seen.unwrap_or(Seen {
            revision: 0,
            slot: Slot {
                owner: 0,
                tat: Tat(0),
                ticks_per_ns: 0,
            },
        });
        out.extend_from_slice(&seen.revision.to_le_bytes());
        out.extend_from_slice(&seen.slot.owner.to_le_bytes());
        out.extend_from_slice(&seen.slot.tat.0.to_le_bytes());
        out.extend_from_slice(&seen.slot.ticks_per_ns.to_le_bytes());
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut instant = || fields.u64().map(Instant::from_nanos);
        let owner = instant()?.as_nanos();
        let tokens = instant()?.as_nanos();
        let spent = instant()?.as_nanos();
        let valid_until = instant()?;
        let asking_until = instant()?;
        let refused_until = instant()?;
        let unavailable_until = instant()?;
        let more_at = instant()?;
        let grant = instant()?.as_nanos();
        let stamp = instant()?;
        let revision = i64::from_le_bytes(fields.bytes()?);
        let slot = Slot {
            owner: fields.u64()?,
            tat: Tat(u128::from_le_bytes(fields.bytes()?)),
            ticks_per_ns: fields.u64()?,
        };
        if revision < 0 {
            return Err(DecodeError::Invalid);
        }
        Ok(Lease {
            owner,
            tokens,
            spent,
            valid_until,
            asking_until,
            refused_until,
            unavailable_until,
            more_at,
            grant,
            stamp,
            seen: (revision > 0).then_some(Seen { revision, slot }),
        })
    }
}

/// What a request found in its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taking {
    /// Spent from the lease (of grant `grant`), which holds `left` more.
    Spent {
        left: u64,
        more_in: Duration,
        grant: u64,
    },
    /// etcd's bucket was empty lately: refused without asking.
    Refused {
        retry_after: Duration,
        more_in: Duration,
    },
    /// etcd did not answer lately: `on_store_error` decides, without asking.
    Unavailable,
    /// Another worker's grant is on its way: wait for it.
    Wait,
    /// Ask etcd for `ask` tokens. `lease`: the lease is this request's to refill (it marked
    /// it as asking); otherwise another key holds the slot and the grant is for this
    /// request alone.
    Ask {
        ask: u64,
        lease: bool,
        seen: Option<Seen>,
    },
}

/// A lease is somebody's while it holds tokens it may spend, or while its grant is on its way.
fn live(lease: &Lease, now: Instant) -> bool {
    (lease.tokens > 0 && now < lease.valid_until)
        || now < lease.asking_until
        || now < lease.refused_until
        || now < lease.unavailable_until
}

/// The lease, unless the clock stepped back from the time it was last written: then its
/// tokens (valid for a time that has not come back yet) and its waits and memories (that
/// would last as long as the step) are void.
fn steady(lease: Lease, now: Instant) -> Lease {
    if now.saturating_add(CLOCK_SLACK) < lease.stamp {
        return Lease {
            owner: lease.owner,
            seen: lease.seen,
            ..Lease::default()
        };
    }
    lease
}

/// Decides a request of `cost` against this Envoy's lease of `owner`'s bucket: the outcome,
/// and the lease to write (with compare-and-swap) when it changed.
pub fn take(
    lease: Option<Lease>,
    owner: u64,
    now: Instant,
    cost: u64,
    chunk: u64,
    timeout: Duration,
) -> (Taking, Option<Lease>) {
    let lease = lease.map(|lease| steady(lease, now));
    let mine = match lease {
        Some(lease) if lease.owner == owner => lease,
        Some(lease) if live(&lease, now) => {
            return (
                Taking::Ask {
                    ask: cost,
                    lease: false,
                    seen: None,
                },
                None,
            )
        }
        _ => Lease {
            owner,
            ..Lease::default()
        },
    };
    let more_in = mine.more_at.saturating_since(now);
    if mine.tokens >= cost && now < mine.valid_until {
        let next = Lease {
            tokens: mine.tokens - cost,
            spent: mine.spent.saturating_add(cost),
            stamp: mine.stamp.max(now),
            ..mine
        };
        return (
            Taking::Spent {
                left: next.tokens,
                more_in,
                grant: mine.grant,
            },
            Some(next),
        );
    }
    if now < mine.refused_until {
        let retry_after = mine.refused_until.saturating_since(now);
        return (
            Taking::Refused {
                retry_after,
                more_in,
            },
            None,
        );
    }
    if now < mine.unavailable_until {
        return (Taking::Unavailable, None);
    }
    if now < mine.asking_until {
        return (Taking::Wait, None);
    }
    // A lease that ran out of time unspent was too large for this Envoy's share of traffic.
    let ask = if mine.tokens > 0 && mine.spent < chunk {
        mine.spent.saturating_mul(2).clamp(cost, chunk)
    } else {
        chunk
    };
    let next = Lease {
        asking_until: now.saturating_add(timeout),
        stamp: mine.stamp.max(now),
        ..mine
    };
    (
        Taking::Ask {
            ask,
            lease: true,
            seen: mine.seen,
        },
        Some(next),
    )
}

/// What etcd's bucket decided for an ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Granted {
    /// `grant.granted` tokens (at least the request's cost), and the bucket now as `seen`;
    /// `writer` tags the grant.
    Tokens {
        grant: Grant,
        seen: Seen,
        writer: u64,
    },
    /// Too few tokens: the request is refused.
    Empty { grant: Grant, seen: Option<Seen> },
    /// No usable answer: etcd is down or failing, remembered for [`STORE_RETRY_AFTER`].
    Unavailable(AnswerError),
    /// etcd answers, but not in time for this request: it lost every race for the bucket,
    /// its time ran out, or its grant landed after the tokens' validity. Not an outage.
    TooLate,
}

/// Writes what a grant brought into the lease that asked for it: the request's own `cost`
/// is taken out first. Returns the tokens left in the lease for the response's headers.
pub fn settle(
    lease: Option<Lease>,
    owner: u64,
    now: Instant,
    cost: u64,
    granted: &Granted,
) -> (u64, Option<Lease>) {
    let Some(mut lease) = lease.filter(|lease| lease.owner == owner) else {
        return (0, None);
    };
    lease.asking_until = Instant::default();
    lease.stamp = lease.stamp.max(now);
    match granted {
        Granted::Tokens {
            grant,
            seen,
            writer,
        } => {
            let kept = if now < lease.valid_until {
                lease.tokens
            } else {
                0
            };
            let added = grant.granted.saturating_sub(cost);
            lease.valid_until = if kept > 0 {
                lease.valid_until.min(grant.valid_until)
            } else {
                grant.valid_until
            };
            lease.tokens = kept.saturating_add(added);
            lease.spent = cost;
            lease.refused_until = Instant::default();
            lease.unavailable_until = Instant::default();
            lease.more_at = now.saturating_add(grant.more_in);
            lease.grant = *writer;
            lease.seen = Some(*seen);
        }
        Granted::Empty { grant, seen } => {
            lease.refused_until = now.saturating_add(grant.retry_after);
            lease.more_at = now.saturating_add(grant.more_in);
            lease.seen = seen.or(lease.seen);
        }
        Granted::Unavailable(_) => {
            lease.unavailable_until = now.saturating_add(STORE_RETRY_AFTER);
        }
        Granted::TooLate => {}
    }
    (lease.tokens, Some(lease))
}

/// Gives a spent token back to the grant it came from, while that grant is still valid:
/// into a later grant it would outlive the validity it was taken under.
pub fn refund(
    lease: Option<Lease>,
    owner: u64,
    grant: u64,
    now: Instant,
    cost: u64,
) -> Option<Lease> {
    lease
        .filter(|lease| lease.owner == owner && lease.grant == grant && now < lease.valid_until)
        .map(|lease| Lease {
            tokens: lease.tokens.saturating_add(cost),
            spent: lease.spent.saturating_sub(cost),
            ..lease
        })
}

/// A bucket as kept in etcd: the slot, and which ask wrote it last, so that an ask whose
/// answer was lost can tell its own write from another Envoy's that left the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Remote {
    slot: Slot,
    writer: u64,
}

impl Record for Remote {
    const FORMAT: u8 = 0x17;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.slot.owner.to_le_bytes());
        out.extend_from_slice(&self.slot.tat.0.to_le_bytes());
        out.extend_from_slice(&self.slot.ticks_per_ns.to_le_bytes());
        out.extend_from_slice(&self.writer.to_le_bytes());
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Remote {
            slot: Slot {
                owner: fields.u64()?,
                tat: Tat(u128::from_le_bytes(fields.bytes()?)),
                ticks_per_ns: fields.u64()?,
            },
            writer: fields.u64()?,
        })
    }
}

/// A grant on its way: the transactions of one ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asking {
    /// The bucket's etcd key.
    pub key: Vec<u8>,
    pub owner: u64,
    pub ask: u64,
    pub cost: u64,
    pub reserve: u64,
    pub calls: u32,
    /// A random tag this ask's writes carry.
    pub writer: u64,
    /// A transaction of this ask failed without a clear answer: it may have landed.
    pub in_doubt: bool,
    /// What the last transaction expected, and what it wrote (its grant, if it landed).
    pub expected: Expected,
    pub value: Vec<u8>,
    pub grant: Option<Grant>,
}

/// The next step of an ask.
#[derive(Debug, PartialEq, Eq)]
pub enum AskStep {
    /// Send `swap(key, expected, value)`.
    Send,
    Done(Granted),
}

impl Asking {
    /// The first transaction, computed from the bucket as last seen: a view that shows too few
    /// tokens is right without asking (tokens only leave a bucket faster than time refills it
    /// as seen), one that shows enough is checked by the compare.
    pub fn start(&mut self, bucket: &Bucket, seen: Option<Seen>, now: Instant) -> AskStep {
        self.compute(bucket, seen, now)
    }

    fn compute(&mut self, bucket: &Bucket, seen: Option<Seen>, now: Instant) -> AskStep {
        let (holder, tat) = holding(bucket, seen.map(|s| s.slot), self.owner, now);
        let grant = bucket.grant(tat, now, self.cost, self.ask, self.reserve);
        if grant.granted == 0 {
            return AskStep::Done(Granted::Empty { grant, seen });
        }
        self.expected = seen.map_or(Expected::Absent, |s| Expected::Revision(s.revision));
        self.value = encode(&Remote {
            slot: Slot {
                owner: holder,
                tat: grant.tat,
                ticks_per_ns: bucket.ticks_per_ns(),
            },
            writer: self.writer,
        });
        self.grant = Some(grant);
        AskStep::Send
    }

    /// etcd's answer to the last transaction.
    pub fn answer(
        &mut self,
        bucket: &Bucket,
        answer: Result<Swapped, AnswerError>,
        now: Instant,
        time_left: Duration,
    ) -> AskStep {
        let landed = |this: &Asking, revision: i64| {
            let remote = decode::<Remote>(&this.value).ok();
            match (this.grant, remote) {
                // Landed too late to spend: its tokens are gone, and nobody may use them.
                (Some(grant), Some(_)) if now >= grant.valid_until => {
                    AskStep::Done(Granted::TooLate)
                }
                (Some(grant), Some(remote)) => AskStep::Done(Granted::Tokens {
                    grant,
                    seen: Seen {
                        revision,
                        slot: remote.slot,
                    },
                    writer: this.writer,
                }),
                _ => AskStep::Done(Granted::Unavailable(AnswerError::Malformed)),
            }
        };
        let in_doubt = self.in_doubt;
        match &answer {
            Err(AnswerError::NotSent) => {}
            Err(_) => self.in_doubt = true,
            // An answer shows what any earlier transaction of this ask did: it compared the
            // revision this one found or changed, so that one can no longer land.
            Ok(_) => self.in_doubt = false,
        }
        let found = match answer {
            Ok(Swapped::Written { revision }) => return landed(self, revision),
            // A member that refused at once (down, or no leader yet): another may answer.
            // Sent again as it was: if the first landed, the compare fails and shows it.
            Err(_) if self.calls == 1 && time_left >= MIN_CALL_TIME => return AskStep::Send,
            Err(err) => return AskStep::Done(Granted::Unavailable(err)),
            Ok(Swapped::Found(found)) => found,
        };
        if let Some(Found { value, revision }) = &found {
            // An earlier transaction of this ask landed, its answer lost.
            if in_doubt && *value == self.value {
                return landed(self, *revision);
            }
        }
        let seen = found.and_then(|f| {
            decode::<Remote>(&f.value)
                .ok()
                .map(|remote| Seen {
                    revision: f.revision,
                    slot: remote.slot,
                })
                // Bytes that are not a bucket (another writer's) are replaced by a full one.
                .or(Some(Seen {
                    revision: f.revision,
                    slot: Slot {
                        owner: 0,
                        tat: Tat(0),
                        ticks_per_ns: 0,
                    },
                }))
        });
        match self.compute(bucket, seen, now) {
            AskStep::Send if self.calls >= MAX_CALLS || time_left < MIN_CALL_TIME => {
                AskStep::Done(Granted::TooLate)
            }
            step => step,
        }
    }
}

#[cfg(test)]
mod tests;
