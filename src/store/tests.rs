use super::*;
use std::cell::{Cell, RefCell};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

#[derive(Debug, PartialEq, Eq)]
struct Counter(u64);

impl Record for Counter {
    const FORMAT: u8 = 0xF0;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_le_bytes());
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Counter(fields.u64()?))
    }
}

fn increment(current: Option<Counter>) -> (u64, Option<Counter>) {
    let next = current.map_or(0, |c| c.0) + 1;
    (next, Some(Counter(next)))
}

fn counter(store: &impl Store, key: &str) -> Option<u64> {
    read::<Counter>(store, key).ok().flatten().map(|c| c.0)
}

/// A store that lets "another worker" run right before this worker's next writes, which is
/// exactly the window a compare-and-swap has to protect.
struct Interleaved<'a, F: FnMut(&MemoryStore)> {
    shared: &'a MemoryStore,
    other_worker: RefCell<F>,
    interruptions_left: Cell<u32>,
}

impl<'a, F: FnMut(&MemoryStore)> Interleaved<'a, F> {
    fn new(shared: &'a MemoryStore, interruptions: u32, other_worker: F) -> Self {
        Self {
            shared,
            other_worker: RefCell::new(other_worker),
            interruptions_left: Cell::new(interruptions),
        }
    }
}

impl<F: FnMut(&MemoryStore)> Store for Interleaved<'_, F> {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.shared.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<NonZeroU32>) -> Result<(), StoreError> {
        if self.interruptions_left.get() > 0 {
            self.interruptions_left
                .set(self.interruptions_left.get() - 1);
            (self.other_worker.borrow_mut())(self.shared);
        }
        self.shared.set(key, value, cas)
    }
}

fn ns() -> Namespace {
    Namespace::new("test")
}

#[test]
fn memory_store_ignores_cas_on_missing_keys_like_envoy() {
    let store = MemoryStore::default();
    let stale = NonZeroU32::new(12345);
    assert_eq!(store.set("new-key", b"x", stale), Ok(()));
    assert_eq!(
        store.set("new-key", b"y", stale),
        Err(StoreError::CasMismatch)
    );
    let current = store.get("new-key").ok().flatten().map(|v| v.version);
    assert_eq!(store.set("new-key", b"z", current), Ok(()));
    assert_eq!(
        store.set("new-key", b"w", None),
        Ok(()),
        "no CAS means no check"
    );
}

#[test]
fn version_counter_is_shared_by_keys_and_skips_zero_when_it_wraps() {
    let store = MemoryStore::with_next_version(NonZeroU32::MAX);
    let version = |key| store.get(key).ok().flatten().map(|v| v.version.get());
    assert_eq!(store.set("a", b"1", None), Ok(()));
    assert_eq!(store.set("b", b"1", None), Ok(()));
    assert_eq!(version("a"), Some(u32::MAX));
    assert_eq!(version("b"), Some(1));
}

/// Proves the trap is real in the model, so the protection tests below mean something:
/// two workers that "create" with a plain write lose an update.
#[test]
fn naive_creation_loses_an_update() {
    let shared = MemoryStore::default();
    let worker_a = Interleaved::new(&shared, 1, |shared: &MemoryStore| {
        assert_eq!(shared.set("k", &encode(&Counter(1)), None), Ok(()));
    });
    assert_eq!(worker_a.get("k"), Ok(None));
    assert_eq!(worker_a.set("k", &encode(&Counter(1)), None), Ok(()));
    assert_eq!(
        counter(&shared, "k"),
        Some(1),
        "two increments, one survived"
    );
}

#[test]
fn two_racing_creators_cannot_both_win() {
    let shared = MemoryStore::default();
    ns().prepare(&shared).ok();
    let b_result = Cell::new(None);
    // B runs its whole creation between A's "is it missing?" check and A's write.
    let worker_a = Interleaved::new(&shared, 1, |shared: &MemoryStore| {
        b_result.set(Some(create_absent(
            shared,
            &ns(),
            "k",
            &encode(&Counter(20)),
        )));
    });
    let a_result = create_absent(&worker_a, &ns(), "k", &encode(&Counter(10)));
    assert_eq!(b_result.take(), Some(Ok(Creation::Created)));
    assert_eq!(a_result, Ok(Creation::AlreadyExists));
    assert_eq!(counter(&shared, "k"), Some(20));
}

