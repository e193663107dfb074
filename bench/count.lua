-- wrk script: each thread stops after a fixed number of responses and appends a line to a marker
-- file. wrk's main thread still sleeps for the whole -d, so run.sh sends it SIGINT once every
-- thread has written its line; wrk then prints its summary as usual.
-- Usage: wrk -t2 -c32 -d600s -s bench/count.lua URL -- 50000 /tmp/marker   (per thread)
local limit = 0
local marker = nil
local seen = 0

function init(args)
  limit = tonumber(args[1]) or 50000
  marker = args[2]
end

function response(status, headers, body)
  seen = seen + 1
  if seen == limit then
    if marker then
      local f = io.open(marker, "a")
      if f then
        f:write("done\n")
        f:close()
      end
    end
    wrk.thread:stop()
  end
end
