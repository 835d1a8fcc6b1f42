//! Shared state over Envoy's shared data, and the rules that keep it correct.
//!
//! Envoy gives every worker's VM one key-value map per `vm_id`, guarded by one global lock.
//! Each write stamps the key with a fresh version from one counter (shared by all keys; it
//! skips 0 and wraps at 2^32). A write may carry the version it expects (compare-and-swap),
//! but Envoy checks it **only for a key that already exists**: a write to a missing key always
//! succeeds. Two workers that both saw a key missing can therefore both "create" it, and the
//! later write silently erases whatever the first one (and anyone after it) stored.
//!
//! [`update`] is the one way policy code changes state. It reads, runs a pure decision, and
//! writes back with compare-and-swap, retrying a bounded number of times. To create a missing
//! key it uses [`create_absent`], which makes a lost creation impossible: see there for why.

mod memory;
mod record;
mod settings;

pub use memory::MemoryStore;
pub use record::{decode, encode, DecodeError, Reader, Record};
pub use settings::{
    FailureMode, RawSharedData, SharedDataSettings, DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS_RANGE,
};

use std::fmt;
use std::num::NonZeroU32;

/// A stored value and the version Envoy stamped on its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub bytes: Vec<u8>,
    pub version: NonZeroU32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The key exists and its version is no longer the one the write expected.
    CasMismatch,
    /// The host answered a status the store does not expect (Envoy's numeric status).
    Host(u32),
    /// Every attempt lost its compare-and-swap to another worker.
    Contended { attempts: u32 },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::CasMismatch => f.write_str("compare-and-swap mismatch"),
            StoreError::Host(status) => write!(f, "shared data call failed with status {status}"),
            StoreError::Contended { attempts } => {
                write!(f, "gave up after {attempts} compare-and-swap conflicts")
            }
        }
    }
}

/// Envoy's shared data, as the core sees it. Implementations must keep Envoy's semantics,
/// the CAS-ignored-on-missing-key trap included, so that tests on [`MemoryStore`] prove
/// what happens in Envoy.
pub trait Store {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Writes `value`. With `cas`, a key that exists is written only if its version is still
    /// `cas`; a missing key is written regardless.
    fn set(&self, key: &str, value: &[u8], cas: Option<NonZeroU32>) -> Result<(), StoreError>;
}

/// The keys of one filter instance: every key it writes starts with its prefix, so chained
/// instances never see each other's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    prefix: String,
    witness: String,
}

impl Namespace {
    pub fn new(instance: &str) -> Self {
        let prefix = format!("resilience/{instance}");
        let witness = format!("{prefix}/witness");
        Self { prefix, witness }
    }

    pub fn key(&self, suffix: &str) -> String {
        format!("{}/{}", self.prefix, suffix)
    }

    /// Writes the witness key [`create_absent`] relies on. Its content is a constant that
    /// nobody updates, so concurrent blind writes of it from every worker lose nothing.
    pub fn prepare(&self, store: &impl Store) -> Result<(), StoreError> {
        store.set(&self.witness, WITNESS_VALUE, None)
    }
}

const WITNESS_VALUE: &[u8] = &[1];

/// What a creation attempt found.
#[derive(Debug, PartialEq, Eq)]
pub enum Creation {
    Created,
    /// Another writer created the key first; nothing was written.
    AlreadyExists,
}

/// Creates `key` only if no one else has; at most one of any number of racing creators wins.
///
/// Why it holds: it reads the witness key and takes its version `w`, *then* checks that `key`
/// is missing, and then writes `key` with `w` as its compare-and-swap version. If the key is
/// still missing the write succeeds. If someone created it after the check, that write took a
/// version from Envoy's counter later than `w`, so it differs from `w` and Envoy refuses ours.
/// The two could only be equal if the counter wrapped all 2^32 values between our two calls,
/// microseconds apart under a global lock. Losing the race is reported, never a blind write.
pub fn create_absent(
    store: &impl Store,
    namespace: &Namespace,
    key: &str,
    value: &[u8],
) -> Result<Creation, StoreError> {
    let witness = match store.get(&namespace.witness)? {
        Some(witness) => witness.version,
        None => {
            namespace.prepare(store)?;
            match store.get(&namespace.witness)? {
                Some(witness) => witness.version,
                None => return Err(StoreError::Host(NOT_FOUND)),
            }
        }
    };
    if store.get(key)?.is_some() {
        return Ok(Creation::AlreadyExists);
    }
    match store.set(key, value, Some(witness)) {
        Ok(()) => Ok(Creation::Created),
        Err(StoreError::CasMismatch) => Ok(Creation::AlreadyExists),
        Err(other) => Err(other),
    }
}

