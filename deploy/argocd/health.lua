-- Argo CD health check for llmroute.io/LLMRoute (argocd-cm key
-- resource.customizations.health.llmroute.io_LLMRoute; see README.md beside this file).
--
-- Argo CD sets the global `obj` (the live object as a Lua table) and expects a table
-- { status = Healthy | Progressing | Degraded, message = ... } back. Written for Lua 5.1 (Argo CD's
-- gopher-lua) and tested with Lua 5.1 and 5.4 against tests/fixtures/argocd/*.yaml.
--
--   no status / no Ready condition yet                      -> Progressing
--   status or the Ready condition older than the spec       -> Progressing (observedGeneration behind)
--   Ready True                                              -> Healthy; when Degraded is True too the
--                                                              message says it serves from a fallback
--   Ready False, reason GatewayPending or Propagating        -> Progressing (the gateway's replicas
--                                                              are starting or loading it)
--   Ready False, any other reason (InvalidSpec, SecretNotFound, NoEligibleBackend, ...)
--                                                           -> Degraded: it needs a change to serve
--   Ready Unknown                                           -> Progressing

local TRANSIENT_REASONS = { GatewayPending = true, Propagating = true }

local function condition(conditions, type_)
  if conditions == nil then return nil end
  for _, c in ipairs(conditions) do
    if c.type == type_ then return c end
  end
  return nil
end

local function text(c)
  local parts = {}
  if c.reason ~= nil and c.reason ~= "" then table.insert(parts, c.reason) end
  if c.message ~= nil and c.message ~= "" then table.insert(parts, c.message) end
  return table.concat(parts, ": ")
end

local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation

if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the llmroute operator to report status"
  return hs
end

if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the llmroute operator to observe generation " .. tostring(generation) ..
    " (status is for generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local ready = condition(status.conditions, "Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the llmroute operator to observe generation " .. tostring(generation)
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  local degraded = condition(status.conditions, "Degraded")
  if degraded ~= nil and degraded.status == "True" then
    hs.message = "Ready, on a fallback backend: " .. text(degraded)
  else
    hs.message = text(ready)
  end
  return hs
end

if ready.status == "False" and not TRANSIENT_REASONS[ready.reason or ""] then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = text(ready)
return hs
