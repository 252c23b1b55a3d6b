-- Shared helpers of the llmroute gateway's Lua filters (prepended to front.lua and backend.lua).

-- Escapes a string for a JSON string literal.
local function json_escape(s)
  return (tostring(s):gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end))
end

-- An OpenAI-shaped error body: {"error":{"message","type","param","code"}}.
local function openai_error(message, kind, code, param)
  local p = "null"
  if param ~= nil then p = '"' .. json_escape(param) .. '"' end
  return '{"error":{"message":"' .. json_escape(message) .. '","type":"' .. kind ..
    '","param":' .. p .. ',"code":"' .. code .. '"}}'
end

-- The request body as a string, or nil (buffers the body; bounded by the route's buffer limit).
local function body_string(handle)
  local body = handle:body()
  if body == nil or body:length() == 0 then return nil, body end
  return body:getBytes(0, body:length()), body
end

-- The OpenAI operation a path below /v1/ names where providers differ in what they serve:
-- chat/completions, embeddings, completions, responses (with responses/<id>...); nil for any other
-- path (passed on as it is).
local function endpoint_of(op)
  if op == "chat/completions" or op == "embeddings" or op == "completions" then return op end
  if op == "responses" or op:match("^responses/") then return "responses" end
  return nil
end
