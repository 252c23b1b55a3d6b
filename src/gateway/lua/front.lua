-- llmroute gateway, front listener: admits a request only with its route's key, strips that key,
-- and rejects models the route does not serve. Per-route data comes from the route's metadata
-- (filter_metadata["envoy.filters.http.lua"]): route, key, models, passthrough, chains.
-- The model it read from the body goes to the backend listeners in x-llmroute-model, so that a
-- backend that does not rename it never reads (and buffers) the body again; a client's own
-- x-llmroute-model never gets through. A stream whose request asks for no usage is marked
-- x-llmroute-stream: the backend listener asks the provider for it where the provider takes
-- stream_options, and its answer then carries x-llmroute-usage-added: the usage-only chunk the
-- client did not ask for is read, then taken out here. Every answer's usage is read here.

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

-- Token usage of an answer into the dynamic metadata namespace `llmroute`, which the usage log
-- carries to the Pod's sidecar: of a whole JSON answer (a chat completion, a text completion,
-- embeddings, a response of the Responses API), or of the server-sent event of a stream that
-- carries it (OpenAI's last chunk with `stream_options.include_usage`, the finish chunk of some
-- providers, the Responses API's `response.completed`).
-- Read as text, the way the request's model is read, not parsed: the usage keys (`prompt_tokens`,
-- `input_tokens`...) are object keys only in the usage object, and a key inside a string value has
-- its quotes escaped, so it never matches `"key":`. This costs a fraction of a JSON parse
-- (docs/benchmarks.md). DeepSeek's `prompt_cache_hit_tokens` wins over `cached_tokens`.
local USAGE_NUMBERS = {
  { "prompt_tokens", "prompt_tokens" }, { "input_tokens", "prompt_tokens" },
  { "completion_tokens", "completion_tokens" }, { "output_tokens", "completion_tokens" },
  { "total_tokens", "total_tokens" },
  { "cached_tokens", "cached_tokens" }, { "prompt_cache_hit_tokens", "cached_tokens" },
}

-- Reads the usage in `text` (an answer or one event), if it has a usage object; says whether.
local function usage_of(handle, text)
  local at = text:find('"usage"%s*:%s*{')
  if at == nil then return false end
  local md = handle:streamInfo():dynamicMetadata()
  for _, field in ipairs(USAGE_NUMBERS) do
    local n = text:match('"' .. field[1] .. '"%s*:%s*(%d+)', at)
    if n ~= nil then md:set("llmroute", field[2], tonumber(n)) end
  end
  local model = text:match('"model"%s*:%s*"([^"\\]*)"')
  if model ~= nil then md:set("llmroute", "provider_model", model) end
  return true
end

-- A whole answer: held until its end (it is sent at once anyway), within the listener's buffer limit.
local function read_usage(handle)
  local raw = body_string(handle)
  if raw ~= nil then usage_of(handle, raw) end
end

-- An event longer than this is passed on unread. A usage event is a few hundred bytes, but the
-- Responses API's `response.completed` repeats the whole response.
local MAX_EVENT = 1048576

-- A stream, read event by event as it passes. Unless `hide`, nothing is held back or changed: each
-- chunk goes on as it came, and only the part of an event that a chunk ends in the middle of is
-- kept to be read with the next chunk. With `hide` (the gateway asked the provider for the usage
-- the client did not ask for) the usage-only event (no choices, a usage object) is taken out:
-- complete events go on as they arrive, a partial one waits for its end (one the stream ends in
-- the middle of is dropped, as an SSE client drops it).
local function read_stream(handle, hide)
  local partial = ""
  local skipping = false
  for chunk in handle:bodyChunks() do
    local data = partial .. chunk:getBytes(0, chunk:length())
    local out = {}
    local pos = 1
    if skipping then
      -- The rest of an event too long to read, up to its end.
      local _, e = data:find("\r?\n\r?\n")
      if e == nil then
        pos = math.max(1, #data - 2) -- keep what may begin the blank line
      else
        pos = e + 1
        skipping = false
      end
    end
    -- Where the next usage object is: most events have none, and are not cut out to be read.
    local u = (not skipping) and data:find('"usage"%s*:%s*{', pos) or nil
    while not skipping do
      local s, e = data:find("\r?\n\r?\n", pos)
      if s == nil then break end
      local usage_only = false
      if u ~= nil and u < e then
        local event = data:sub(pos, e)
        usage_of(handle, event)
        usage_only = hide and event:find('"choices"%s*:%s*%[%s*%]') ~= nil
        u = data:find('"usage"%s*:%s*{', e + 1)
      end
      if hide and not usage_only then out[#out + 1] = data:sub(pos, e) end
      pos = e + 1
    end
    partial = data:sub(pos)
    if hide then
      chunk:setBytes(table.concat(out))
    elseif #partial > MAX_EVENT then
      partial = ""
      skipping = true
    end
  end
  -- A last event without the blank line that ends it.
  if not hide and not skipping and partial ~= "" then usage_of(handle, partial) end
end

-- When the answer is a failure the route fails over on (the backend listener marked it retriable)
-- the whole chain has been tried: answer with one OpenAI-shaped error naming every backend tried,
-- instead of only the last backend's own error. Earlier attempts' responses are gone by now (Envoy
-- discards them when it retries), so for those the error says that they failed over.
function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get("x-llmroute-usage-added") ~= nil then
    headers:remove("x-llmroute-usage-added")
    read_stream(handle, true)
    return
  end
  -- The marker is internal: it never reaches clients. Only failures carry it.
  if headers:get("x-llmroute-retry") == nil then
    if (headers:get(":status") or ""):sub(1, 1) ~= "2" then return end
    local ct = headers:get("content-type") or ""
    if ct:find("json", 1, true) then
      read_usage(handle)
    elseif ct:find("text/event-stream", 1, true) then
      read_stream(handle, false)
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
