#!/usr/bin/env python3
"""Holds N idle HTTP/1.1 keep-alive connections, plain or over TLS, for scripts/bench.sh memory
(idle-https) and scripts/bench/tls-handover.sh.

  idle.py HOST:PORT N [--tls] [--ready-file PATH] [--max-seconds S] [--no-verify]

Each connection is opened, (with --tls) completes its handshake without verifying the
certificate (a benchmark's self-signed one), sends one GET, reads the whole response, and then
stays idle. Connections are set up one after another with blocking sockets: simple, and a TLS
1.3 handshake on 127.0.0.1 costs about a millisecond. When all are answered it writes "ready"
to --ready-file. It runs until SIGUSR1/SIGTERM or --max-seconds, then (unless --no-verify)
sends one more GET on every connection and checks the answer (a connection handed over by an
upgrade must still work), and prints one JSON line: {"n", "established", "verified_ok",
"errors", "error_samples"}. Exit status 0 when no connection failed.
"""

import argparse
import json
import signal
import socket
import ssl
import sys
import time

REQ = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: baton-bench\r\n\r\n"


def read_response(sock):
    """Reads one Content-Length response; returns its status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response head")
        buf += chunk
        if len(buf) > 65536:
            raise ValueError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for h in lines[1:]:
        k, _, v = h.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a response body")
        rest += chunk
    return status


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("n", type=int)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--ready-file")
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args()
    host, _, port = a.addr.rpartition(":")
    ctx = None
    if a.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    conns, errors, samples = [], 0, []

    def fail(why):
        nonlocal errors
        errors += 1
        if len(samples) < 5:
            samples.append(why)

    deadline = time.monotonic() + a.max_seconds
    for _ in range(a.n):
        if stop or time.monotonic() > deadline:
            break
        try:
            s = socket.create_connection((host, int(port)), timeout=30)
            if ctx:
                s = ctx.wrap_socket(s, server_hostname="localhost")
            s.sendall(REQ)
            if read_response(s) >= 400:
                fail("status >= 400 on the first request")
            conns.append(s)
        except (OSError, ValueError) as e:
            fail(f"setup: {e}")
    if a.ready_file:
        with open(a.ready_file, "w") as f:
            f.write("ready\n")
    while not stop and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = 0
    if not a.no_verify:
        for s in conns:
            try:
                s.sendall(REQ)
                if read_response(s) < 400:
                    ok += 1
                else:
                    fail("status >= 400 after the hold")
            except (OSError, ValueError) as e:
                fail(f"verify: {e}")
    for s in conns:
        s.close()
    print(json.dumps({"n": a.n, "established": len(conns), "verified_ok": ok,
                      "errors": errors, "error_samples": samples}))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
