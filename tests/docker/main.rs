//! Container tests: the images `make docker-image` and `make oci` build, and the repository's
//! docker-compose.yaml, exercised for real. Each demo test brings up its own compose project
//! (Envoy with 4 workers in front of the demo upstream, on ports Docker picks) and asserts
//! what the client got and what the upstream saw.
//!
//! Run them with `make docker-test` (part of `make test`), which builds the images first.
#![cfg(not(target_arch = "wasm32"))]
// Tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod compose;
mod demo;
mod fleet;
mod images;

#[path = "../common/http.rs"]
mod http;
pub use http::{clients, fresh_connections, join_all, METRICS_FLUSHED};

use std::path::Path;
use std::process::Command;

/// The repository root: docker-compose.yaml and `target/` are found from here.
pub fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A command run from the repository root.
pub fn command(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args).current_dir(repository());
    command
}

/// Runs a command and returns its stdout; a failure panics with everything it printed.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The crate's version: the images' tag.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The filter `make build` produced, which the images and the compose file carry.
pub fn built_wasm() -> Vec<u8> {
    std::fs::read(repository().join("target/wasm32-wasip1/release/envoy_resilience.wasm"))
        .expect("the filter is built (make docker-test builds it)")
}
