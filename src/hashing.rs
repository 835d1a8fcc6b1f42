//! Keyed hashing into fixed tables, with a secret every worker shares.
//!
//! Bounded tables (rate-limit buckets, idempotency records) place a client-chosen key in a
//! slot. With a public hash a client could aim at another client's slot; SipHash-1-3 with a
//! seed chosen once per filter instance (and shared through [`create_absent`]) prevents it.
//!
//! [`create_absent`]: crate::store::create_absent

use crate::store::{self, DecodeError, Namespace, Reader, Record, Store, StoreError};
use sha2::{Digest, Sha256};
use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

/// The secret SipHash key, chosen by whichever worker configures first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed(pub [u64; 2]);

impl Record for Seed {
    const FORMAT: u8 = 0x12;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0[0].to_le_bytes());
        out.extend_from_slice(&self.0[1].to_le_bytes());
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Seed([fields.u64()?, fields.u64()?]))
    }
}

/// The seed all workers of this instance use: the stored one, or `candidate` if this worker
/// is the first (exactly one candidate wins).
pub fn shared_seed(
    store: &impl Store,
    namespace: &Namespace,
    candidate: Seed,
    max_attempts: u32,
) -> Result<Seed, StoreError> {
    let key = namespace.key("seed");
    store::update(
        store,
        namespace,
        &key,
        max_attempts,
        |stored| match stored {
            Some(seed) => (seed, None),
            None => (candidate, Some(candidate)),
        },
    )
    .map(|updated| updated.decision)
}

/// Where a key lives in a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub index: u32,
    /// Tells keys sharing a slot apart (64 bits: a false match is a 2^-64 event).
    pub owner: u64,
}

/// Where a key lives in a table every Envoy of a fleet shares (in etcd): SHA-256 with no
/// seed, since Envoys share no secret. A client that aims keys at one slot can only make its
/// own keys share a bucket or wait for a record, never read another client's.
pub fn fleet_place(key: &[u8], table_size: u32) -> Placement {
    let digest = Sha256::digest(key);
    let word = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[i..i + 8]);
        u64::from_le_bytes(bytes)
    };
    Placement {
        index: (word(0) % u64::from(table_size.max(1))) as u32,
        owner: word(8),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHasher {
    seed: Seed,
    /// A key of its own for partition keys, derived from the seed: what clients are shown
    /// is never a placement hash.
    partition_seed: Seed,
}

impl KeyHasher {
    pub fn new(seed: Seed) -> Self {
        let mut hasher = SipHasher13::new_with_keys(seed.0[0], seed.0[1]);
        hasher.write(b"envoy-resilience partition key");
        let derived = hasher.finish128();
        Self {
            seed,
            partition_seed: Seed([derived.h1, derived.h2]),
        }
    }

    /// The partition key a client is shown for `key` (the RateLimit draft's `pk`), under a key
    /// derived from the seed, so it tells nothing of the slot.
    pub fn partition(&self, key: &[u8]) -> u64 {
        let mut hasher =
            SipHasher13::new_with_keys(self.partition_seed.0[0], self.partition_seed.0[1]);
        hasher.write(key);
        hasher.finish()
    }

    pub fn place(&self, key: &[u8], table_size: u32) -> Placement {
        let mut hasher = SipHasher13::new_with_keys(self.seed.0[0], self.seed.0[1]);
        hasher.write(key);
        let hash = hasher.finish128();
        Placement {
            index: (hash.h1 % u64::from(table_size.max(1))) as u32,
            owner: hash.h2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn placement_depends_on_the_seed() {
        let a = KeyHasher::new(Seed([1, 2]));
        let b = KeyHasher::new(Seed([3, 4]));
        assert_eq!(a.place(b"client-1", 1024), a.place(b"client-1", 1024));
        assert_ne!(
            a.place(b"client-1", 1024).owner,
            b.place(b"client-1", 1024).owner
        );
        assert!(a.place(b"x", 1).index == 0 && a.place(b"y", 1).index == 0);
    }

    #[test]
    fn placements_spread_over_the_table() {
        let hasher = KeyHasher::new(Seed([5, 6]));
        let mut used = vec![0u32; 64];
        for i in 0..6400u32 {
            used[hasher.place(&i.to_le_bytes(), 64).index as usize] += 1;
        }
        assert!(used.iter().all(|&n| (50..=150).contains(&n)), "{used:?}");
    }

    #[test]
    fn the_first_seed_wins_for_every_worker() {
        let store = MemoryStore::default();
        let ns = Namespace::new("t");
        assert_eq!(shared_seed(&store, &ns, Seed([1, 1]), 4), Ok(Seed([1, 1])));
        assert_eq!(shared_seed(&store, &ns, Seed([2, 2]), 4), Ok(Seed([1, 1])));
    }
}
