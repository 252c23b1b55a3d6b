-- llmroute gateway, per-backend internal listener. Request: maps the logical model to the
-- provider's, and rewrites the path to the provider's layout. Response: classifies failures from
-- status *and* body with the catalog's rules for this provider, marks the ones listed in the route's
-- failoverOn as retriable (the front route retries on x-llmroute-retry), and names the backend.
-- Every streamed chat or text completion arrives asking for usage (the request module wrote
-- stream_options); a provider that does not report usage when asked (not STREAM_USAGE) gets it
-- only if the client asked itself. When the gateway asked and the client did not
-- (x-llmroute-stream: hide), the answer says so (x-llmroute-usage-added) for the front listener
-- to hide the extra chunk.
-- One such listener serves a provider account for every route using it. The account's data (BASE_PATH,
-- AZURE, API_VERSION, STREAM_USAGE, RULES) is generated above this code; per-route data comes from the route
-- metadata: route, backend, models, passthrough, failoverOn (",Class,Class,"), rateLimited. The provider key is
-- not handled here: the listener's credential_injector filter sets it (an SDS secret).

-- Responds that this backend cannot take the request (class `class`): the front route moves on to
-- the next backend.
local function skip(handle, backend, class, message, code, param)
  handle:respond({ [":status"] = "404", ["content-type"] = "application/json",
    ["x-llmroute-failure"] = class, ["x-llmroute-retry"] = "1",
    ["x-llmroute-backend"] = backend },
    openai_error(message, "invalid_request_error", code, param))
end

-- Responds that this backend does not map `model`.
local function not_mapped(handle, backend, model)
  skip(handle, backend, "ModelNotMapped", "Backend '" .. backend .. "' does not map model '" .. model .. "'.",
    "model_not_found", "model")
end

-- The member the request module writes right after the model of a streamed chat or text
-- completion (sse-usage/src/request.rs STREAM_OPTIONS, same bytes).
local STREAM_OPTIONS = ',"stream_options":{"include_usage":true}'

function envoy_on_request(handle)
  -- Handles (metadata, headers) taken before body() are invalid afterwards: read everything first.
  local md = handle:metadata()
  local backend = md:get("backend")
  local models = md:get("models")
  local passthrough = md:get("passthrough")
  local family = md:get("embeddingFamily")
  -- A backend with rate limits: named for the backend admission filter after this one.
  local rated = md:get("rateLimited") and (md:get("route") .. "/" .. backend) or nil
  local headers = handle:headers()
  -- `hide` or `asked`: a streamed chat or text completion, whose body carries STREAM_OPTIONS.
  local stream = headers:get("x-llmroute-stream")
  headers:remove("x-llmroute-stream")
  if stream == "" then stream = nil end
  local path = headers:get(":path") or "/"
  local op, query = path:match("^/[^/]+/v1/([^?]*)(.*)$")
  if op == nil then
    op = ""
    query = ""
  end
  -- A query is an operation's own only on reads (GET responses/{id}...): a POST's goes nowhere.
  if headers:get(":method") == "POST" then query = "" end
  -- An operation this provider does not serve (the catalog's endpoints): the next backend may.
  local kind = endpoint_of(op)
  if kind ~= nil and not ENDPOINTS[kind] then
    skip(handle, backend, "EndpointUnsupported", "Backend '" .. backend .. "' (" .. PROVIDER ..
      ") does not serve /v1/" .. kind .. ".", "unsupported_endpoint", nil)
    return
  end
  local provider_model = nil
  -- The model the request module read from the body and the front checked against the route
  -- (the route removes this header before the provider sees the request). The body is in the
  -- module's canonical form: {"model":<the model as json_escape writes it>[STREAM_OPTIONS],...}.
  local logical = headers:get("x-llmroute-model")
  if logical == "" then logical = nil end
  if logical ~= nil then
    provider_model = models[logical]
    if provider_model == nil and passthrough then provider_model = logical end
    if provider_model == nil then
      not_mapped(handle, backend, logical)
      return
    end
    -- The provider is asked for a stream's usage where it reports it when asked (STREAM_USAGE);
    -- elsewhere the gateway's stream_options go only where the client asked for usage itself.
    local drop_options = stream ~= nil and not STREAM_USAGE and stream ~= "asked"
    if provider_model ~= logical or drop_options then
      local raw, body = body_string(handle)
      local prefix = '{"model":"' .. json_escape(logical) .. '"'
      if raw == nil or raw:sub(1, #prefix) ~= prefix then
        -- Cannot happen: the request module wrote this body. Refused rather than guessed at.
        handle:respond({ [":status"] = "500", ["content-type"] = "application/json" },
          openai_error("The gateway could not rewrite the request for backend '" .. backend .. "'.",
            "server_error", "internal_error", nil))
        return
      end
      local rest = raw:sub(#prefix + 1)
      if drop_options and rest:sub(1, #STREAM_OPTIONS) == STREAM_OPTIONS then
        rest = rest:sub(#STREAM_OPTIONS + 1)
      end
      body:setBytes('{"model":"' .. json_escape(provider_model) .. '"' .. rest)
      -- A headers handle taken before body() is invalid afterwards: take it again.
      headers = handle:headers()
    end
    if STREAM_USAGE and stream == "hide" then
      handle:streamInfo():dynamicMetadata():set("llmroute", "usage_added", "1")
    end
  end
  -- Embeddings only from the route's embedding model: vectors of different models do not mix.
  if kind == "embeddings" and family ~= nil and logical ~= nil and provider_model ~= nil then
    local want = family[logical]
    if want ~= nil and want ~= provider_model then
      skip(handle, backend, "EmbeddingModelMismatch", "Backend '" .. backend .. "' embeds '" .. logical ..
        "' with '" .. provider_model .. "', not with the route's embedding model '" .. want ..
        "' (vectors of different models do not mix; spec.policy.embeddingFailover: AnyModel allows it).",
        "embedding_model_mismatch", "model")
      return
    end
  end
  if rated ~= nil then headers:replace("x-llmroute-rate", rated) end
  if AZURE then
    headers:replace(":path", BASE_PATH .. "/openai/deployments/" .. (provider_model or "") .. "/" .. op ..
      "?api-version=" .. API_VERSION)
  else
    headers:replace(":path", BASE_PATH .. "/" .. op .. query)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0
  -- The route names the backend on the provider's answers (response_headers_to_add); only
  -- failures, local replies among them, need the route's data here.
  if status < 400 then
    local added = handle:streamInfo():dynamicMetadata():get("llmroute")
    if added ~= nil and added["usage_added"] ~= nil then headers:replace("x-llmroute-usage-added", "1") end
    return
  end
  local md = handle:metadata()
  local backend = md:get("backend")
  if backend == nil then return end -- no route matched: Envoy's own 404
  local failover_on = md:get("failoverOn")
  headers:replace("x-llmroute-backend", backend)
  local class = headers:get("x-llmroute-failure")
  if class == nil then
    local raw = body_string(handle) or ""
    for _, rule in ipairs(RULES) do
      if (rule.status == 0 or rule.status == status) and
         (rule.match == nil or raw:find(rule.match, 1, true) ~= nil) then
        class = rule.class
        break
      end
    end
    headers = handle:headers()
    if class ~= nil then headers:replace("x-llmroute-failure", class) end
  end
  if class ~= nil and failover_on:find("," .. class .. ",", 1, true) ~= nil then
    headers:replace("x-llmroute-retry", "1")
  end
end
