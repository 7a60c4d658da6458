-- POSTs the body in SHOAL_WRK_BODY to the URL wrk is given, on every connection, and reports as one
-- JSON line: requests, duration, latency percentiles (microseconds), errors of every kind (socket,
-- non-2xx, and `error` events inside a streamed 200), and for streamed responses the SSE events that
-- carried text and the tokens they delivered (from each stream's final usage).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("SHOAL_WRK_BODY")
-- The key the endpoint asks for: the router's API key, or a worker's internal token on its own API.
if os.getenv("SHOAL_WRK_KEY") then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("SHOAL_WRK_KEY")
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  events = 0
  tokens = 0
  failed = 0
end

function response(status, headers, body)
  if status ~= 200 then
    return
  end
  if string.find(body, '"error":', 1, true) then
    failed = failed + 1
  end
  local n = 0
  for _ in string.gmatch(body, 'data: {"id"[^\n]-"text":"[^"]') do n = n + 1 end
  for _ in string.gmatch(body, 'data: {"id"[^\n]-"content":"[^"]') do n = n + 1 end
  events = events + n
  local used = string.match(body, '"completion_tokens":(%d+)')
  if used and n > 0 then
    tokens = tokens + tonumber(used)
  end
end

function done(summary, latency, requests)
  local e, t, f = 0, 0, 0
  for _, thread in ipairs(threads) do
    e = e + thread:get("events")
    t = t + thread:get("tokens")
    f = f + thread:get("failed")
  end
  local s = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"socket_errors":%d,"status_errors":%d,' ..
    '"error_events":%d,"events":%d,"tokens":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    s.connect + s.read + s.write + s.timeout, s.status, f, e, t))
end
