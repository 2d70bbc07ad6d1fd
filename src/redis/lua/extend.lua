-- KEYS[1]: the account's hash. ARGV: hold id, hold ttl ms.
-- A hold's TTL is idle time: an open hold now expires no earlier than `ttl` from now (never
-- earlier than it would have). Returns 1 when the hold is open, 0 when it is closed.
local id, ttl = ARGV[1], tonumber(ARGV[2])
if redis.call('HEXISTS', HOLDS, id) == 0 then return 0 end
redis.call('ZADD', EXPIRY, 'GT', int(now_ms() + ttl), id)
return 1
