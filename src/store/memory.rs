//! An in-memory [`Store`] with Envoy's exact semantics, for tests and native simulations.

use super::{Store, StoreError, Versioned};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Mutex, PoisonError};

/// Behaves as proxy-wasm-cpp-host's `SharedData`: one lock, one version counter for all keys
/// that starts at 1, skips 0 and wraps; CAS checked only on keys that exist.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    values: HashMap<String, (Vec<u8>, NonZeroU32)>,
    next_version: NonZeroU32,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_next_version(NonZeroU32::MIN)
    }
}

impl MemoryStore {
    /// A store whose next write gets `next_version`, to test the counter's wrap.
    pub fn with_next_version(next_version: NonZeroU32) -> Self {
        Self {
            inner: Mutex::new(Inner {
                values: HashMap::new(),
                next_version,
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().values.len()
    }

    /// Every key written, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.lock().values.keys().cloned().collect();
        keys.sort();
        keys
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the store from the others.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn take_version(&mut self) -> NonZeroU32 {
        let version = self.next_version;
        self.next_version =
            NonZeroU32::new(version.get().wrapping_add(1)).unwrap_or(NonZeroU32::MIN);
        version
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self
            .lock()
            .values
            .get(key)
            .map(|(bytes, version)| Versioned {
                bytes: bytes.clone(),
                version: *version,
            }))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<NonZeroU32>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let (Some(cas), Some((_, version))) = (cas, inner.values.get(key)) {
            if cas != *version {
                return Err(StoreError::CasMismatch);
            }
        }
        let version = inner.take_version();
        inner
            .values
            .insert(key.to_owned(), (value.to_vec(), version));
        Ok(())
    }
}
