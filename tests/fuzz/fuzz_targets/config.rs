//! The configuration document: any bytes are refused with a field named, or accepted and
//! configure a filter; never a panic.
#![no_main]

use envoy_resilience::hashing::Seed;
use envoy_resilience::pipeline::{config::Config, Filter};
use envoy_resilience::store::MemoryStore;
use envoy_resilience::telemetry::Telemetry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|document: &[u8]| {
    if Config::parse(document).is_ok() {
        let store = MemoryStore::default();
        let mut telemetry = Telemetry::default();
        let configured = Filter::configure(
            "fuzz",
            document,
            &store,
            Seed([1, 2]),
            envoy_resilience_fuzz::START,
            &mut telemetry,
        );
        assert!(configured.is_ok(), "a parsed configuration must configure");
    }
});
