#!/usr/bin/env python3
"""Holds many client connections open through a proxy, for scripts/bench.sh memory and
scripts/upgrade-under-load.sh.

  conns.py [--idle HOST:PORT N] [--active HOST:PORT N] [--interval-ms MS]
           [--stalled HOST:PORT N] [--stalled-path PATH] [--rcvbuf BYTES]
           [--ready-file PATH] [--max-seconds S] [--no-verify]

--idle: N HTTP/1.1 keep-alive connections, each sends one GET, reads the response, then stays
        idle (through an L4 proxy that is also a tunnel with both ends connected).
--active: N connections that each send a GET every --interval-ms and check every response;
        the round-trip times show the pause an upgrade causes to a live tunnel.
--stalled: N connections that each send one GET for --stalled-path (a large download) and
        then never read: what a client that stops reading costs the proxy. Their receive
        buffer is set to --rcvbuf before connecting (so the kernel holds little of the
        response); "ready" as soon as every request is sent. At the end each must still be
        open and its first bytes must be a 200 status line (the response was under way).

When every connection is established (and answered once) it writes "ready" to --ready-file.
It runs until SIGUSR1/SIGTERM or --max-seconds, then (unless --no-verify) sends one more GET on
every idle connection and checks the answer (a connection handed over by an upgrade must still
work), and prints one JSON line with the counts and round-trip figures. Exit status 0 when no
connection failed, 1 otherwise. Only one thread and one epoll set: cheap enough for 11,000
connections, and bounded in time.
"""

import argparse
import heapq
import json
import selectors
import signal
import socket
import sys
import time

REQ = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: baton-bench\r\n\r\n"


def request(path):
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: baton-bench\r\n\r\n".encode()


class Conn:
    __slots__ = ("sock", "kind", "buf", "sent_at", "state", "max_rtt", "answered")

    def __init__(self, sock, kind):
        self.sock = sock
        self.kind = kind          # "idle", "active" or "stalled"
        self.buf = b""
        self.sent_at = 0.0
        self.state = "connecting"  # connecting, waiting, idle, sleeping, dead
        self.max_rtt = 0.0
        self.answered = 0


