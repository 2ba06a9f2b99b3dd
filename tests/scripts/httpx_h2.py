"""HTTP/2 (h2c, prior knowledge) clients for the upgrade tests: a sequential httpx client and a
multiplexed one (10 requests at a time on one connection), both reusing their pooled
connection, until the file named by the second argument exists. Prints one JSON line:
requests done, the number of errors and the distinct ones (at most ten), per client."""

import asyncio
import json
import os
import sys

import httpx


async def sequential(url, stop, out):
    async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as c:
        while not os.path.exists(stop):
            try:
                r = await c.get(url)
                if r.status_code != 200:
                    out["errors"].append(f"status {r.status_code}")
                out["requests"] += 1
            except Exception as e:  # every failure is the test's finding
                out["errors"].append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.005)


async def multiplexed(url, stop, out):
    async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as c:
        while not os.path.exists(stop):
            rs = await asyncio.gather(*(c.get(url) for _ in range(10)), return_exceptions=True)
            for r in rs:
                if isinstance(r, Exception):
                    out["errors"].append(f"{type(r).__name__}: {r}")
                elif r.status_code != 200:
                    out["errors"].append(f"status {r.status_code}")
                else:
                    out["requests"] += 1
            await asyncio.sleep(0.005)


async def main():
    url, stop = sys.argv[1], sys.argv[2]
    seq = {"requests": 0, "errors": []}
    mux = {"requests": 0, "errors": []}
    print("ready", flush=True)
    await asyncio.gather(sequential(url, stop, seq), multiplexed(url, stop, mux))
    for c in (seq, mux):
        c["error_count"] = len(c["errors"])
        c["errors"] = sorted(set(c["errors"]))[:10]
    print(json.dumps({"sequential": seq, "multiplexed": mux}), flush=True)


asyncio.run(main())
