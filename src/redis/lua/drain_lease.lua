-- KEYS[1]: the drain lease. ARGV: this replica's token, the lease in ms (0: give it up).
-- Takes the lease when free, renews it when this token holds it; with 0, deletes it if this
-- token holds it. Returns 1 when this token holds the lease after the call, else 0.
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
