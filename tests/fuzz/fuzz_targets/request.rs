//! Every request part a policy reads (method, path and query, the key, priority, API-key,
//! authorization and forwarded headers, the peer, the body), as any bytes, through all four
//! policies: a defined answer every time, and nothing held once the stream ends.
#![no_main]

use envoy_resilience::pipeline::{Exchange, Step};
use envoy_resilience::store::MemoryStore;
use envoy_resilience_fuzz::{Ending, Request, Worker, ALL_FOUR};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<Request>, Ending)| {
    let (requests, ending) = input;
    let store = MemoryStore::default();
    let worker = Worker::new(ALL_FOUR, &store, 7).expect("the configuration is valid");
    for request in &requests {
        let mut exchange = Exchange::default();
        match worker.start(&mut exchange, request) {
            Step::Reply(reply) => assert!((100..=999).contains(&reply.status), "{}", reply.status),
            Step::Continue => worker.respond(&mut exchange, ending),
            // Without a timer tick, a paused stream ends paused (the client left).
            Step::Pause | Step::Call(_) => {}
        }
        worker.finish(&mut exchange, ending);
        assert!(!exchange.holds_loans(), "a finished stream holds nothing");
    }
    assert_eq!(worker.in_flight("p"), 0, "every slot came back");
    assert_eq!(worker.in_flight("streams"), 0, "every slot came back");
});
