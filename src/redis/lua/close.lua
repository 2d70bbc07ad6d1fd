-- KEYS[1]: the account's hash. ARGV: hold id, 'settle' | 'release', actual, fence ms (0: none),
-- when to correct ('always' | 'if_open': only if this call closed the hold), then per
-- rate-limit bucket to correct in the same step (the tokens the response reported against the
-- estimate charged, or the refund of a reserve whose answer was lost; fields of the account's
-- hash): field, t (ns per cell), burst, delta.
-- Returns {charged, balance, was_open}. With a fence, closing a hold that is not open also
-- forbids placing it later (a reserve that timed out and is released by its caller). The hold
-- is closed before the buckets are touched.
-- Commands: TIME, HMGET, HSET, HDEL, RPUSH (+ LTRIM at the journal limit); a hold placed with an
-- idempotency key adds HGET and HSET (or DEL).
local id, how, actual, fence = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local nb = (#ARGV - 5) / 4
-- v[7]: the hold, v[7 + i]: bucket i.
local S, v = load(false, 'h:' .. id, bucket_fields(ARGV, 6, nb))
local charged = nil
if v[7] then charged = close_hold(S, id, v[7], how, actual, NOW) end
if nb > 0 and (ARGV[5] == 'always' or charged ~= nil) then
  local field, t, burst, delta = gcra_params(ARGV, 6, nb)
  local vals = {}
  for i = 1, nb do vals[i] = v[7 + i] end
  for _, w in ipairs(gcra_settle(field, vals, t, burst, delta, NOW_S, NOW_NS)) do
    if w[2] then put(field[w[1]], w[2]) else del(field[w[1]]) end
  end
end
if charged == nil then
  if fence > 0 then
    put('c:' .. id, int(NOW + fence))
    add_due(S, NOW + fence)
  end
  flush(S)
  return { 0, S.balance, 0 }
end
flush(S)
return { charged, S.balance, 1 }
