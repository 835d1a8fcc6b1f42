"""A real gRPC server and client (grpcio) for the end-to-end tests.

serve [--port N]: a server on 127.0.0.1 (port N, default any free one) that prints its port,
  then one JSON line per call it receives.
  /demo.Orders/Create   unary: answers b"created:" + the request, or fails with the code in
                        metadata `fail` (a name, e.g. UNAVAILABLE) after `delay-ms`.
  /demo.Orders/Watch    server streaming: `messages` messages, `interval-ms` apart.
call TARGET METHOD [--metadata k=v]... [--body B] [--retries N] [--count N]: calls, one
  after another on one channel; prints a JSON line for each: its code, details, trailing
  metadata, and the messages received. With --retries,
  the channel's service config retries UNAVAILABLE up to N attempts, as gRPC clients are
  commonly set up, honouring grpc-retry-pushback-ms.
"""

import argparse
import json
import sys
import time
from concurrent import futures

import grpc


def identity(b):
    return b


def serve(port):
    def log(method, context, request):
        metadata = dict(context.invocation_metadata())
        print(json.dumps({"method": method, "idempotency_key": metadata.get("idempotency-key"),
                          "body": request.decode("latin-1") if request is not None else None}),
              flush=True)
        return metadata

    def create(request, context):
        metadata = log("Create", context, request)
        time.sleep(int(metadata.get("delay-ms", "0")) / 1000)
        fail = metadata.get("fail")
        if fail:
            context.abort(grpc.StatusCode[fail], "failed on purpose")
        context.set_trailing_metadata((("x-order", "o-1"),))
        return b"created:" + request

    def watch(request, context):
        metadata = log("Watch", context, request)
        for i in range(int(metadata.get("messages", "1"))):
            time.sleep(int(metadata.get("interval-ms", "0")) / 1000)
            yield b"tick %d" % i

    handler = grpc.method_handlers_generic_handler("demo.Orders", {
        "Create": grpc.unary_unary_rpc_method_handler(create, identity, identity),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, identity, identity),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    server.wait_for_termination()


def call(args):
    options = []
    if args.retries:
        config = {"methodConfig": [{"name": [{"service": "demo.Orders"}], "retryPolicy": {
            "maxAttempts": args.retries, "initialBackoff": "0.1s", "maxBackoff": "1s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}
        options = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
    channel = grpc.insecure_channel(args.target, options=options)
    metadata = [tuple(m.split("=", 1)) for m in args.metadata]
    path = "/demo.Orders/" + args.method
    for _ in range(args.count):
        one_call(args, channel, path, metadata)


def one_call(args, channel, path, metadata):
    started = time.monotonic()
    result = {"code": "OK", "details": "", "trailing": {}, "initial": {}, "messages": []}
    try:
        if args.method == "Watch":
            stream = channel.unary_stream(path, identity, identity)(
                args.body.encode(), metadata=metadata, timeout=args.timeout)
            for message in stream:
                result["messages"].append(message.decode("latin-1"))
            call_ = stream
        else:
            response, call_ = channel.unary_unary(path, identity, identity).with_call(
                args.body.encode(), metadata=metadata, timeout=args.timeout)
            result["messages"].append(response.decode("latin-1"))
    except grpc.RpcError as err:
        call_ = err
        result["code"] = err.code().name
        result["details"] = err.details()
    result["trailing"] = dict(call_.trailing_metadata() or ())
    result["initial"] = dict(call_.initial_metadata() or ())
    result["elapsed_ms"] = int((time.monotonic() - started) * 1000)
    print(json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("call")
    c.add_argument("target")
    c.add_argument("method")
    c.add_argument("--metadata", action="append", default=[])
    c.add_argument("--body", default="")
    c.add_argument("--retries", type=int, default=0)
    c.add_argument("--timeout", type=float, default=20)
    c.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port)
    else:
        call(args)


if __name__ == "__main__":
    sys.exit(main())
