-- ARGV: hold id, amount, hold ttl ms, idempotency window ms, idempotency key, fingerprint,
--       request id, key id.
-- Returns {'held', available after} | {'insufficient', available} | {'replayed'} | {'reused'}
--       | {'in_use'} | {'fenced'}
local id, amount, ttl, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ikey, fp, r, k = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local now = now_ms()
expire_due(now, 64)
if redis.call('EXISTS', P .. ':closed:' .. id) == 1 then return { 'fenced' } end
local balance, held, holds = state()
if redis.call('HEXISTS', HOLDS, id) == 1 then return { 'held', balance - held } end
if ikey ~= '' then
  local rec = redis.call('HMGET', P .. ':idem:' .. ikey, 'fp', 'charged')
  if rec[1] then
    if rec[1] ~= fp then return { 'reused' } end
    if rec[2] == '1' then return { 'replayed' } end
    return { 'in_use' }
  end
end
local available = balance - held
if amount > available then return { 'insufficient', available } end
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
return { 'held', available - amount }