def parse_response(buf):
    """Returns (status, total_len) when buf holds a whole response, else None; raises on garbage."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise ValueError("response head too large")
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {head[0]!r}")
    status = int(parts[1])
    length = 0
    for h in head[1:]:
        k, _, v = h.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
        elif k.strip().lower() == "transfer-encoding":
            raise ValueError("chunked responses are not expected from the bench backend")
    total = end + 4 + length
    if len(buf) < total:
        return None
    return status, total


class Client:
    def __init__(self, args):
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.conns = []
        self.timers = []  # (due, seq, conn)
        self.seq = 0
        self.stop = False
        self.errors = 0
        self.non2xx = 0
        self.error_samples = []
        self.rtts = []
        self.pending_connects = []  # (kind, addr)
        self.in_flight_connects = 0
        self.verifying = False
        self.verified_ok = 0
        self.stalled_ok = 0

    def fail(self, c, why):
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{c.kind}: {why}")
        self.close(c)

    def close(self, c):
        if c.state == "connecting":
            self.in_flight_connects -= 1
        if c.state != "dead":
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
            c.state = "dead"

    def start_connect(self, kind, addr):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if kind == "stalled" and self.args.rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.args.rcvbuf)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect_ex(addr)
        c = Conn(s, kind)
        self.conns.append(c)
        self.in_flight_connects += 1
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def send(self, c):
        try:
            c.sock.send(REQ)
        except OSError as e:
            self.fail(c, f"send: {e}")
            return
        c.sent_at = time.monotonic()
        c.state = "waiting"
        self.sel.modify(c.sock, selectors.EVENT_READ, c)

    def send_stalled(self, c):
        try:
            c.sock.send(request(self.args.stalled_path))
        except OSError as e:
            self.fail(c, f"send: {e}")
            return
        c.state = "stalled"
        c.answered = 1  # counts as established for "ready"; never read until the end
        self.sel.unregister(c.sock)

    def check_stalled(self):
        """Each stalled connection is still open and its response began with a 200 line."""
        ok = 0
        for c in self.conns:
            if c.kind != "stalled" or c.state != "stalled":
                continue
            try:
                c.sock.setblocking(True)
                c.sock.settimeout(5)
                head = b""
                while len(head) < 12:
                    d = c.sock.recv(12 - len(head))
                    if not d:
                        break
                    head += d
            except OSError as e:
                self.fail(c, f"stalled: recv: {e}")
                continue
            if head.startswith(b"HTTP/1.1 200"):
                ok += 1
                c.sock.close()
                c.state = "dead"
            else:
                self.fail(c, f"stalled: response began with {head!r}")
        return ok

    def on_event(self, c, mask):
        if c.state == "connecting":
            self.in_flight_connects -= 1
            c.state = "connected"
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                c.state = "dead"
                self.errors += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(f"{c.kind}: connect: errno {err}")
                self.sel.unregister(c.sock)
                c.sock.close()
                return
            if c.kind == "stalled":
                self.send_stalled(c)
            else:
                self.send(c)
            return
        try:
            data = c.sock.recv(65536)
        except OSError as e:
            self.fail(c, f"recv: {e}")
            return
        if not data:
            self.fail(c, f"closed by peer while {c.state}")
            return
        if c.state != "waiting":
            self.fail(c, f"unexpected {len(data)} bytes while {c.state}")
            return
        c.buf += data
        try:
            r = parse_response(c.buf)
        except ValueError as e:
            self.fail(c, str(e))
            return
        if r is None:
            return
        status, total = r
        if total != len(c.buf):
            self.fail(c, "extra bytes after the response")
            return
        c.buf = b""
        rtt = time.monotonic() - c.sent_at
        c.answered += 1
        if not 200 <= status <= 299:
            self.non2xx += 1
            self.fail(c, f"status {status}")
            return
        if self.verifying:
            self.verified_ok += 1
            c.state = "verified"
            return
        if c.kind == "idle":
            c.state = "idle"  # stay registered for reading: an unexpected close is an error
        else:
            self.rtts.append(rtt)
            c.max_rtt = max(c.max_rtt, rtt)
            c.state = "sleeping"
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            self.seq += 1
            heapq.heappush(self.timers, (time.monotonic() + self.args.interval_ms / 1000, self.seq, c))

    def loop_once(self, timeout):
        for key, mask in self.sel.select(timeout):
            self.on_event(key.data, mask)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, c = heapq.heappop(self.timers)
            if c.state == "sleeping" and not self.stop:
                self.send(c)

    def run(self):
        a = self.args
        for spec, kind in ((a.idle, "idle"), (a.active, "active"), (a.stalled, "stalled")):
            if spec:
                host, port = spec[0].rsplit(":", 1)
                self.pending_connects += [(kind, (host, int(port)))] * int(spec[1])
        total = len(self.pending_connects)
        deadline = time.monotonic() + a.max_seconds
        ready = False
        while not self.stop and time.monotonic() < deadline:
            while self.pending_connects and self.in_flight_connects < a.batch:
                self.start_connect(*self.pending_connects.pop())
            self.loop_once(0.02)
            if not ready and not self.pending_connects:
                done = sum(1 for c in self.conns if c.answered or c.state == "dead")
                if done == total:
                    ready = True
                    if a.ready_file:
                        with open(a.ready_file, "w", encoding="utf-8") as f:
                            f.write("ready\n")
        # Stop the active loops: let responses in flight arrive (bounded), then verify idle ones.
        self.stop = True
        end = time.monotonic() + 10
        while time.monotonic() < end and any(c.state == "waiting" for c in self.conns):
            self.loop_once(0.05)
        idle = [c for c in self.conns if c.kind == "idle" and c.state == "idle"]
        if not a.no_verify and idle:
            self.verifying = True
            for c in idle:
                self.send(c)
            end = time.monotonic() + 30
            while time.monotonic() < end and any(c.state == "waiting" for c in idle):
                self.loop_once(0.05)
            for c in idle:
                if c.state == "waiting":
                    self.fail(c, "no answer to the verification request")
        self.stalled_ok = self.check_stalled()
        return ready, total

    def summary(self, ready, total):
        def pct(xs, p):
            if not xs:
                return None
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, int(len(xs) * p / 100))] * 1000, 2)

        active = [c for c in self.conns if c.kind == "active"]
        maxes = [c.max_rtt for c in active if c.answered]
        return {
            "ready": ready,
            "connections": total,
            "idle": sum(1 for c in self.conns if c.kind == "idle"),
            "idle_verified_ok": self.verified_ok,
            "active": len(active),
            "active_requests": len(self.rtts),
            "stalled": sum(1 for c in self.conns if c.kind == "stalled"),
            "stalled_ok": self.stalled_ok,
            "errors": self.errors,
            "non2xx": self.non2xx,
            "error_samples": self.error_samples,
            "rtt_p50_ms": pct(self.rtts, 50),
            "rtt_p99_ms": pct(self.rtts, 99),
            "tunnel_max_rtt_p50_ms": pct(maxes, 50),
            "tunnel_max_rtt_p99_ms": pct(maxes, 99),
            "tunnel_max_rtt_max_ms": pct(maxes, 100),
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--idle", nargs=2, metavar=("HOST:PORT", "N"))
    p.add_argument("--active", nargs=2, metavar=("HOST:PORT", "N"))
    p.add_argument("--interval-ms", type=float, default=100)
    p.add_argument("--stalled", nargs=2, metavar=("HOST:PORT", "N"))
    p.add_argument("--stalled-path", default="/big")
    p.add_argument("--rcvbuf", type=int, default=16384, help="SO_RCVBUF of stalled connections")
    p.add_argument("--batch", type=int, default=256, help="connects in flight at once")
    p.add_argument("--ready-file")
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args()
    client = Client(args)

    def on_signal(_sig, _frame):
        client.stop = True

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ready, total = client.run()
    s = client.summary(ready, total)
    print(json.dumps(s), flush=True)
    sys.exit(0 if ready and s["errors"] == 0 else 1)


if __name__ == "__main__":
    main()
