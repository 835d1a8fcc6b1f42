#!/usr/bin/env python3
"""`make bench`: what each configuration of the filter costs Envoy per request.

One Envoy per configuration, all started at once with the same number of workers and pinned
to core 0; an upstream Envoy (a direct response) and `wrk` share core 1. Rounds are
interleaved: every round runs `wrk` against each configuration in turn, so a machine that
drifts slows every configuration alike. Per configuration and round: Envoy's CPU time
(user + system, from /proc) divided by the requests `wrk` completed, requests per second,
and p99 latency. The table gives medians with min-max over the rounds, and the cost added
against router only and against the filter with `{}`.

Requests per second and p99 are bounded by core 1 (the upstream and `wrk`), not only by the
Envoy under test: compare CPU per request.

With --baseline-wasm, every filter configuration also runs with that .wasm, in the same
rounds: the before and after of a change, side by side.

With --probe WASM (tests/bench/probe), the probe filter also runs as each of PROBES: the
same hostcalls as a configuration of the filter, and nothing else.

With --host-calls WASM (a build with the `host-calls` feature), each filter configuration
runs once more, untimed, and the table gets the proxy-wasm calls per request the filter
made, by call, and Envoy's callbacks into its streams (on_tick, on_done and on_delete are
not counted: the first is the root's, ten a second, the others are the SDK's).

Before its rounds, every configuration gets one request the upstream answers 500 (GET /fail),
so that a circuit breaker's state exists, as in any Envoy whose upstream ever failed.

Requests the filter answers itself (a non-2xx: idempotency's store-full 503s at about 3%)
cost less than forwarded ones and are counted in CPU per request too; the non-2xx column
says how many there were.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HUGE = 1_000_000_000
RATE_ONE = {"rules": [{"name": "all", "capacity": HUGE,
                       "refill": {"tokens": HUGE, "interval": "1s"}}]}
RATE_CLIENT = {"rules": [{"name": "per-client", "key": ["client_address"], "capacity": HUGE,
                          "refill": {"tokens": HUGE, "interval": "1s"}, "table_size": 1024}]}
BREAKER = {"breakers": [{"name": "b", "scope": {"match": {}},
                         "trip": {"consecutive_failures": 5}}]}
POOL = {"pools": [{"name": "p", "max_in_flight": 100000}]}
# Every POST claims a fresh key. Records live 1 s in the largest table the 1 GiB budget allows
# with 4 KiB responses, so a few thousand keys are alive at once and a new key finds its slot
# taken (503 store-full, counted as non-2xx) about 3% of the time.
IDEMPOTENCY = {"ttl": "1s", "records": 131072, "max_response_bytes": 4096}
ALL_FOUR = {"load_shedding": POOL, "rate_limit": RATE_CLIENT, "idempotency": IDEMPOTENCY,
            "circuit_breaker": BREAKER}

# name, filter: None (router only), "native" (Envoy's local_ratelimit) or the filter's
# configuration; the request wrk sends.
CASES = [
    ("router only", None, "get"),
    ("router only, POST", None, "post"),
    ("native local_ratelimit", "native", "get"),
    ("filter, {}", {}, "get"),
    ("filter, {}, POST", {}, "post"),
    ("rate limit, one bucket", {"rate_limit": RATE_ONE}, "get"),
    ("rate limit, per client", {"rate_limit": RATE_CLIENT}, "get"),
    ("circuit breaker, closed", {"circuit_breaker": BREAKER}, "get"),
    ("load shedding, one pool", {"load_shedding": POOL}, "get"),
    ("idempotency, POST", {"idempotency": IDEMPOTENCY}, "post"),
    ("all four, GET", ALL_FOUR, "get"),
    ("all four, POST", ALL_FOUR, "post"),
]

# With --probe: the probe filter (tests/bench/probe) making exactly the hostcalls the filter's
# configuration of the same name makes per request (as the host-calls table counts them), and
# nothing else. What the filter costs beyond its probe is its own work; what the probe costs
# is the calls' own price, which no change inside the filter can take off.
PROBES = [
    ("probe, as {}", {"now": 1}),
    ("probe, as one bucket", {"header": 1, "now": 1, "get": 1, "set": 1, "add_header": 2}),
    ("probe, as a closed breaker", {"header": 1, "now": 2, "get": 2, "property": 3}),
    ("probe, as one pool", {"header": 1, "now": 2, "get": 2, "set": 2, "gauge": 2}),
    ("probe, as all four, GET", {"headers": 1, "now": 2, "get": 5, "set": 3, "property": 4,
                                 "add_header": 2, "gauge": 2}),
]

# Every POST carries a key no earlier request had: the prefix differs between wrk runs (its
# clock, to the second, and the address of a fresh Lua table, which differs between processes).
POST_SCRIPT = """
local prefix = string.format("%d-%s-", os.time(), tostring({}):sub(8))
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/orders", {["idempotency-key"] = prefix .. n,
    ["content-type"] = "application/json"}, '{"item": 1}')
