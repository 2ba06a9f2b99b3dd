-- wrk script for scripts/upgrade-under-load.sh: counts every response that is not 2xx
-- (wrk's own counter only counts status >= 400) and prints one machine-readable line.
-- The response callback costs wrk some speed; this script measures correctness, not speed.
local threads = {}

setup = function(thread)
  table.insert(threads, thread)
end

init = function(args)
  non2xx = 0
end

response = function(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

done = function(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do
    n = n + (t:get("non2xx") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    "UPGRADE requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d connect=%d read=%d write=%d timeout=%d status=%d non2xx=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status, n))
end
