-- Runs an Argo CD resource health script the way Argo CD does (util/lua in argo-cd): the object is
-- the global `obj`, only the base, table and os libraries are open (no string, io or debug: Argo CD
-- opens them only for scripts with useOpenLibs), and the chunk returns { status, message }.
--
--   lua harness.lua HEALTH_SCRIPT OBJECT_FILE
-- OBJECT_FILE is a Lua chunk returning the object as a table (built from the object's JSON as
-- Argo CD's decodeValue does: maps -> tables, lists -> 1-based arrays, null -> nil).
-- Prints the status on the first line and the message on the second. Lua 5.1 and 5.4.
local script_path, object_path = arg[1], arg[2]
local object = dofile(object_path)

local env = {
  obj = object,
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
  rawequal = rawequal, rawget = rawget, rawset = rawset, select = select, tonumber = tonumber,
  tostring = tostring, type = type, unpack = unpack or table.unpack, xpcall = xpcall,
  getmetatable = getmetatable, setmetatable = setmetatable,
  table = table,
  os = { time = os.time, date = os.date, clock = os.clock },
}

local file = assert(io.open(script_path, "r"))
local source = file:read("*a")
file:close()

-- No string library: strings lose their methods (("x"):upper() fails under Argo CD too).
getmetatable("").__index = nil

local chunk
if setfenv ~= nil then -- Lua 5.1
  chunk = assert(loadstring(source, "=health.lua"))
  setfenv(chunk, env)
else
  chunk = assert(load(source, "=health.lua", "t", env))
end
local hs = chunk()
assert(type(hs) == "table", "the health script must return a table")
io.write(tostring(hs.status), "\n", tostring(hs.message or ""), "\n")
