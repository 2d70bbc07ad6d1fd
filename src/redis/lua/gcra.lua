-- The limiter's script (after gcra_lib.lua). KEYS: the buckets (a string key, or the account's
-- hash when the bucket's field is not '').
-- ARGV: frozen seconds or '' (then Redis `TIME`), frozen nanoseconds, 'check' | 'settle',
--       then per bucket: field, t (ns per cell), burst, cost (check) or delta (settle).
-- check returns gcra_check's reply, the charges applied when allowed; settle returns {}.
local now_s, now_ns
if ARGV[1] ~= '' then
  now_s, now_ns = tonumber(ARGV[1]), tonumber(ARGV[2])
else
  local time = redis.call('TIME')
  now_s, now_ns = tonumber(time[1]), tonumber(time[2]) * 1000
end
local field, t, burst, amount = gcra_params(ARGV, 4, #KEYS)
local vals, ids = {}, {}
for i = 1, #KEYS do
  if field[i] == '' then
    vals[i] = redis.call('GET', KEYS[i])
  else
    vals[i] = redis.call('HGET', KEYS[i], field[i])
  end
  ids[i] = KEYS[i] .. '\0' .. field[i]
end
local function write(i, value, ms)
  if field[i] == '' then
    if value then redis.call('SET', KEYS[i], value, 'PX', string.format('%d', ms)) else redis.call('DEL', KEYS[i]) end
  else
    if value then redis.call('HSET', KEYS[i], field[i], value) else redis.call('HDEL', KEYS[i], field[i]) end
  end
end
if ARGV[3] == 'settle' then
  for _, w in ipairs(gcra_settle(ids, vals, t, burst, amount, now_s, now_ns)) do write(w[1], w[2], w[3]) end
  return {}
end
local reply = gcra_check(ARGV, 4, #KEYS, vals, 0, now_s, now_ns)
if reply[1] == 0 then gcra_charge(ARGV, 4, #KEYS, reply, now_s, now_ns, write) end
return reply
