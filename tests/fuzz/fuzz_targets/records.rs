//! Foreign bytes in shared data: every record decoder over any bytes, and every key the
//! policies use overwritten with them while requests flow. Decoding refuses; policies start
//! their state afresh or fail by `shared_data.on_error`; nothing panics.
#![no_main]

use envoy_resilience::circuit_breaker::BreakerState;
use envoy_resilience::hashing::Seed;
use envoy_resilience::idempotency::IdempotencyRecord;
use envoy_resilience::load_shedding::PoolState;
use envoy_resilience::pipeline::{Exchange, Step};
use envoy_resilience::rate_limit::{Lease, Slot};
use envoy_resilience::store::{decode, MemoryStore, Store};
use envoy_resilience_fuzz::{Ending, Request, Worker, ALL_FOUR};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<Vec<u8>>, Vec<Request>, Ending)| {
    let (values, requests, ending) = input;
    for bytes in &values {
        let _ = decode::<BreakerState>(bytes);
        let _ = decode::<PoolState>(bytes);
        let _ = decode::<Slot>(bytes);
        let _ = decode::<Lease>(bytes);
        let _ = decode::<IdempotencyRecord>(bytes);
        let _ = decode::<Seed>(bytes);
    }
    let store = MemoryStore::default();
    let worker = Worker::new(ALL_FOUR, &store, 7).expect("the configuration is valid");
    // One request of each kind writes every key the policies use.
    let warm = Request {
        method: envoy_resilience_fuzz::Method::Post,
        path: b"/orders".to_vec(),
        headers: vec![(0, b"k".to_vec())],
        peer: b"10.0.0.1:5000".to_vec(),
        body: b"{}".to_vec(),
    };
    let mut exchange = Exchange::default();
    if worker.start(&mut exchange, &warm) == Step::Continue {
        worker.respond(&mut exchange, ending);
    }
    worker.finish(&mut exchange, ending);
    for (key, bytes) in store.keys().into_iter().zip(values.iter().cycle()) {
        let _ = store.set(&key, bytes, None);
    }
    for request in &requests {
        let mut exchange = Exchange::default();
        if worker.start(&mut exchange, request) == Step::Continue {
            worker.respond(&mut exchange, ending);
        }
        worker.finish(&mut exchange, ending);
        assert!(!exchange.holds_loans(), "a finished stream holds nothing");
    }
});
