-- llmroute gateway, front listener: admits a request only with its route's key, strips that key,
-- and rejects models the route does not serve. Per-route data comes from the route's metadata
-- (filter_metadata["envoy.filters.http.lua"]): route, key, models, passthrough, chains.
-- The model it read from the body goes to the backend listeners in x-llmroute-model, so that a
-- backend that does not rename it never reads (and buffers) the body again; a client's own
-- x-llmroute-model never gets through. A stream whose request asks for no usage is marked
-- x-llmroute-stream: the backend listener asks the provider for it where the provider takes
-- stream_options, and its answer then carries x-llmroute-usage-added: the usage-only chunk the
-- client did not ask for is taken out by the stream usage module (which has read it), or here
-- when the gateway runs without that module.

local function reply(handle, status, body)
  handle:respond({ [":status"] = tostring(status), ["content-type"] = "application/json" }, body)
end

function envoy_on_request(handle)
  local md = handle:metadata()
  local route = md:get("route")
  if route == nil then return end
  local headers = handle:headers()
  local auth = headers:get("authorization")
  local token = nil
  if auth ~= nil then token = auth:match("^[Bb]earer%s+(.-)%s*$") end
  local key = md:get("key")
  if key == nil or key == "" or token == nil or token ~= key then
    reply(handle, 401, openai_error(
      "Incorrect API key provided for llmroute route '" .. route ..
      "'. Use OPENAI_API_KEY from the route's workload Secret.",
      "invalid_request_error", "invalid_api_key", nil))
    return
  end
  headers:remove("authorization")
  headers:remove("x-llmroute-model")
  headers:remove("x-llmroute-stream")
  local method = headers:get(":method")
  local path = headers:get(":path") or ""
  if method == "GET" and (path:match("/v1/models$") or path:match("/v1/models%?")) then
    local data = {}
    for _, m in ipairs(md:get("models")) do
      data[#data + 1] = '{"id":"' .. json_escape(m) .. '","object":"model","created":0,"owned_by":"llmroute/' ..
        json_escape(route) .. '"}'
    end
    reply(handle, 200, '{"object":"list","data":[' .. table.concat(data, ",") .. ']}')
    return
  end
  local op = path:match("^/[^/]+/v1/([^?]*)") or ""
  -- One model of the list: GET /v1/models/{id}.
  local id = method == "GET" and op:match("^models/(.+)$") or nil
  if id ~= nil then
    id = id:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    local known = md:get("passthrough")
    for _, m in ipairs(md:get("models")) do
      if m == id then known = true end
    end
    if known then
      reply(handle, 200, '{"id":"' .. json_escape(id) .. '","object":"model","created":0,"owned_by":"llmroute/' ..
        json_escape(route) .. '"}')
    else
      reply(handle, 404, openai_error("The model '" .. id .. "' does not exist or is not served by llmroute route '" ..
        route .. "'.", "invalid_request_error", "model_not_found", "model"))
    end
    return
  end
  -- An operation no backend of the route serves is answered here, naming what they do serve.
  local kind = endpoint_of(op)
  -- (Every provider serves chat: the common case reads no more metadata.)
  if kind ~= nil and kind ~= "chat/completions" then
    local endpoints = md:get("endpoints") or {}
    local served = false
    for _, e in ipairs(endpoints) do
      if e == kind then served = true end
    end
    if not served then
      reply(handle, 404, openai_error("No backend of llmroute route '" .. route .. "' serves /v1/" .. kind ..
        "; its backends' providers serve: /v1/" .. table.concat(endpoints, ", /v1/") .. ".",
        "invalid_request_error", "unsupported_endpoint", nil))
      return
    end
  end
  if md:get("passthrough") or method ~= "POST" then return end
  -- Handles taken before body() are invalid afterwards: read what is needed first.
  local models = md:get("models")
  local raw = body_string(handle)
  if raw == nil then return end
  local model = raw:match('"model"%s*:%s*"([^"]*)"')
  if model == nil then return end
  for _, m in ipairs(models) do
    if m == model then
      -- A headers handle taken before body() is invalid afterwards: take it again.
      headers = handle:headers()
      if not model:find("%c") then headers:add("x-llmroute-model", model) end
      if raw:find('"stream"%s*:%s*true') and not raw:find('"stream_options"', 1, true) then
        headers:add("x-llmroute-stream", "1")
      end
      return
    end
  end
  reply(handle, 404, openai_error(
    "The model '" .. model .. "' does not exist or is not served by llmroute route '" .. route ..
    "'. Models: " .. table.concat(models, ", ") .. ".",
    "invalid_request_error", "model_not_found", "model"))
end

-- Passes a stream on event by event without the usage-only event (no choices, a usage object):
-- complete events go on as they arrive, a partial one waits for its end (one the stream ends in
-- the middle of is dropped, as an SSE client drops it).
local function hide_usage_event(handle)
  local partial = ""
  for chunk in handle:bodyChunks() do
    local data = partial .. chunk:getBytes(0, chunk:length())
    local out = {}
    local pos = 1
    while true do
      local s, e = data:find("\r?\n\r?\n", pos)
      if s == nil then break end
      local event = data:sub(pos, e)
      if not (event:find('"choices"%s*:%s*%[%s*%]') and event:find('"usage"%s*:%s*{')) then
        out[#out + 1] = event
      end
      pos = e + 1
    end
    partial = data:sub(pos)
    chunk:setBytes(table.concat(out))
  end
end

-- Token usage of a whole JSON answer (a chat completion, a text completion, embeddings, a response
-- of the Responses API) into the dynamic metadata namespace `llmroute`, which the access log carries
-- to the Pod's sidecar. Streams are read by llmroute's Envoy module instead (sse-usage/).
-- Holds the answer until its end (a whole answer is sent at once anyway), within the listener's
-- buffer limit. Only finds the usage object and hands its text on (key `usage`, as that module
-- does): the sidecar reads the counts, off the answer's path (and knows the provider's model from
-- the route). Read as text, the way the request's model is read: a `"usage":` inside a string value
-- has its quotes escaped, so it never matches; `%b{}` takes the object whole, nested details
-- included. The last one is the answer's own: a response of the Responses API echoes the request's
-- tools and text format, whose JSON schemas may have a property named `usage`, and OpenAI puts
-- `usage` after them (after `choices` in a completion). This costs a fraction of a JSON parse of the
-- whole answer (docs/benchmarks.md).
local function read_usage(handle)
  local raw = body_string(handle)
  if raw == nil then return end
  local usage = nil
  for u in raw:gmatch('"usage"%s*:%s*(%b{})') do usage = u end
  if usage == nil then return end
  handle:streamInfo():dynamicMetadata():set("llmroute", "usage", usage)
end

-- When the answer is a failure the route fails over on (the backend listener marked it retriable)
-- the whole chain has been tried: answer with one OpenAI-shaped error naming every backend tried,
-- instead of only the last backend's own error. Earlier attempts' responses are gone by now (Envoy
-- discards them when it retries), so for those the error says that they failed over.
function envoy_on_response(handle)
  local headers = handle:headers()
  local added = headers:get("x-llmroute-usage-added")
  if added ~= nil then
    headers:remove("x-llmroute-usage-added")
    -- llmroute's stream usage module (before this filter on the way back) takes the event out and
    -- says "hidden"; without the module, this filter does.
    if added ~= "hidden" then hide_usage_event(handle) end
    return
  end
  -- The marker is internal: it never reaches clients. Only failures carry it.
  if headers:get("x-llmroute-retry") == nil then
    local ct = headers:get("content-type")
    if ct ~= nil and ct:find("json", 1, true) and (headers:get(":status") or ""):sub(1, 1) == "2" then
      read_usage(handle)
    end
    return
  end
  headers:remove("x-llmroute-retry")
  local md = handle:metadata()
  local route = md:get("route")
  if route == nil then return end
  local status = headers:get(":status") or "502"
  local last = headers:get("x-llmroute-backend") or "?"
  local class = headers:get("x-llmroute-failure") or "Unknown"
  local attempts = tonumber(headers:get("x-envoy-attempt-count") or "1") or 1
  local tried = { last }
  for _, chain in ipairs(md:get("chains") or {}) do
    if chain[attempts] == last then
      tried = {}
      for i = 1, attempts do tried[i] = chain[i] end
      break
    end
  end
  local parts = {}
  local items = {}
  for i, name in ipairs(tried) do
    if i == #tried then
      parts[i] = name .. " (" .. class .. ", HTTP " .. status .. ")"
      items[i] = '{"backend":"' .. json_escape(name) .. '","failure":"' .. json_escape(class) ..
        '","status":' .. tonumber(status) .. '}'
    else
      parts[i] = name .. " (failed over)"
      items[i] = '{"backend":"' .. json_escape(name) .. '","failure":"FailedOver"}'
    end
  end
  local message = "All " .. #tried .. " backend(s) of llmroute route '" .. route ..
    "' failed: " .. table.concat(parts, ", ") .. "."
  local body = '{"error":{"message":"' .. json_escape(message) ..
    '","type":"llmroute_backends_failed","param":null,"code":"all_backends_failed","backends":[' ..
    table.concat(items, ",") .. ']}}'
  local buffered = handle:body()
  headers = handle:headers()
  headers:replace("content-type", "application/json")
  if buffered ~= nil then buffered:setBytes(body) end
end