#[test]
fn racing_creation_keeps_both_updates_and_any_that_followed() {
    let shared = MemoryStore::default();
    // B creates the key and updates it again, all inside A's creation window.
    let worker_a = Interleaved::new(&shared, 1, |shared: &MemoryStore| {
        for _ in 0..2 {
            assert!(update(shared, &ns(), "k", 4, increment).is_ok());
        }
    });
    let a = update(&worker_a, &ns(), "k", 4, increment);
    assert_eq!(a.map(|u| (u.decision, u.conflicts)), Ok((3, 1)));
    assert_eq!(counter(&shared, "k"), Some(3));
}

#[test]
fn creation_works_without_a_prepared_witness() {
    let store = MemoryStore::default();
    assert_eq!(
        update(&store, &ns(), "k", 4, increment).map(|u| u.decision),
        Ok(1)
    );
    assert_eq!(
        update(&store, &ns(), "k", 4, increment).map(|u| u.decision),
        Ok(2)
    );
}

#[test]
fn a_denial_writes_nothing() {
    let store = MemoryStore::default();
    let denied = update(&store, &ns(), "k", 4, |_: Option<Counter>| ("denied", None));
    assert_eq!(denied.map(|u| u.decision), Ok("denied"));
    assert!(store.is_empty(), "not even the witness is written");
}

#[test]
fn conflicts_are_retried_then_reported_as_contention() {
    let shared = MemoryStore::default();
    assert!(update(&shared, &ns(), "k", 4, increment).is_ok());
    let always_interrupted = Interleaved::new(&shared, u32::MAX, |shared: &MemoryStore| {
        assert!(update(shared, &ns(), "k", 4, increment).is_ok());
    });
    let gave_up = update(&always_interrupted, &ns(), "k", 3, increment);
    assert_eq!(gave_up, Err(StoreError::Contended { attempts: 3 }));
    assert_eq!(
        counter(&shared, "k"),
        Some(4),
        "only the other worker's 3 writes landed"
    );
}

#[test]
fn unreadable_bytes_are_replaced_under_compare_and_swap() {
    let store = MemoryStore::default();
    for foreign in [
        &b""[..],
        b"\x00",
        b"\xF0\x01",
        b"{\"json\":1}",
        b"\xF0\x01\x00\x00\x00\x00\x00\x00\x00\x09",
    ] {
        assert_eq!(store.set("k", foreign, None), Ok(()));
        assert_eq!(read::<Counter>(&store, "k"), Ok(None));
        let updated = update(&store, &ns(), "k", 4, increment);
        assert_eq!(
            updated.map(|u| (u.decision, u.replaced_unreadable)),
            Ok((1, true))
        );
    }
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..10_000 {
        let len = (next() % 24) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Whatever decodes must be exactly what encoding that value produces.
        if let Ok(Counter(n)) = decode::<Counter>(&bytes) {
            assert_eq!(encode(&Counter(n)), bytes);
        }
    }
}

#[test]
fn decode_errors_say_what_is_wrong() {
    assert_eq!(decode::<Counter>(b""), Err(DecodeError::Empty));
    assert_eq!(
        decode::<Counter>(b"\x01\x00"),
        Err(DecodeError::Format {
            expected: 0xF0,
            found: 0x01
        })
    );
    assert_eq!(decode::<Counter>(b"\xF0\x01"), Err(DecodeError::Truncated));
    let mut long = encode(&Counter(7));
    long.push(0);
    assert_eq!(decode::<Counter>(&long), Err(DecodeError::TrailingBytes));
    assert_eq!(decode::<Counter>(&encode(&Counter(7))), Ok(Counter(7)));
}

#[test]
fn namespaces_keep_instances_apart() {
    assert_eq!(Namespace::new("a").key("x"), "resilience/a/x");
    assert_ne!(Namespace::new("a").key("x"), Namespace::new("b").key("x"));
}

/// Eight OS threads stand in for eight Envoy workers: every key starts missing, so the
/// creation race happens for real, and not one increment may be lost.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn eight_workers_lose_no_update() {
    use std::sync::Arc;
    const WORKERS: u64 = 8;
    const INCREMENTS: u64 = 500;
    const KEYS: u64 = 4;
    let shared = Arc::new(MemoryStore::default());
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                for i in 0..INCREMENTS {
                    let key = format!("k{}", i % KEYS);
                    let updated = update(&*shared, &ns(), &key, u32::MAX, increment);
                    assert!(updated.is_ok());
                }
            })
        })
        .collect();
    for worker in workers {
        assert!(worker.join().is_ok());
    }
    let total: u64 = (0..KEYS)
        .filter_map(|k| counter(&*shared, &format!("k{k}")))
        .sum();
    assert_eq!(total, WORKERS * INCREMENTS);
}
