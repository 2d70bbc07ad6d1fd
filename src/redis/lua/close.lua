-- KEYS[1]: the account's hash; KEYS[2..]: rate-limit buckets to correct in the same step (the
-- tokens the response reported against the estimate charged, or the refund of a reserve whose
-- answer was lost).
-- ARGV: hold id, 'settle' | 'release', actual, fence ms (0: none), when to correct ('always' |
--       'if_open': only if this call closed the hold), then per bucket: t (ns per cell), burst,
--       delta.
-- Returns {charged, balance, was_open}. With a fence, closing a hold that is not open also
-- forbids placing it later (a reserve that timed out and is released by its caller). The hold
-- is closed before the buckets are touched.
local id, how, actual, fence = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
expire_due(now, 64)
local charged = close(id, how, actual, now)
if #KEYS > 1 and (ARGV[5] == 'always' or charged ~= nil) then
  local buckets = {}
  for i = 2, #KEYS do buckets[i - 1] = KEYS[i] end
  local now_s, now_ns = gcra_now()
  gcra_settle(buckets, 6, now_s, now_ns)
end
local balance = state()
if charged == nil then
  if fence > 0 then redis.call('SET', P .. ':closed:' .. id, 1, 'PX', int(fence)) end
  return { 0, balance, 0 }
end
return { charged, balance, 1 }
