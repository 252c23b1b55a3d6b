#!/usr/bin/env python3
"""Variants of the rendered gateway for `scripts/bench-overhead` (BENCH_VARIANTS), each without one
part of the token-usage work, to measure what that part costs (docs/benchmarks.md, phase g):

    BENCH_VARIANTS="same=true;nousage=python3 benches/variants.py nousage;..."

Run in the variant's directory; edits its listeners.json in place. Modes:
  noread   the front Lua does not read whole answers' usage
  nosse    no stream usage reader (llmroute's Envoy module, sse-usage/)
  nolog    the access log to stdout without the route's backends, as without a usage log, instead
           of the file the sidecar follows
  nousage  all of the above (streams are still asked for their usage: the request module does that)
  ssetometa  Envoy's sse_to_metadata (the JSON content parser, rules for `usage` and
           `response.usage`) reads streams' usage instead of llmroute's module, as before 2026-12-02
  noask    (withdrawn with issue 29: the request module asks every stream for its usage)
  passthru no stream usage reader; in its place a filter that does nothing (header_mutation without
           mutations): what any filter in that place costs
  luastreams  no stream usage reader: the front Lua reads every stream's usage (the last usage object of
           its events, written at the stream's end), as read_usage reads a whole answer's
  previous the request side as it was before issue 29 (commit d1b9795): no request module, the front
           Lua finds the model with a pattern (and strips no headers), the backend Lua renames it with
           one; what the real parsing, the operation and header allowlists cost
"""
import json
import os
import subprocess
import sys

mode = sys.argv[1]
assert mode in ("noread", "nosse", "nolog", "nousage", "ssetometa", "passthru", "luastreams", "noask",
                "previous"), mode
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
SSE = "envoy.filters.http.dynamic_modules"

# What the gateway had in its place until the module (ssetometa).
SSE_TO_METADATA = {
    "name": "envoy.filters.http.sse_to_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
        "response_rules": {
            "max_event_size": 65536,
            "content_parser": {
                "name": "envoy.content_parsers.json",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                    "rules": [
                        {"rule": {
                            "selectors": [{"key": k} for k in path],
                            "on_present": {"metadata_namespace": "llmroute", "key": "usage", "type": "STRING"},
                        }}
                        for path in (["usage"], ["response", "usage"])
                    ],
                },
            },
        },
    },
}


def replace_once(src, old, new):
    assert src.count(old) == 1, old
    return src.replace(old, new)


def lua_of(hcm):
    """The front listener's Lua source (its filter is not the first: the request module is)."""
    [lua] = [h for h in hcm["http_filters"] if h["name"] == "envoy.filters.http.lua"]
    return lua["typed_config"]["default_source_code"]


# previous: the Lua sources before issue 29 and now, from the repository this script is in.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREVIOUS = "d1b9795"


def lua_source(name, at=None):
    if at is None:
        return open(os.path.join(REPO, "src/gateway/lua", name)).read()
    return subprocess.run(["git", "-C", REPO, "show", f"{at}:src/gateway/lua/{name}"],
                          check=True, capture_output=True, text=True).stdout


def previous_lua(src):
    """The gateway's Lua of `src` (front or backend) as it was at PREVIOUS."""
    for name in ("front.lua", "backend.lua"):
        now = lua_source(name)
        if now in src:
            if name == "front.lua":
                # The front's constants (REQUEST_MODULE...) stand right before its code.
                start = src.index("local REQUEST_MODULE = ")
                return src[:start] + lua_source(name, PREVIOUS)
            return replace_once(src, now, lua_source(name, PREVIOUS))
    raise AssertionError("not the gateway's Lua")


edited = False
if mode == "previous":
    for listener in listeners["resources"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                filters = []
                for h in hcm["http_filters"]:
                    if h["name"] == SSE and h["typed_config"].get("filter_name") == "request":
                        continue
                    if h["name"] == "envoy.filters.http.lua":
                        code = h["typed_config"]["default_source_code"]
                        code["inline_string"] = previous_lua(code["inline_string"])
                    filters.append(h)
                hcm["http_filters"] = filters
    json.dump(listeners, open("listeners.json", "w"))
    sys.exit(0)
for listener in listeners["resources"]:
    if listener["name"] != "gateway":
        continue
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            hcm = f["typed_config"]
            if mode in ("noread", "nousage"):
                lua = lua_of(hcm)
                lua["inline_string"] = replace_once(lua["inline_string"], "      read_usage(handle)\n", "")
            if mode == "noask":
                sys.exit("noask: since issue 29 the request module asks every stream for its usage; "
                         "no configuration turns that off")
            if mode == "passthru":
                [i] = [i for i, h in enumerate(hcm["http_filters"]) if h["name"] == SSE]
                hcm["http_filters"][i] = {
                    "name": "envoy.filters.http.header_mutation",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                        "mutations": {},
                    },
                }
            if mode == "ssetometa":
                [i] = [i for i, h in enumerate(hcm["http_filters"]) if h["name"] == SSE]
                hcm["http_filters"][i] = SSE_TO_METADATA
            if mode == "luastreams":
                lua = lua_of(hcm)
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
