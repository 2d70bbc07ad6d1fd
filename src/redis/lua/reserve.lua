-- KEYS[1]: the account's hash; KEYS[2..]: rate-limit buckets to charge in the same step (the
-- account's own, in its hash slot), all-or-nothing with the hold.
-- ARGV: hold id, amount, hold ttl ms, idempotency window ms, idempotency key, fingerprint,
--       request id, key id, then per bucket: t (ns per cell), burst, cost.
-- Returns {'held', available after, limits...} | {'replayed', 0, limits...}
--       | {'limited', 0, limits...} | {'insufficient', available} | {'reused'} | {'in_use'}
--       | {'fenced'}, where `limits` is gcra_check's reply. The buckets are charged only with
--       'held' and 'replayed' (a replay calls the upstream again).
local id, amount, ttl, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ikey, fp, r, k = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local buckets = {}
for i = 2, #KEYS do buckets[i - 1] = KEYS[i] end
local now = now_ms()
expire_due(now, 64)
if redis.call('EXISTS', P .. ':closed:' .. id) == 1 then return { 'fenced' } end
local balance, held, holds = state()
if redis.call('HEXISTS', HOLDS, id) == 1 then return { 'held', balance - held } end
local now_s, now_ns = gcra_now()
local limits, charge_limits = gcra_check(buckets, 9, now_s, now_ns)
if limits[1] ~= 0 then return { 'limited', 0, unpack(limits) } end
if ikey ~= '' then
  local rec = redis.call('HMGET', P .. ':idem:' .. ikey, 'fp', 'charged')
  if rec[1] then
    if rec[1] ~= fp then return { 'reused' } end
    if rec[2] == '1' then
      charge_limits()
      return { 'replayed', 0, unpack(limits) }
    end
    return { 'in_use' }
  end
end
local available = balance - held
if amount > available then return { 'insufficient', available } end
charge_limits()
held = held + amount
redis.call('HSET', P, 'balance', int(balance), 'held', int(held), 'holds', int(holds + 1))
redis.call('HSET', HOLDS, id, cjson.encode({ a = ARGV[2], r = r, k = k, i = ikey }))
redis.call('ZADD', EXPIRY, int(now + ttl), id)
if ikey ~= '' then
  local ik = P .. ':idem:' .. ikey
  redis.call('HSET', ik, 'fp', fp, 'hold', id, 'charged', 0)
  redis.call('PEXPIRE', ik, int(window))
end
journal(now, 'reserve', amount, amount, id, balance, held, r, k, ikey)
return { 'held', available - amount, unpack(limits) }