end
"""

UPSTREAM = """
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: upstream
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{path: "/fail"}}
                direct_response: {{status: 500, body: {{inline_string: "failed"}}}}
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "ok"}}}}
          http_filters:
          # Reads a POST's body before answering: a direct response to a request whose body
          # is unread makes Envoy close the connection, and the Envoy under test would pay
          # for a new upstream connection per POST.
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 65536
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

FRONT = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          use_remote_address: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream, timeout: 10s}}
          http_filters:
{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}
"""

NATIVE = """
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: bench
              token_bucket: {max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s}
              filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
              filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}
"""

WASM = """
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: bench
                root_id: resilience
                allow_on_headers_stop_iteration: true
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{configuration}'
                vm_config:
                  vm_id: bench
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}
"""


class Envoy:
    """One Envoy, pinned to `cpus`; `port` serves, `admin` has its stats."""

    next_port = 20000

    def __init__(self, envoy_bin, workdir, name, template, workers, cpus, port=None, admin=True,
                 filters=""):
        self.port = port or Envoy.take_port()
        self.admin = Envoy.take_port() if admin else None
        path = workdir / f"{name}.yaml"
        path.write_text(template.format(port=self.port, admin=self.admin,
                                        upstream=UPSTREAM_PORT[0], filters=filters))
        log = open(workdir / f"{name}.log", "w")
        self.process = subprocess.Popen(
            ["taskset", "-c", cpus, envoy_bin, "-c", str(path), "--concurrency", str(workers),
             "--disable-hot-restart", "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT)

    @staticmethod
    def take_port():
        Envoy.next_port += 1
        return Envoy.next_port

    def wait_ready(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"Envoy on :{self.port} exited; see its log")
            try:
                if self.admin is None:
                    return
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"Envoy on :{self.port} never became ready")

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stats(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?format=json") as r:
            return {s["name"]: s.get("value", 0) for s in json.load(r)["stats"] if "name" in s}

    def stop(self):
        self.process.terminate()
        self.process.wait()


UPSTREAM_PORT = [0]


def front_filters(filter_, wasm):
    """The HTTP filters the front Envoy runs before its router."""
    if filter_ is None:
        return ""
    if filter_ == "native":
        return NATIVE.rstrip("\n")
    return WASM.format(configuration=json.dumps(filter_), wasm=wasm).rstrip("\n")


def run_wrk(port, method, seconds, connections, scripts):
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
               "--latency", f"http://127.0.0.1:{port}/"]
    if method == "post":
        command[-1:-1] = ["-s", str(scripts / "post.lua")]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    p99_ms = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)] if p99 else float("nan")
    if errors:
        print(f"  wrk socket errors: {errors.group(1)}", file=sys.stderr)
    return {"requests": requests, "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": 1 if errors else 0, "p99_ms": p99_ms}


def fail_once(port):
    """One request the upstream answers 500."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/fail", timeout=5).close()
    except urllib.error.HTTPError as answer:
        if answer.code != 500:
            raise


