-- Cases for tests/lua.rs: the front Lua's usage reading (src/gateway/lua/front.lua) with a mocked
-- Envoy handle. `front` holds the functions under test. Each case raises an error when it fails.

-- A handle whose answer arrives as `chunks` (streams) or as `whole` (a held body); it records the
-- dynamic metadata set and the bytes passed on.
local function handle(chunks, whole)
  local md, passed = {}, {}
  local h = {}
  function h:streamInfo()
    return { dynamicMetadata = function()
      return { set = function(_, ns, key, value)
        assert(ns == "llmroute", "namespace " .. tostring(ns))
        md[key] = value
      end }
    end }
  end
  function h:bodyChunks()
    local i = 0
    return function()
      i = i + 1
      if chunks[i] == nil then return nil end
      local c = { data = chunks[i] }
      function c:length() return #self.data end
      function c:getBytes(from, n) return self.data:sub(from + 1, from + n) end
      function c:setBytes(b) self.data = b end
      passed[#passed + 1] = c
      return c
    end
  end
  function h:body()
    return { length = function() return #whole end,
             getBytes = function(_, from, n) return whole:sub(from + 1, from + n) end }
  end
  local function out()
    local t = {}
    for _, c in ipairs(passed) do t[#t + 1] = c.data end
    return table.concat(t)
  end
  return h, md, out
end

local function event(json) return "data: " .. json .. "\n\n" end

local function expect(md, want, what)
  for k, v in pairs(want) do
    assert(md[k] == v, what .. ": " .. k .. " = " .. tostring(md[k]) .. ", want " .. tostring(v))
  end
  for k, v in pairs(md) do
    assert(want[k] ~= nil, what .. ": unexpected " .. k .. " = " .. tostring(v))
  end
end

-- OpenAI's chat stream with include_usage: a content chunk whose text imitates usage, the finish
-- chunk and the usage-only chunk (both with "usage": null before it), then [DONE].
local CONTENT = event('{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"say \\"usage\\": {\\"prompt_tokens\\": 999}"}}],"usage":null}')
local FINISH = event('{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}')
local USAGE = event('{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4}}}')
local DONE = "data: [DONE]\n\n"
local STREAM = CONTENT .. FINISH .. USAGE .. DONE
local USAGE_MD = { prompt_tokens = 12, completion_tokens = 3, total_tokens = 15, cached_tokens = 4,
  provider_model = "gpt-4o-mini" }

-- Every place a stream can be cut in two: passed on unchanged, usage read.
local function stream_read_at_every_cut()
  for cut = 1, #STREAM - 1 do
    local h, md, out = handle({ STREAM:sub(1, cut), STREAM:sub(cut + 1) })
    front.read_stream(h, false)
    assert(out() == STREAM, "cut " .. cut .. ": the stream was changed")
    expect(md, USAGE_MD, "cut " .. cut)
  end
end

-- CRLF line ends, one byte per chunk.
local function stream_read_byte_by_byte_with_crlf()
  local s = STREAM:gsub("\n", "\r\n")
  local chunks = {}
  for i = 1, #s do chunks[i] = s:sub(i, i) end
  local h, md, out = handle(chunks)
  front.read_stream(h, false)
  assert(out() == s)
  expect(md, USAGE_MD, "CRLF")
end

-- The usage event the gateway asked for is read and taken out, wherever the stream is cut.
local function asked_usage_event_taken_out_at_every_cut()
  for cut = 1, #STREAM - 1 do
    local h, md, out = handle({ STREAM:sub(1, cut), STREAM:sub(cut + 1) })
    front.read_stream(h, true)
    assert(out() == CONTENT .. FINISH .. DONE, "cut " .. cut .. ": " .. out())
    expect(md, USAGE_MD, "cut " .. cut)
  end
end

-- A stream without usage (null, or imitated in the text) sets nothing.
local function stream_without_usage_sets_nothing()
  local h, md, out = handle({ CONTENT .. FINISH .. DONE })
  front.read_stream(h, false)
  expect(md, {}, "no usage")
end

-- The Responses API: usage in response.completed (under "response"), a last event without its
-- blank line; response.created's "usage": null is not read.
local function responses_stream_completed_event()
  local created = 'event: response.created\ndata: {"type":"response.created","response":{"id":"r1","model":"gpt-4o","usage":null}}\n\n'
  local completed = 'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r1","model":"gpt-4o","output":[],"usage":{"input_tokens":7,"output_tokens":2,"total_tokens":9,"input_tokens_details":{"cached_tokens":1}}}}'
  local h, md = handle({ created, completed })
  front.read_stream(h, false)
  expect(md, { prompt_tokens = 7, completion_tokens = 2, total_tokens = 9, cached_tokens = 1,
    provider_model = "gpt-4o" }, "responses")
end

-- An event over 1 MiB is passed on unread, and what follows it is read.
local function an_event_too_long_is_skipped_whole()
  local big = 'data: {"text":"' .. string.rep("a", 1100000) .. '","usage":{"prompt_tokens":999}}\n\n'
  local s = big .. USAGE
  local chunks = {}
  for i = 1, #s, 65536 do chunks[#chunks + 1] = s:sub(i, i + 65535) end
  local h, md, out = handle(chunks)
  front.read_stream(h, false)
  assert(out() == s)
  expect(md, USAGE_MD, "after a long event")
end

-- Whole answers: chat (DeepSeek's cache field wins), embeddings, the Responses API; text that
-- imitates usage in the content is not read.
local function whole_answers()
  local cases = {
    { '{"id":"x","model":"deepseek-chat","choices":[{"message":{"content":"\\"usage\\": {\\"prompt_tokens\\": 5}"}}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":3},"prompt_cache_hit_tokens":4,"prompt_cache_miss_tokens":6}}',
      { prompt_tokens = 10, completion_tokens = 2, total_tokens = 12, cached_tokens = 4, provider_model = "deepseek-chat" } },
    { '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}',
      { prompt_tokens = 8, total_tokens = 8, provider_model = "text-embedding-3-small" } },
    { '{"id":"r1","object":"response","model":"gpt-4o","output":[],"usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":0},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":9}}',
      { prompt_tokens = 7, completion_tokens = 2, total_tokens = 9, cached_tokens = 0, provider_model = "gpt-4o" } },
    { '{"error":{"message":"no usage here","type":"x"}}', {} },
  }
  for i, c in ipairs(cases) do
    local h, md = handle({}, c[1])
    front.read_usage(h)
    expect(md, c[2], "whole answer " .. i)
  end
end

return {
  stream_read_at_every_cut = stream_read_at_every_cut,
  stream_read_byte_by_byte_with_crlf = stream_read_byte_by_byte_with_crlf,
  asked_usage_event_taken_out_at_every_cut = asked_usage_event_taken_out_at_every_cut,
  stream_without_usage_sets_nothing = stream_without_usage_sets_nothing,
  responses_stream_completed_event = responses_stream_completed_event,
  an_event_too_long_is_skipped_whole = an_event_too_long_is_skipped_whole,
  whole_answers = whole_answers,
}
