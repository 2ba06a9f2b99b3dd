#!/usr/bin/env python3
"""Turns the per-run lines written by scripts/bench.sh into Markdown tables (stdout).

Input (argv[1]): one whitespace-separated `key=value` line per wrk run, with keys
round, case, target, requests, duration_us, p50_us, p99_us, connect, read, write, timeout,
status, cpu_ticks, clk_tck. Per target and case it reports medians over the rounds: req/s,
p50, p99, the ratio to `direct` in the same round, the wrk errors summed over all rounds, and
the proxy's CPU seconds per 100k requests.
"""

import statistics
import sys
from collections import defaultdict

CASES = [("keepalive", "keep-alive (`wrk -t1 -c64`)"),
         ("close", "new connection per request (`-H 'Connection: close'`)")]
ORDER = ["direct", "baton-tcp", "haproxy-tcp", "nginx-stream",
         "baton-http", "haproxy-http", "nginx-http"]


def parse(path):
    runs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
            if not kv:
                continue
            for k in list(kv):
                if k not in ("case", "target"):
                    kv[k] = float(kv[k])
            runs.append(kv)
    return runs


def fmt_k(v):
    return f"{v / 1000:.1f}k"


def fmt_ms(us):
    return f"{us / 1000:.2f} ms"


def table(runs, case):
    by = defaultdict(list)
    direct = {}
    for r in runs:
        if r["case"] != case:
            continue
        rps = r["requests"] / (r["duration_us"] / 1e6)
        r["rps"] = rps
        by[r["target"]].append(r)
        if r["target"] == "direct":
            direct[r["round"]] = rps
    if not by:
        return None
    rows = ["| target | req/s | p50 | p99 | ratio to direct | wrk errors (c/r/w/t + non-2xx) "
            "| proxy CPU s / 100k req | rounds |",
            "|---|---:|---:|---:|---:|---|---:|---:|"]
    targets = [t for t in ORDER if t in by] + sorted(t for t in by if t not in ORDER)
    for t in targets:
        rs = by[t]
        rps = statistics.median(r["rps"] for r in rs)
        p50 = statistics.median(r["p50_us"] for r in rs)
        p99 = statistics.median(r["p99_us"] for r in rs)
        ratios = [r["rps"] / direct[r["round"]] for r in rs if direct.get(r["round"])]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "—"
        errs = [int(sum(r[k] for r in rs)) for k in ("connect", "read", "write", "timeout", "status")]
        err = "0" if not any(errs) else f"{errs[0]}/{errs[1]}/{errs[2]}/{errs[3]} + {errs[4]}"
        if t == "direct":
            cpu = "—"
        else:
            per = [r["cpu_ticks"] / r["clk_tck"] / r["requests"] * 1e5 for r in rs if r["requests"]]
            cpu = f"{statistics.median(per):.2f}" if per else "—"
        rows.append(f"| {t} | {fmt_k(rps)} | {fmt_ms(p50)} | {fmt_ms(p99)} | {ratio} | {err} "
                    f"| {cpu} | {len(rs)} |")
    return "\n".join(rows)


def main():
    runs = parse(sys.argv[1])
    for case, title in CASES:
        t = table(runs, case)
        if t:
            print(f"\n### {title}\n")
            print(t)
    print()


if __name__ == "__main__":
    main()