def median_range(values, digits=0):
    fmt = f"{{:.{digits}f}}"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def bench(args, workers, variants, workdir):
    """Runs every variant (name, filter, method, wasm) for `args.rounds` interleaved rounds."""
    envoys = []
    for i, (name, filter_, method, wasm) in enumerate(variants):
        envoys.append(Envoy(args.envoy, workdir, f"w{workers}-{i}", FRONT, workers, "0",
                            filters=front_filters(filter_, wasm)))
    try:
        for envoy in envoys:
            envoy.wait_ready()
        results = {i: [] for i in range(len(variants))}
        for envoy, (_, _, method, _) in zip(envoys, variants):
            # One failure first: a breaker's state then exists, as it does in any Envoy that
            # has ever seen its upstream fail (a breaker that never did reads nothing but an
            # absent key, which costs less than reading a state).
            fail_once(envoy.port)
            run_wrk(envoy.port, method, 1, args.connections, workdir)  # warm-up
        for round_ in range(args.rounds):
            for i, (envoy, (name, _, method, _)) in enumerate(zip(envoys, variants)):
                before = envoy.cpu_seconds()
                measured = run_wrk(envoy.port, method, args.seconds, args.connections, workdir)
                cpu = envoy.cpu_seconds() - before
                measured["cpu_us"] = cpu * 1e6 / max(measured["requests"], 1)
                measured["rps"] = measured["requests"] / args.seconds
                results[i].append(measured)
                print(f"  workers {workers}, round {round_ + 1}/{args.rounds}: {name}: "
                      f"{measured['cpu_us']:.1f} µs/req, {measured['rps']:.0f} req/s"
                      + (f", {measured['non_2xx']} non-2xx" if measured["non_2xx"] else ""),
                      file=sys.stderr)
        rss = [envoy.rss_kib() for envoy in envoys]
    finally:
        for envoy in envoys:
            envoy.stop()
    return results, rss


