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

-- Keys (route keys, provider keys) live in the mounted keys Secret, never in the configuration.
-- Each is read at most once a second per worker: a rotated key, or one that reaches the volume
-- after the configuration naming it, is used within about a second, with no Envoy restart and no
-- file watch. nil when the file is missing or empty.
local key_cache = {}
local function read_key(path)
  if path == nil then return nil end
  local now = os.time()
  local cached = key_cache[path]
  if cached ~= nil and cached.at == now then return cached.key end
  local key = nil
  local f = io.open(path, "rb")
  if f ~= nil then
    key = f:read("*a")
    f:close()
  end
  if key == "" then key = nil end
  key_cache[path] = { key = key, at = now }
  return key
end
