-- llmroute gateway, front listener: admits a request only with its route's key, strips that key,
-- passes only the operations and headers the route allows, and rejects models the route does not
-- serve. Per-route data comes from the route's metadata (filter_metadata["envoy.filters.http.lua"]):
-- route, key, models, passthrough, chains, endpoints, operations.
-- The body is never read here: llmroute's request module (sse-usage/src/request.rs, before this
-- filter) parsed it with a JSON parser and left its verdict in x-llmroute-request (`none`: no
-- body it reads; `ok`; or `<status> <code> <message>`), the top-level model in x-llmroute-model
-- and, for a streamed chat or text completion, whether its client asked for usage in
-- x-llmroute-stream (`hide`/`asked`): the module asked the provider for it in every such stream,
-- and the stream usage module takes the usage event of a `hide` stream out on the way back. The module sets these headers on every
-- request, replacing a client's own, after it dropped every request header a provider is not to
-- see, and on the way back every answer header a workload is not to see (sse-usage/src/request.rs
-- REQUEST_HEADERS, RESPONSE_HEADERS). Without the module (REQUEST_MODULE false, generated above)
-- nothing is passed on to a provider (the models list is still answered): nothing would have
-- checked it.

local function reply(handle, status, body)
  handle:respond({ [":status"] = tostring(status), ["content-type"] = "application/json" }, body)
end

-- The operation of a request (the path below /<route>/v1/, query aside) if the route serves it
-- by default, for its own method only: chat and text completions, embeddings, responses (created,
-- and read, deleted, cancelled or listed by id) and the models list (answered here).
local function default_operation(method, op)
  if method == "POST" and (op == "chat/completions" or op == "completions" or op == "embeddings" or
      op == "responses") then
    return op
  end
  -- (A model id may hold slashes: meta-llama/Llama-3.1-8B-Instruct.)
  if op == "models" or op:match("^models/.+$") then
    if method == "GET" then return "models" end
    return nil
  end
  if (method == "GET" or method == "DELETE") and op:match("^responses/[^/]+$") then return "responses" end
  if method == "POST" and op:match("^responses/[^/]+/cancel$") then return "responses" end
  if method == "GET" and op:match("^responses/[^/]+/input_items$") then return "responses" end
  return nil
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
  local verdict = headers:get("x-llmroute-request")
  headers:remove("x-llmroute-request")
  headers:remove("authorization")
  -- The admission filter (after this one) refuses a request of a route whose token budget says
  -- onUnknownUsage: Deny while this replica holds no lease of it (sse-usage/src/admission.rs).
  if md:get("lease_required") then headers:replace("x-llmroute-lease", "required") end
  local method = headers:get(":method")
  local path = headers:get(":path") or ""
  local op = path:match("^/[^/]+/v1/([^?#]*)") or ""
  local kind = default_operation(method, op)
  if kind == nil then
    -- An operation the route opted in (spec.operations: the first path segment), any method.
    local extra = md:get("operations")
    local charge = extra and extra[op:match("^([^/]+)") or ""]
    if charge == nil then
      reply(handle, 404, openai_error("llmroute route '" .. route .. "' does not serve " .. method .. " /v1/" ..
        op .. ". It serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and " ..
        "GET /v1/models, and the operations its spec.operations opts in.",
        "invalid_request_error", "unsupported_endpoint", nil))
      return
    end
    if not REQUEST_MODULE then
      reply(handle, 503, openai_error(MODULE_MISSING, "server_error", "request_checking_unavailable", nil))
      return
    end
    if verdict ~= nil and verdict ~= "none" then
      local status, code, message = verdict:match("^(%d%d%d) (%S+) (.*)$")
      if status ~= nil then
        reply(handle, tonumber(status), openai_error(message, "invalid_request_error", code, nil))
        return
      end
    end
    headers:remove("x-llmroute-model")
    headers:remove("x-llmroute-stream")
    if charge > 0 then
      -- Charged as estimated usage (the operation reports none): the sidecar counts it as such.
      handle:streamInfo():dynamicMetadata():set("llmroute", "usage",
        '{"prompt_tokens":' .. string.format("%d", charge) .. ',"completion_tokens":0,"total_tokens":' ..
        string.format("%d", charge) .. ',"llmroute_estimated":true}')
    end
    return
  end
  if kind == "models" then
    if op == "models" then
      local data = {}
      for _, m in ipairs(md:get("models")) do
        data[#data + 1] = '{"id":"' .. json_escape(m) .. '","object":"model","created":0,"owned_by":"llmroute/' ..
          json_escape(route) .. '"}'
      end
      reply(handle, 200, '{"object":"list","data":[' .. table.concat(data, ",") .. ']}')
      return
    end
    -- One model of the list: GET /v1/models/{id}.
    local id = op:match("^models/(.+)$")
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
  -- (Every provider serves chat: the common case reads no more metadata.)
  if kind ~= "chat/completions" then
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
  if not REQUEST_MODULE then
    reply(handle, 503, openai_error(MODULE_MISSING, "server_error", "request_checking_unavailable", nil))
    return
  end
  if method ~= "POST" then
    headers:remove("x-llmroute-model")
    headers:remove("x-llmroute-stream")
    return
  end
  if verdict ~= "ok" then
    local status, code, message = (verdict or ""):match("^(%d%d%d) (%S+) (.*)$")
    if status == nil then
      -- `none`: the module read no body (none was sent).
      status, code, message = "400", "missing_model", "The request body must name a 'model' (a string)."
    end
    reply(handle, tonumber(status), openai_error(message, "invalid_request_error", code, nil))
    return
  end
  local model = headers:get("x-llmroute-model") or ""
  if md:get("passthrough") then return end
  for _, m in ipairs(md:get("models")) do
    if m == model then return end
  end
  reply(handle, 404, openai_error(
    "The model '" .. model .. "' does not exist or is not served by llmroute route '" .. route ..
    "'. Models: " .. table.concat(md:get("models"), ", ") .. ".",
    "invalid_request_error", "model_not_found", "model"))
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
    -- llmroute's stream usage module (before this filter on the way back) took the event out
    -- (the gateway asks for it only where that module runs: without it, no request with a body
    -- passes).
    headers:remove("x-llmroute-usage-added")
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
