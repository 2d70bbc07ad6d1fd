-- KEYS[1]: the account's hash. ARGV: the last sequence number the record holds.
-- Moves the account's drained cursor forward (never back: two drainers may race). Entries up
-- to it may now be trimmed by the ledger's scripts. Returns the cursor.
local drained = tonumber(redis.call('HGET', KEYS[1], 'drained')) or 0
local seq = tonumber(ARGV[1])
if seq > drained then
  redis.call('HSET', KEYS[1], 'drained', ARGV[1])
  return seq
end
return drained
