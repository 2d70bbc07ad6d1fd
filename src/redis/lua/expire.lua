-- ARGV: now (ms, the caller's bound; the server's time if earlier), max holds.
-- Returns {holds, charged}.
local now = math.min(NOW, tonumber(ARGV[1]))
local S = load(true)
local count, charged = 0, 0
if S.due and S.due <= now then
  count, charged = expire_due(S, now, tonumber(ARGV[2]))
  flush(S)
end
return { count, charged }
