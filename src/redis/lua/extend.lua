-- KEYS[1]: the account's hash. ARGV: hold id, hold ttl ms.
-- A hold's TTL is idle time: an open hold now expires no earlier than `ttl` from now (never
-- earlier than it would have; `due` stays a lower bound). Returns 1 when the hold is open, 0
-- when it is closed.
local id, ttl = ARGV[1], tonumber(ARGV[2])
local raw = redis.call('HGET', P, 'h:' .. id)
if not raw then return 0 end
local a, e, tail = string.match(raw, '^(%d+) (%d+) (.*)$')
local expiry = NOW + ttl
if expiry > tonumber(e) then
  redis.call('HSET', P, 'h:' .. id, string.format('%s %d %s', a, expiry, tail))
end
return 1