def host_calls(args, workdir):
    """Per filter case: the hostcalls and callbacks per request, from a counting build."""
    counts = {}
    for i, (name, filter_, method) in enumerate(CASES):
        if filter_ in (None, "native") or (args.only and not re.search(args.only, name)):
            continue
        envoy = Envoy(args.envoy, workdir, f"calls-{i}", FRONT, 1, "0",
                      filters=front_filters(filter_, args.host_calls))
        try:
            envoy.wait_ready()
            fail_once(envoy.port)
            run_wrk(envoy.port, method, 1, args.connections, workdir)
            time.sleep(0.3)  # the counters' flush
            stats = envoy.stats()
        finally:
            envoy.stop()
        requests = stats.get("http.front.downstream_rq_completed", 0)
        calls = {k.rsplit(".", 1)[1]: v / max(requests, 1)
                 for k, v in stats.items() if k.startswith("wasmcustom.resilience.host_calls.")}
        counts[name] = calls
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envoy", default=str(ROOT / ".venv/bin/envoy"))
    parser.add_argument("--wasm", default=str(ROOT / "target/wasm32-wasip1/release/envoy_resilience.wasm"))
    parser.add_argument("--baseline-wasm", help="run every filter configuration with this .wasm too")
    parser.add_argument("--host-calls", help="a .wasm built with the host-calls feature")
    parser.add_argument("--probe", help="the probe .wasm (tests/bench/probe)")
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "target/bench/results.md"))
    parser.add_argument("--only", help="a regular expression: only the configurations it finds")
    args = parser.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit("needs two cores: Envoy on core 0, the upstream and wrk on core 1")

    variants = []
    for name, filter_, method in CASES:
        if args.only and not re.search(args.only, name):
            continue
        variants.append((name, filter_, method, args.wasm))
        if args.baseline_wasm and filter_ not in (None, "native"):
            variants.append((f"{name} (baseline)", filter_, method, args.baseline_wasm))
    if args.probe:
        variants += [(name, spec, "get", args.probe) for name, spec in PROBES
                     if not args.only or re.search(args.only, name)]

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "post.lua").write_text(POST_SCRIPT)
        UPSTREAM_PORT[0] = Envoy.take_port()
        upstream = Envoy(args.envoy, workdir, "upstream", UPSTREAM, 1, "1",
                         port=UPSTREAM_PORT[0], admin=False)
        time.sleep(1)
        try:
            tables = []
            rss_rows = {}
            for workers in [int(w) for w in args.workers.split(",")]:
                results, rss = bench(args, workers, variants, workdir)
                tables.append((workers, results))
                rss_rows[workers] = rss
            calls = host_calls(args, workdir) if args.host_calls else {}
        finally:
            upstream.stop()

    lines = [f"# Per-request cost ({time.strftime('%Y-%m-%d')}, {machine()})", "",
             f"Envoy {envoy_version(args.envoy)} pinned to one core, the upstream and wrk "
             f"(1 thread, {args.connections} connections) on another; {args.rounds} interleaved "
             f"rounds of {args.seconds} s; medians (min–max). CPU is the Envoy process's user + "
             "system time per completed request.", ""]
    names = [v[0] for v in variants]
    for workers, results in tables:
        def median_cpu(name):
            if name not in names:
                return None
            return statistics.median(r["cpu_us"] for r in results[names.index(name)])

        def added(cpu, baseline):
            return "—" if baseline is None else f"{cpu - baseline:+.0f}"
        # POSTs are compared with POSTs: the body costs Envoy something of its own.
        router = {"get": median_cpu("router only"), "post": median_cpu("router only, POST")}
        # A baseline build is compared with its own {}.
        empty = {(suffix, method): median_cpu(name + suffix)
                 for suffix in ("", " (baseline)")
                 for method, name in (("get", "filter, {}"), ("post", "filter, {}, POST"))}
        lines += [f"## {workers} worker{'s' if workers > 1 else ''}", "",
                  "| configuration | CPU µs/req | added vs router only | added vs `{}` | req/s | p99 ms | non-2xx | socket errors |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i, (name, filter_, method, _) in enumerate(variants):
            rows = results[i]
            cpu = statistics.median(r["cpu_us"] for r in rows)
            suffix = " (baseline)" if name.endswith(" (baseline)") else ""
            if name.startswith("probe"):
                vs_empty = added(cpu, median_cpu(PROBES[0][0]))
            elif filter_ in (None, "native"):
                vs_empty = "—"
            else:
                vs_empty = added(cpu, empty[(suffix, method)])
            lines.append(
                f"| {name} | {median_range([r['cpu_us'] for r in rows])} | "
                f"{added(cpu, router[method])} | {vs_empty} | {median_range([r['rps'] for r in rows])} | "
                f"{median_range([r['p99_ms'] for r in rows], 2)} | {sum(r['non_2xx'] for r in rows)} | "
                f"{sum(r['socket_errors'] for r in rows)} rounds |")
        lines.append("")
    shown = [n for n in ("router only", "filter, {}", "all four, GET") if n in names]
    for workers, rss in rss_rows.items():
        lines += [f"Envoy RSS after the rounds, {workers} worker(s): "
                  + ", ".join(f"{n} {rss[names.index(n)] / 1024:.0f} MiB" for n in shown), ""]
    if calls:
        call_names = sorted({n for c in calls.values() for n in c})
        lines += ["## Host calls per request (one worker)", "",
                  "| configuration | " + " | ".join(call_names) + " |",
                  "| --- |" + " --- |" * len(call_names)]
        for case, counts in calls.items():
            lines.append(f"| {case} | " + " | ".join(f"{counts.get(n, 0):.2f}" for n in call_names) + " |")
        lines.append("")
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


def machine():
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    return f"{os.cpu_count()} × {model}"


def envoy_version(envoy_bin):
    out = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return found.group(1) if found else "?"


if __name__ == "__main__":
    main()