/// Envoy's status for a key that is not there.
const NOT_FOUND: u32 = 1;

/// The result of [`update`], with what it cost.
#[derive(Debug, PartialEq, Eq)]
pub struct Updated<R> {
    pub decision: R,
    /// Compare-and-swap attempts lost to other workers before the one that counted.
    pub conflicts: u32,
    /// The key held bytes that did not decode as `T` (a foreign or older format); the
    /// decision saw no state and its write replaced them.
    pub replaced_unreadable: bool,
}

/// Reads `key`, lets `decide` turn the current state into a decision and the next state, and
/// writes that state back with compare-and-swap, retrying up to `max_attempts` times.
///
/// `decide` sees `None` when the key is missing or unreadable, and may be called once per
/// attempt, so it must be pure. Returning no next state writes nothing (a denial costs one
/// read). Running out of attempts is [`StoreError::Contended`]: for admissions, where
/// `shared_data.on_error` decides what happens next.
pub fn update<T: Record, R>(
    store: &impl Store,
    namespace: &Namespace,
    key: &str,
    max_attempts: u32,
    decide: impl FnMut(Option<T>) -> (R, Option<T>),
) -> Result<Updated<R>, StoreError> {
    retry(store, namespace, key, Some(max_attempts), decide)
}

/// [`update`] for a change that must not be lost (a release, a refund, an outcome): it retries
/// compare-and-swap conflicts until its write lands. That always ends: a conflict means another
/// worker's write landed, so the store as a whole moves on. Only a host error stops it.
pub fn settle<T: Record, R>(
    store: &impl Store,
    namespace: &Namespace,
    key: &str,
    decide: impl FnMut(Option<T>) -> (R, Option<T>),
) -> Result<Updated<R>, StoreError> {
    retry(store, namespace, key, None, decide)
}

fn retry<T: Record, R>(
    store: &impl Store,
    namespace: &Namespace,
    key: &str,
    max_attempts: Option<u32>,
    mut decide: impl FnMut(Option<T>) -> (R, Option<T>),
) -> Result<Updated<R>, StoreError> {
    let mut conflicts: u32 = 0;
    while max_attempts.is_none_or(|max| conflicts < max) {
        let current = store.get(key)?;
        let (state, replaced_unreadable) = match &current {
            Some(current) => match decode::<T>(&current.bytes) {
                Ok(state) => (Some(state), false),
                Err(_) => (None, true),
            },
            None => (None, false),
        };
        let (decision, next) = decide(state);
        let Some(next) = next else {
            return Ok(Updated {
                decision,
                conflicts,
                replaced_unreadable: false,
            });
        };
        if write_over(store, namespace, key, current.as_ref(), &encode(&next))? {
            return Ok(Updated {
                decision,
                conflicts,
                replaced_unreadable,
            });
        }
        conflicts = conflicts.saturating_add(1);
    }
    Err(StoreError::Contended {
        attempts: conflicts,
    })
}

/// One attempt's write of `bytes` at `key`: a compare-and-swap over the value `read` there,
/// or, if it was missing, [`create_absent`]. `false`: another worker's write landed first.
pub fn write_over(
    store: &impl Store,
    namespace: &Namespace,
    key: &str,
    read: Option<&Versioned>,
    bytes: &[u8],
) -> Result<bool, StoreError> {
    match read {
        Some(read) => match store.set(key, bytes, Some(read.version)) {
            Ok(()) => Ok(true),
            Err(StoreError::CasMismatch) => Ok(false),
            Err(other) => Err(other),
        },
        None => Ok(create_absent(store, namespace, key, bytes)? == Creation::Created),
    }
}

/// Reads `key` without writing: for checks on state that rarely changes (a closed breaker).
/// Missing and unreadable both read as `None`.
pub fn read<T: Record>(store: &impl Store, key: &str) -> Result<Option<T>, StoreError> {
    Ok(store
        .get(key)?
        .and_then(|current| decode::<T>(&current.bytes).ok()))
}

#[cfg(test)]
mod tests;
