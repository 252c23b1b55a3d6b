-- llmroute gateway, per-backend internal listener. Request: maps the logical model to the
-- provider's, and rewrites the path to the provider's layout. Response: classifies failures from
-- status *and* body with the catalog's rules for this provider, marks the ones listed in the route's
-- failoverOn as retriable (the front route retries on x-llmroute-retry), and names the backend.
-- A stream the client asked no usage for (the front listener marks it x-llmroute-stream) asks the
-- provider for it when the provider takes stream_options (STREAM_USAGE), and the answer says so
-- (x-llmroute-usage-added) for the front listener to hide the extra chunk.
-- One such listener serves a provider account for every route using it. The account's data (BASE_PATH,
-- AZURE, API_VERSION, STREAM_USAGE, RULES) is generated above this code; per-route data comes from the route
-- metadata: route, backend, models, passthrough, failoverOn (",Class,Class,"). The provider key is
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

function envoy_on_request(handle)
  -- Handles (metadata, headers) taken before body() are invalid afterwards: read everything first.
  local md = handle:metadata()
  local backend = md:get("backend")
  local models = md:get("models")
  local passthrough = md:get("passthrough")
  local family = md:get("embeddingFamily")
  local headers = handle:headers()
  local stream = headers:get("x-llmroute-stream") == "1"
  headers:remove("x-llmroute-stream")
  local path = headers:get(":path") or "/"
  local op, query = path:match("^/[^/]+/v1/([^?]*)(.*)$")
  if op == nil then
    op = ""
    query = ""
  end
  -- An operation this provider does not serve (the catalog's endpoints): the next backend may.
  local kind = endpoint_of(op)
  -- stream_options.include_usage is a parameter of chat and text completions only: the Responses
  -- API always sends a stream's usage (response.completed), and OpenAI rejects parameters it does
  -- not know.
  local add_usage = STREAM_USAGE and stream and (kind == "chat/completions" or kind == "completions")
  if kind ~= nil and not ENDPOINTS[kind] then
    skip(handle, backend, "EndpointUnsupported", "Backend '" .. backend .. "' (" .. PROVIDER ..
      ") does not serve /v1/" .. kind .. ".", "unsupported_endpoint", nil)
    return
  end
  local provider_model = nil
  local logical = nil
  if headers:get(":method") == "POST" then
    -- The model the front listener read from the body (the route header's route checked it); the
    -- route removes this header before the provider sees the request.
    local model = headers:get("x-llmroute-model")
    logical = model
    if model ~= nil then
      provider_model = models[model]
      if provider_model == nil and passthrough then provider_model = model end
      if provider_model == nil then
        not_mapped(handle, backend, model)
        return
      end
    end
    -- The body is read only when the model has to be renamed in it, or was not read in front, or
    -- the provider is asked for a stream's usage.
    if model == nil or provider_model ~= model or add_usage then
      local raw, body = body_string(handle)
      if raw ~= nil then
        local out = raw
        local first, last, found = raw:find('"model"%s*:%s*"([^"]*)"')
        if found ~= nil then
          if model == nil then
            logical = found
            provider_model = models[found]
            if provider_model == nil and passthrough then provider_model = found end
            if provider_model == nil then
              not_mapped(handle, backend, found)
              return
            end
          end
          if provider_model ~= found then
            out = raw:sub(1, first - 1) .. '"model":"' .. provider_model .. '"' .. raw:sub(last + 1)
          end
        end
        if add_usage then
          local brace = out:find("{", 1, true)
          if brace ~= nil then
            out = out:sub(1, brace) .. '"stream_options":{"include_usage":true},' .. out:sub(brace + 1)
            handle:streamInfo():dynamicMetadata():set("llmroute", "usage_added", "1")
          end
        end
        if out ~= raw then body:setBytes(out) end
      end
      -- A headers handle taken before body() is invalid afterwards: take it again.
      headers = handle:headers()
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
