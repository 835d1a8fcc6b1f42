#!/usr/bin/env python3
"""`make bench-instructions`: instructions Envoy executes per request, per configuration.

CPU time on a shared 2-core machine moves by 10 µs and more between runs; instruction counts
do not. Each configuration of `make bench` runs in an Envoy (one worker) under
`valgrind --tool=callgrind`, counting only while a client sends REQUESTS requests one after
another on one connection (after one request the upstream fails, so a circuit breaker's state
exists, and a warm-up). The table splits each count by where it ran:

- Envoy: the Envoy binary's own code (HTTP, the proxy-wasm host, shared data, stats);
- V8 builtins: code valgrind finds in no file (V8's embedded builtins: entering and leaving
  the VM, the host's calls back into it);
- wasm: code V8 compiled at run time (the filter's, and the wrappers around each hostcall);
- libc.

Under valgrind Envoy runs about 50 times slower, so anything the filter caches for a few
milliseconds expires between requests here; a circuit breaker's sightings last 1 s and hold.

With --baseline-wasm, every filter configuration runs with that .wasm too.
"""

import argparse
import http.client
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the configurations and Envoy templates of `make bench`)

ROOT = bench.ROOT
PARTS = ("Envoy", "V8 builtins", "wasm", "libc")


def envoy_binary(venv_envoy):
    """The ELF file: valgrind must run Envoy itself, not the virtualenv's Python launcher."""
    found = sorted(Path(venv_envoy).resolve().parents[1].glob("lib/python*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise SystemExit(f"no Envoy binary next to {venv_envoy}")
    return found[0]


def wait_ready(admin, process, deadline_s=300):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("Envoy under valgrind exited; see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit("Envoy under valgrind never became ready")


def send(port, method, count, tag):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(count):
        if method == "post":
            connection.request("POST", "/orders", body='{"item": 1}',
                               headers={"idempotency-key": f"{tag}-{time.time_ns()}-{i}",
                                        "content-type": "application/json"})
        else:
            connection.request("GET", "/")
        connection.getresponse().read()
    connection.close()


def split(profile):
    """Instructions by part, from callgrind_annotate's per-function totals."""
    out = subprocess.run(["callgrind_annotate", "--threshold=100", str(profile)],
                         capture_output=True, text=True, check=True).stdout
    parts = Counter()
    for line in out.splitlines():
        found = re.match(r"\s*([\d,]+) \(.*?\)\s+(.*)$", line)
        if not found or "PROGRAM TOTALS" in line:
            continue
        count, where = int(found.group(1).replace(",", "")), found.group(2)
        obj = where.rsplit("[", 1)[-1].rstrip("]")
        if obj == "???":
            address = re.search(r"0x([0-9a-f]+)", where)
            high = address and int(address.group(1), 16) > 1 << 32
            parts["wasm" if high else "V8 builtins"] += count
        elif "libc" in obj or "libm" in obj:
            parts["libc"] += count
        else:
            parts["Envoy"] += count
    return parts


def measure(args, workdir, name, filter_, method, wasm, index):
    port, admin = bench.Envoy.take_port(), bench.Envoy.take_port()
    config = workdir / f"front-{index}.yaml"
    config.write_text(bench.FRONT.format(port=port, admin=admin, upstream=bench.UPSTREAM_PORT[0],
                                         filters=bench.front_filters(filter_, wasm)))
    profile = workdir / f"callgrind-{index}.out"
    log = open(workdir / f"front-{index}.log", "w")
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no",
         f"--callgrind-out-file={profile}", str(envoy_binary(args.envoy)), "-c", str(config),
         "--concurrency", "1", "--disable-hot-restart", "--log-level", "error"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(admin, process)
        bench.fail_once(port)
        send(port, method, 50, f"warm-{index}")
        subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True,
                       capture_output=True)
        send(port, method, args.requests, f"counted-{index}")
        subprocess.run(["callgrind_control", "-i", "off", str(process.pid)], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True,
                       capture_output=True)
    finally:
        process.terminate()
        process.wait()
    dumps = sorted(workdir.glob(f"callgrind-{index}.out.*"))
    if not dumps:
        raise SystemExit(f"{name}: callgrind wrote no profile")
    parts = split(dumps[-1])
    print(f"  {name}: {sum(parts.values()) / args.requests:,.0f} instructions/request",
          file=sys.stderr)
    return {part: parts[part] / args.requests for part in PARTS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envoy", default=str(ROOT / ".venv/bin/envoy"))
    parser.add_argument("--wasm", default=str(ROOT / "target/wasm32-wasip1/release/envoy_resilience.wasm"))
    parser.add_argument("--baseline-wasm", help="run every filter configuration with this .wasm too")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--only", help="a regular expression: only the configurations it finds")
    parser.add_argument("--out", default=str(ROOT / "target/bench/instructions.md"))
    args = parser.parse_args()

    variants = []
    for name, filter_, method in bench.CASES:
        if filter_ == "native" or (args.only and not re.search(args.only, name)):
            continue
        variants.append((name, filter_, method, args.wasm))
        if args.baseline_wasm and filter_ is not None:
            variants.append((f"{name} (baseline)", filter_, method, args.baseline_wasm))

    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        workdir = Path(tmp)
        bench.UPSTREAM_PORT[0] = bench.Envoy.take_port()
        upstream = bench.Envoy(args.envoy, workdir, "upstream", bench.UPSTREAM, 1, "1",
                               port=bench.UPSTREAM_PORT[0], admin=False)
        time.sleep(1)
        try:
            rows = [(name, method, measure(args, workdir, name, filter_, method, wasm, i))
                    for i, (name, filter_, method, wasm) in enumerate(variants)]
        finally:
            upstream.stop()

    totals = {name: sum(parts.values()) for name, _, parts in rows}
    router = {"get": totals.get("router only"), "post": totals.get("router only, POST")}
    lines = [f"# Instructions per request ({time.strftime('%Y-%m-%d')}, Envoy "
             f"{bench.envoy_version(args.envoy)}, one worker, {args.requests} sequential requests "
             "under callgrind)", "",
             "| configuration | total | added vs router only | " + " | ".join(PARTS) + " |",
             "| --- | --- | --- |" + " --- |" * len(PARTS)]
    for name, method, parts in rows:
        total = totals[name]
        added = "—" if router[method] is None else f"{total - router[method]:+,.0f}"
        lines.append(f"| {name} | {total:,.0f} | {added} | "
                     + " | ".join(f"{parts[p]:,.0f}" for p in PARTS) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
