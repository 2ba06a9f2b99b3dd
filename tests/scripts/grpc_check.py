"""A real gRPC server and client (grpcio, gRPC's C core) for tests/upgrade_grpc.rs.

    grpc_check.py server
        Serves service t.S on 127.0.0.1 (a port the OS picks, printed as "port N") until its
        standard input closes: Echo (unary, returns the request), Count (server streaming: the
        numbers 0..N-1 as text, 20 ms apart), Sum (client streaming: the total length of the
        messages, as text) and Missing (always fails with NOT_FOUND "no such thing").

    grpc_check.py client TARGET STOP PROGRESS [CA]
        One channel to TARGET (TLS verified against the CA file when given, for the name
        localhost). First the checks every call kind needs (a 3 MB echo, a stream, an upload,
        an error status); prints "ready"; then, until the file STOP exists, Echo calls in a loop
        beside a thread that keeps a Count stream of 20 open, writing the Echo count to PROGRESS
        every 50 calls; then the checks again. Prints one JSON line: calls and streams done,
        and the errors (at most ten distinct)."""

import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc

ident = lambda b: b  # noqa: E731 (messages are raw bytes: no protobuf needed)


def serve():
    def count(req, ctx):
        for i in range(int(req.decode())):
            yield str(i).encode()
            time.sleep(0.02)

    def missing(req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    handler = grpc.method_handlers_generic_handler(
        "t.S",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda r, c: r, ident, ident),
            "Count": grpc.unary_stream_rpc_method_handler(count, ident, ident),
            "Sum": grpc.stream_unary_rpc_method_handler(
                lambda it, c: str(sum(len(m) for m in it)).encode(), ident, ident
            ),
            "Missing": grpc.unary_unary_rpc_method_handler(missing, ident, ident),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    sys.stdin.read()
    server.stop(1)


def checks(ch, errors):
    """Each call kind once: what a proxy that loses trailers, flow control or `te` breaks."""
    big = os.urandom(3_000_000)
    if ch.unary_unary("/t.S/Echo", ident, ident)(big, timeout=20) != big:
        errors.append("3 MB echo differs")
    got = [m.decode() for m in ch.unary_stream("/t.S/Count", ident, ident)(b"5", timeout=20)]
    if got != [str(i) for i in range(5)]:
        errors.append(f"stream gave {got}")
    total = ch.stream_unary("/t.S/Sum", ident, ident)(iter([b"a" * 1000] * 100), timeout=20)
    if total != b"100000":
        errors.append(f"upload sum {total!r}")
    try:
        ch.unary_unary("/t.S/Missing", ident, ident)(b"", timeout=20)
        errors.append("Missing succeeded")
    except grpc.RpcError as e:
        if (e.code(), e.details()) != (grpc.StatusCode.NOT_FOUND, "no such thing"):
            errors.append(f"Missing gave {e.code()} {e.details()!r}")


def client(target, stop, progress, ca):
    if ca:
        creds = grpc.ssl_channel_credentials(open(ca, "rb").read())
        ch = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
    else:
        ch = grpc.insecure_channel(target)
    errors, out = [], {"calls": 0, "streams": 0}
    try:
        checks(ch, errors)
    except grpc.RpcError as e:
        errors.append(f"checks: {e.code()} {e.details()}")
    print("ready", flush=True)
    echo = ch.unary_unary("/t.S/Echo", ident, ident)
    count = ch.unary_stream("/t.S/Count", ident, ident)

    def streams():
        while not os.path.exists(stop):
            try:
                got = [m.decode() for m in count(b"20", timeout=30)]
                if got != [str(i) for i in range(20)]:
                    errors.append(f"stream gave {got}")
                out["streams"] += 1
            except grpc.RpcError as e:
                errors.append(f"stream: {e.code()} {e.details()}")

    t = threading.Thread(target=streams)
    t.start()
    while not os.path.exists(stop):
        try:
            msg = str(out["calls"]).encode()
            if echo(msg, timeout=20) != msg:
                errors.append("echo differs")
            out["calls"] += 1
            if out["calls"] % 50 == 0:
                with open(progress + ".tmp", "w") as f:
                    f.write(str(out["calls"]))
                os.replace(progress + ".tmp", progress)
        except grpc.RpcError as e:
            errors.append(f"echo: {e.code()} {e.details()}")
    t.join()
    try:
        checks(ch, errors)
    except grpc.RpcError as e:
        errors.append(f"checks: {e.code()} {e.details()}")
    out["error_count"] = len(errors)
    out["errors"] = sorted(set(errors))[:10]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    else:
        client(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
