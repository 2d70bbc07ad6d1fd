-- ARGV: now (ms, the caller's bound; the server's time if earlier), max holds.
-- Returns {holds, charged}.
local now = math.min(now_ms(), tonumber(ARGV[1]))
local count, charged = expire_due(now, tonumber(ARGV[2]))
return { count, charged }
