#!/usr/bin/env bash
# Starts envoy/demo.yaml, waits until it is ready, prints what to try, and stops Envoy on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
envoy=${ENVOY_BIN:-.venv/bin/envoy}
# The demo gRPC server (grpcio, installed into .venv by `make setup`) on :10002.
.venv/bin/python tests/e2e/grpc_peer.py serve --port 10002 >/dev/null &
grpc_pid=$!
"$envoy" -c envoy/demo.yaml --concurrency 2 --disable-hot-restart --file-flush-interval-msec 100 --log-level "${LOG_LEVEL:-warning}" --component-log-level wasm:info &
pid=$!
trap 'kill $pid $grpc_pid 2>/dev/null; wait $pid $grpc_pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do
  # This Envoy first: another one on the same ports (a second `make run`) would answer ready.
  kill -0 $pid 2>/dev/null || { echo "Envoy exited; see its log above" >&2; exit 1; }
  curl -sf http://127.0.0.1:9901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
cat <<'TXT'

Envoy is serving the resilience filter on http://127.0.0.1:10000 (admin: http://127.0.0.1:9901).

  # through the filter to the demo upstream
  curl -i http://127.0.0.1:10000/

  # ask the demo upstream for a failure, or a slow answer
  curl -i -H 'x-envoy-fault-abort-request: 503' http://127.0.0.1:10000/
  curl -i -H 'x-envoy-fault-delay-request: 1500' http://127.0.0.1:10000/

  # rate limiting under /limited/: 5 requests at once per client, then one every 2 s
  for i in 1 2 3 4 5 6 7; do curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:10000/limited/; done
  curl -si http://127.0.0.1:10000/limited/ | grep -iE '^(HTTP|retry-after|ratelimit)'

  # circuit breaking: 3 failures in a row open the breaker for 10 s; then one probe
  # goes through, and its success closes it again
  for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code}\n' -H 'x-envoy-fault-abort-request: 503' http://127.0.0.1:10000/; done
  curl -si http://127.0.0.1:10000/ | grep -iE '^(HTTP|retry-after|x-circuit-breaker)'
  sleep 10; curl -s http://127.0.0.1:10000/

  # load shedding: at most 4 requests in flight; normal ones are shed from 3, critical from 4.
  # Six slow normal requests: 3 in flight, 3 shed (503); a critical one sent while they are
  # still in flight takes the fourth slot (200)
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code} ' -H 'x-envoy-fault-delay-request: 2000' http://127.0.0.1:10000/ & done
  sleep 0.5; curl -s -o /dev/null -w 'critical: %{http_code}\n' -H 'x-priority: critical' http://127.0.0.1:10000/; wait; echo

  # idempotency keys under /orders: the retry gets the stored response, a changed body 422
  curl -si -X POST -H 'idempotency-key: order-1' -d '{"qty": 1}' http://127.0.0.1:10000/orders | head -1
  curl -si -X POST -H 'idempotency-key: order-1' -d '{"qty": 1}' http://127.0.0.1:10000/orders | grep -iE '^(HTTP|idempotent-replayed)'
  curl -s -X POST -H 'idempotency-key: order-1' -d '{"qty": 2}' http://127.0.0.1:10000/orders; echo

  # gRPC, with grpcio's client (the demo gRPC server is on :10002, behind Envoy)
  grpc() { .venv/bin/python tests/e2e/grpc_peer.py call 127.0.0.1:10000 "$@"; }
  grpc Create --body order
  # a free-tier tenant gets 2 calls, then RESOURCE_EXHAUSTED (gRPC clients do not retry it)
  # with grpc-retry-pushback-ms: the wait, as Retry-After says it to HTTP clients
  grpc Create --metadata x-tenant=free --count 3
  # UNAVAILABLE three times in a row opens the gRPC breaker: the next call is refused by it
  grpc Create --metadata fail=UNAVAILABLE --count 3; grpc Create
  # a server stream is long-lived: it takes no slot of the pool "demo"; the pool "streams"
  # (3 slots, normal work shed from 80%) holds 2 at once, the third is shed UNAVAILABLE.
  # 5 s of streaming is no slow call (the gRPC breaker's slow_call is 1 s), and once the
  # open breaker's 10 s are over, the first stream to start is the probe that closes it
  sleep 10; for i in 1 2 3; do grpc Watch --metadata messages=5 --metadata interval-ms=1000 & sleep 0.3; done; wait
  sleep 0.2; curl -s http://127.0.0.1:9901/stats | grep -E 'resilience.demo.(load_shedding.streams|circuit_breaker.demo-grpc)'

  # the filter's metrics
  curl -s http://127.0.0.1:9901/stats | grep resilience

Ctrl-C stops Envoy.
TXT
wait $pid
