//! The pipeline under arbitrary interleavings: several workers (one VM each) over one store,
//! streams started, answered, timed out and ended in any order while the clock moves. After
//! every step: no more probes in flight than `max_probes`, no two live streams holding a claim
//! on one key; at the end, when every stream has ended, nothing is in flight.
#![no_main]

use arbitrary::Arbitrary;
use envoy_resilience::circuit_breaker::BreakerState;
use envoy_resilience::clock::Instant;
use std::time::Duration;
use envoy_resilience::pipeline::{Exchange, Step};
use envoy_resilience::store::{read, MemoryStore};
use envoy_resilience_fuzz::{advance, Ending, Request, Worker, ALL_FOUR, START};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Event {
    /// A worker starts a stream.
    Start { worker: u8, request: Request },
    /// The upstream answers the stream in this position of the live ones.
    Respond { stream: u8, ending: Ending },
    /// Envoy logs the stream, however it went.
    Finish { stream: u8, ending: Ending },
    /// Every worker's timer fires.
    Tick,
    Advance { ms: u16 },
}

struct Live {
    worker: usize,
    exchange: Exchange,
    request: Request,
    started: Instant,
    forwarded: bool,
}

const MAX_PROBES: u32 = 2;
/// `idempotency.lease` in [`ALL_FOUR`].
const LEASE: Duration = Duration::from_secs(1);

fuzz_target!(|events: Vec<Event>| {
    let store = MemoryStore::default();
    let workers: Vec<Worker<'_>> = (0..3)
        .map(|seed| Worker::new(ALL_FOUR, &store, seed).expect("the configuration is valid"))
        .collect();
    let breaker_key = workers[0].filter.instance.namespace.key("cb/b");
    let mut now = START;
    let mut live: Vec<Live> = Vec::new();
    for event in events.into_iter().take(200) {
        match event {
            Event::Start { worker, request } => {
                let index = usize::from(worker) % workers.len();
                let mut exchange = Exchange::default();
                let step = workers[index].start(&mut exchange, &request);
                if exchange.holds_claim() {
                    // One execution per key: no other live stream of the same client may
                    // hold a claim on it, unless that claim's lease ran out.
                    let twin = live.iter().find(|other| {
                        other.exchange.holds_claim()
                            && other.request.claimant() == request.claimant()
                            && other.started.saturating_add(LEASE) > now
                    });
                    assert!(twin.is_none(), "two live claims on one key: {request:?}");
                }
                live.push(Live {
                    worker: index,
                    forwarded: step == Step::Continue,
                    exchange,
                    request,
                    started: now,
                });
            }
            Event::Respond { stream, ending } if !live.is_empty() => {
                let index = usize::from(stream) % live.len();
                let stream = &mut live[index];
                if stream.forwarded {
                    workers[stream.worker].respond(&mut stream.exchange, ending);
                }
            }
            Event::Finish { stream, ending } if !live.is_empty() => {
                let mut stream = live.swap_remove(usize::from(stream) % live.len());
                workers[stream.worker].finish(&mut stream.exchange, ending);
                assert!(!stream.exchange.holds_loans());
            }
            Event::Tick => {
                for stream in &mut live {
                    if stream.exchange.polls() {
                        if let Some(step) = workers[stream.worker].tick(&mut stream.exchange) {
                            stream.forwarded = step == Step::Continue;
                        }
                    }
                }
            }
            Event::Advance { ms } => {
                now = advance(now, ms);
                workers.iter().for_each(|w| w.set_now(now));
            }
            _ => {}
        }
        if let Ok(Some(state)) = read::<BreakerState>(&store, &breaker_key) {
            assert!(
                state.probes_in_flight <= MAX_PROBES,
                "{} probes in flight",
                state.probes_in_flight
            );
        }
    }
    for mut stream in live {
        let client_gone = Ending::Failed {
            flags: 0x4000,
            upstream_host: false,
        };
        workers[stream.worker].finish(&mut stream.exchange, client_gone);
    }
    assert_eq!(workers[0].in_flight("p"), 0, "every slot came back");
    assert_eq!(workers[0].in_flight("streams"), 0, "every slot came back");
});
