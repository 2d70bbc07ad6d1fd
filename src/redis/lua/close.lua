-- ARGV: hold id, 'settle' | 'release', actual, fence ms (0: none).
-- Returns {charged, balance, was_open}. With a fence, closing a hold that is not open also
-- forbids placing it later (a reserve that timed out and is released by its caller).
local id, how, actual, fence = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
expire_due(now, 64)
local charged = close(id, how, actual, now)
local balance = state()
if charged == nil then
  if fence > 0 then redis.call('SET', P .. ':closed:' .. id, 1, 'PX', int(fence)) end
  return { 0, balance, 0 }
end
return { charged, balance, 1 }
