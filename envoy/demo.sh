#!/usr/bin/env bash
# Starts envoy/demo.yaml, waits until it is ready, prints what to try, and stops Envoy on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
envoy=${ENVOY_BIN:-.venv/bin/envoy}
"$envoy" -c envoy/demo.yaml --concurrency 2 --disable-hot-restart --log-level "${LOG_LEVEL:-warning}" --component-log-level wasm:info &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:9901/ready >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { echo "Envoy exited; see its log above" >&2; exit 1; }
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

  # load shedding: at most 4 requests in flight; normal ones are shed from 3, critical from 4
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code} ' -H 'x-envoy-fault-delay-request: 2000' http://127.0.0.1:10000/ & done; wait; echo
  curl -si -H 'x-priority: critical' http://127.0.0.1:10000/ | head -1

  # idempotency keys under /orders: the retry gets the stored response, a changed body 422
  curl -si -X POST -H 'idempotency-key: order-1' -d '{"qty": 1}' http://127.0.0.1:10000/orders | head -1
  curl -si -X POST -H 'idempotency-key: order-1' -d '{"qty": 1}' http://127.0.0.1:10000/orders | grep -iE '^(HTTP|idempotent-replayed)'
  curl -s -X POST -H 'idempotency-key: order-1' -d '{"qty": 2}' http://127.0.0.1:10000/orders; echo

  # the filter's metrics
  curl -s http://127.0.0.1:9901/stats | grep resilience

Ctrl-C stops Envoy.
TXT
wait $pid
