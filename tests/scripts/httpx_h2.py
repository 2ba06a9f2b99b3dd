"""HTTP/2 clients for the upgrade tests (h2c with prior knowledge for an http:// URL; h2 chosen
by ALPN for https://, verified against the CA file named by the optional third argument): a
sequential httpx client and a multiplexed one (10 requests at a time on one connection), both
reusing their pooled connection, until the file named by the second argument exists. Prints one JSON line:
requests done, the number of errors and the distinct ones (at most ten), and for each error
where httpcore's HTTP/2 connection raised it (`where`: the innermost function of
httpcore/_async/http2.py in the deepest exception of its chain; `detail`: that and the stream
id, for the first twenty), per client."""

import asyncio
import json
import os
import ssl
import sys

import httpx


def where(e):
    """The innermost httpcore HTTP/2 function of the deepest exception in e's chain, and the
    stream id it was working on (None if it had none)."""
    name, stream, seen = "?", None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb, found = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(
                os.path.join("httpcore", "_async", "http2.py")
            ):
                found = tb
            tb = tb.tb_next
        if found is not None:
            name = found.tb_frame.f_code.co_name
            stream = found.tb_frame.f_locals.get("stream_id")
        e = e.__cause__ or e.__context__
    return name, stream


def failed(out, e):
    out["errors"].append(f"{type(e).__name__}: {e}")
    w, stream = where(e)
    out["where"][w] = out["where"].get(w, 0) + 1
    out["detail"].append(f"{w} stream={stream}: {e}")


async def sequential(url, stop, out, verify):
    async with httpx.AsyncClient(http1=False, http2=True, timeout=20, verify=verify) as c:
        while not os.path.exists(stop):
            try:
                r = await c.get(url)
                if r.status_code != 200:
                    out["errors"].append(f"status {r.status_code}")
                out["requests"] += 1
            except Exception as e:  # every failure is the test's finding
                failed(out, e)
            await asyncio.sleep(0.005)


async def multiplexed(url, stop, out, verify):
    async with httpx.AsyncClient(http1=False, http2=True, timeout=20, verify=verify) as c:
        while not os.path.exists(stop):
            rs = await asyncio.gather(*(c.get(url) for _ in range(10)), return_exceptions=True)
            for r in rs:
                if isinstance(r, Exception):
                    failed(out, r)
                elif r.status_code != 200:
                    out["errors"].append(f"status {r.status_code}")
                else:
                    out["requests"] += 1
            await asyncio.sleep(0.005)


async def main():
    url, stop = sys.argv[1], sys.argv[2]
    verify = ssl.create_default_context(cafile=sys.argv[3]) if len(sys.argv) > 3 else True
    seq = {"requests": 0, "errors": [], "where": {}, "detail": []}
    mux = {"requests": 0, "errors": [], "where": {}, "detail": []}
    print("ready", flush=True)
    await asyncio.gather(
        sequential(url, stop, seq, verify), multiplexed(url, stop, mux, verify)
    )
    for c in (seq, mux):
        c["error_count"] = len(c["errors"])
        c["errors"] = sorted(set(c["errors"]))[:10]
        c["detail"] = c["detail"][:20]
    print(json.dumps({"sequential": seq, "multiplexed": mux}), flush=True)


asyncio.run(main())
