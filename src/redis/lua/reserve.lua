-- KEYS[1]: the account's hash. ARGV: hold id, amount, hold ttl ms, idempotency window ms,
-- idempotency key, fingerprint, request id, key id, then per rate-limit bucket to charge in the
-- same step (the account's own: fields of its hash), all-or-nothing with the hold: field, t (ns
-- per cell), burst, cost.
-- Returns {'held', available after, limits...} | {'replayed', 0, limits...}
--       | {'limited', 0, limits...} | {'insufficient', available} | {'reused'} | {'in_use'}
--       | {'fenced'}, where `limits` is gcra_check's reply. The buckets are charged only with
--       'held' and 'replayed' (a replay calls the upstream again).
-- Commands: TIME, HMGET, HSET, RPUSH (+ LTRIM at the journal limit); an idempotency key adds
-- HMGET, HSET and PEXPIRE.
local id, amount, ttl, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ikey, fp, r, k = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local nb = (#ARGV - 8) / 4
local hold = 'h:' .. id
-- v[7]: the hold, v[8]: its fence, v[8 + i]: bucket i.
local S, v = load(false, hold, 'c:' .. id, bucket_fields(ARGV, 9, nb))
if v[8] and tonumber(v[8]) > NOW then return { 'fenced' } end
if v[7] then return { 'held', S.balance - S.held } end
local limits = gcra_check(ARGV, 9, nb, v, 8, NOW_S, NOW_NS)
if limits[1] ~= 0 then return { 'limited', 0, unpack(limits) } end
local function charge_limits()
  -- A charged bucket is never full: always a value.
  gcra_charge(ARGV, 9, nb, limits, NOW_S, NOW_NS, function(i, value) put(ARGV[4 * i + 5], value) end)
end
if ikey ~= '' then
  local rec = redis.call('HMGET', P .. ':idem:' .. ikey, 'fp', 'charged')
  if rec[1] then
    if rec[1] ~= fp then return { 'reused' } end
    if rec[2] == '1' then
      charge_limits()
      flush(S)
      return { 'replayed', 0, unpack(limits) }
    end
    return { 'in_use' }
  end
end
local available = S.balance - S.held
if amount > available then return { 'insufficient', available } end
charge_limits()
S.held = S.held + amount
S.holds = S.holds + 1
local expiry = NOW + ttl
local tail = tail_of(ikey, r, k)
put(hold, string.format('%d %d %s', amount, expiry, tail))
add_due(S, expiry)
if ikey ~= '' then
  local ik = P .. ':idem:' .. ikey
  redis.call('HSET', ik, 'fp', fp, 'hold', id, 'charged', 0)
  redis.call('PEXPIRE', ik, int(window))
end
journal(S, NOW, 'reserve', amount, amount, id, tail)
flush(S)
return { 'held', available - amount, unpack(limits) }
