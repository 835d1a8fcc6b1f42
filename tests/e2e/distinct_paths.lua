-- wrk script: every request asks for a path no earlier request used.
-- Paths are /k/<run>/<thread>/<n>; the run number comes after `--` on wrk's command line.
local threads = 0
function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

local run = "0"
function init(args)
  run = args[1] or "0"
end

local n = 0
function request()
  n = n + 1
  return wrk.format("GET", "/k/" .. run .. "/" .. thread_id .. "/" .. n)
end
