-- Cases for tests/lua.rs: the front Lua's usage reading of whole answers
-- (src/gateway/lua/front.lua), with a mocked Envoy handle. `front` holds the functions under test.
-- Each case raises an error when it fails. (The usage event the gateway asked for is taken out by
-- llmroute's Envoy module: sse-usage/src/scan.rs.)

-- A handle whose answer is `whole` (a held body); it records the dynamic metadata set.
local function handle(whole)
  local md = {}
  local h = {}
  function h:streamInfo()
    return { dynamicMetadata = function()
      return { set = function(_, ns, key, value)
        assert(ns == "llmroute", "namespace " .. tostring(ns))
        md[key] = value
      end }
    end }
  end
  function h:body()
    return { length = function() return #whole end,
             getBytes = function(_, from, n) return whole:sub(from + 1, from + n) end }
  end
  return h, md
end


local function expect(md, want, what)
  for k, v in pairs(want) do
    assert(md[k] == v, what .. ": " .. k .. " = " .. tostring(md[k]) .. ", want " .. tostring(v))
  end
  for k, v in pairs(md) do
    assert(want[k] ~= nil, what .. ": unexpected " .. k .. " = " .. tostring(v))
  end
end

-- Whole answers: chat (DeepSeek's shape), embeddings, the Responses API: the usage object's text
-- is handed on whole (nested details included), and nothing else; text that imitates usage in the
-- content is not taken.
local function whole_answers()
  local deepseek = '{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":3},"prompt_cache_hit_tokens":4,"prompt_cache_miss_tokens":6}'
  local responses = '{"input_tokens":7,"input_tokens_details":{"cached_tokens":0},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":9}'
  local cases = {
    { '{"id":"x","model":"deepseek-chat","choices":[{"message":{"content":"\\"usage\\": {\\"prompt_tokens\\": 5}"}}],"usage":' .. deepseek .. '}',
      { usage = deepseek } },
    { '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage": {"prompt_tokens":8,"total_tokens":8}}',
      { usage = '{"prompt_tokens":8,"total_tokens":8}' } },
    { '{"id":"r1","object":"response","model":"gpt-4o","output":[],"usage":' .. responses .. '}',
      { usage = responses } },
    -- A response echoes the request's tools (and text format): a parameter named "usage" comes
    -- before the response's own usage.
    { '{"id":"r2","object":"response","model":"gpt-4o","output":[],"text":{"format":{"type":"json_schema","schema":{"properties":{"usage":{"type":"object"}}}}},"tools":[{"type":"function","name":"meter","parameters":{"type":"object","properties":{"usage":{"type":"string"}}}}],"top_p":1.0,"usage":' .. responses .. ',"user":null,"metadata":{"usage":"x"}}',
      { usage = responses } },
    { '{"error":{"message":"no usage here","type":"x"}}', {} },
    { '{"id":"x","model":"m","choices":[],"usage":null}', {} },
  }
  for i, c in ipairs(cases) do
    local h, md = handle(c[1])
    front.read_usage(h)
    expect(md, c[2], "whole answer " .. i)
  end
end

return {
  whole_answers = whole_answers,
}
