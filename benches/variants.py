#!/usr/bin/env python3
"""Variants of the rendered gateway for `scripts/bench-overhead` (BENCH_VARIANTS), each without one
part of the token-usage work, to measure what that part costs (docs/benchmarks.md, phase g):

    BENCH_VARIANTS="same=true;nousage=python3 benches/variants.py nousage;..."

Run in the variant's directory; edits its listeners.json in place. Modes:
  noread   the front Lua does not read whole answers' usage
  nosse    no sse_to_metadata (streams' usage)
  nolog    the access log to stdout without the route's backends, as without a usage log, instead
           of the file the sidecar follows
  nousage  all of the above, and streams are not asked for their usage
  nohide   the front Lua does not take out the usage event it asked for (streams)
  sseparse sse_to_metadata with one rule that never matches: each event parsed, nothing written
  noask    streams are not asked for their usage (nor their usage event hidden, nor counted)
  luastreams  no sse_to_metadata: the front Lua reads every stream's usage (the last usage object of
           its events, written at the stream's end), as read_usage reads a whole answer's
"""
import json
import sys

mode = sys.argv[1]
assert mode in ("noread", "nosse", "nolog", "nousage", "nohide", "sseparse", "luastreams", "noask"), mode
listeners = json.load(open("listeners.json"))
# luastreams: a stream reader in Lua, in front of envoy_on_response.
READ_STREAM = r'''
local function read_stream_usage(handle)
  local last, partial = nil, ""
  for chunk in handle:bodyChunks() do
    local data = partial .. chunk:getBytes(0, chunk:length())
    local pos, whole = 1, 0
    while true do
      local s, e = data:find("\r?\n\r?\n", pos)
      if s == nil then break end
      whole, pos = e, e + 1
    end
    if whole > 0 then
      for u in data:sub(1, whole):gmatch('"usage"%s*:%s*(%b{})') do last = u end
    end
    partial = data:sub(pos)
  end
  if last ~= nil then handle:streamInfo():dynamicMetadata():set("llmroute", "usage", last) end
end

'''

# The front listener's SSE usage reader (src/gateway/envoy.rs, usage_from_sse).
SSE = "envoy.filters.http.sse_to_metadata"


def replace_once(src, old, new):
    assert src.count(old) == 1, old
    return src.replace(old, new)


edited = False
for listener in listeners["resources"]:
    if listener["name"] != "gateway":
        continue
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            hcm = f["typed_config"]
            if mode in ("noread", "nousage"):
                lua = hcm["http_filters"][0]["typed_config"]["default_source_code"]
                src = replace_once(lua["inline_string"], "      read_usage(handle)\n", "")
                if mode == "nousage":
                    src = replace_once(src, '        headers:add("x-llmroute-stream", "1")\n', "")
                lua["inline_string"] = src
            if mode == "noask":
                lua = hcm["http_filters"][0]["typed_config"]["default_source_code"]
                lua["inline_string"] = replace_once(lua["inline_string"], '        headers:add("x-llmroute-stream", "1")\n', "")
            if mode == "nohide":
                lua = hcm["http_filters"][0]["typed_config"]["default_source_code"]
                lua["inline_string"] = replace_once(lua["inline_string"], "    hide_usage_event(handle)\n", "")
            if mode == "sseparse":
                [sse] = [h for h in hcm["http_filters"] if h["name"] == SSE]
                parser = sse["typed_config"]["response_rules"]["content_parser"]["typed_config"]
                rule = parser["rules"][0]
                rule["rule"]["selectors"] = [{"key": "no-such-key"}]
                parser["rules"] = [rule]
            if mode == "luastreams":
                lua = hcm["http_filters"][0]["typed_config"]["default_source_code"]
                src = replace_once(lua["inline_string"], "function envoy_on_response(handle)\n", READ_STREAM + "function envoy_on_response(handle)\n")
                src = replace_once(src, """      read_usage(handle)
    end
    return""", """      read_usage(handle)
    elseif ct ~= nil and ct:find("text/event-stream", 1, true) and (headers:get(":status") or ""):sub(1, 1) == "2" then
      read_stream_usage(handle)
    end
    return""")
                lua["inline_string"] = src
            if mode in ("nosse", "nousage", "luastreams"):
                before = len(hcm["http_filters"])
                hcm["http_filters"] = [
                    h for h in hcm["http_filters"] if h["name"] != SSE
                ]
                assert len(hcm["http_filters"]) == before - 1
            if mode in ("nolog", "nousage"):
                [log] = hcm["access_log"]
                assert log["name"] == "envoy.access_loggers.file", log["name"]
                fmt = log["typed_config"]["log_format"]["json_format"]
                del fmt["backends"]
                hcm["access_log"] = [{
                    "name": "envoy.access_loggers.stdout",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                        "log_format": {"json_format": fmt},
                    },
                }]
            edited = True
assert edited, "no front listener"
json.dump(listeners, open("listeners.json", "w"))
