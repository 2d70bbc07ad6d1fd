-- The limiter's script (after gcra_lib.lua). KEYS: the buckets.
-- ARGV: frozen seconds or '' (then Redis `TIME`), frozen nanoseconds, 'check' | 'settle',
--       then per bucket: t (ns per cell), burst, cost (check) or delta (settle).
-- check returns gcra_check's reply, the charges applied when allowed; settle returns {}.
local now_s, now_ns = gcra_now(ARGV[1], ARGV[2])
if ARGV[3] == 'settle' then
  gcra_settle(KEYS, 4, now_s, now_ns)
  return {}
end
local reply, apply = gcra_check(KEYS, 4, now_s, now_ns)
if reply[1] == 0 then apply() end
return reply
