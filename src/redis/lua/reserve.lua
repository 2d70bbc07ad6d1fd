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
local field, t, burst, cost = gcra_params(ARGV, 9, nb)
local extra = { 'h:' .. id, 'c:' .. id }
for i = 1, nb do extra[2 + i] = field[i] end
local S, v = load(extra)
if v[2] and tonumber(v[2]) > NOW then return { 'fenced' } end
if v[1] then return { 'held', S.balance - S.held } end
local vals = {}
for i = 1, nb do vals[i] = v[2 + i] end
local limits, writes = gcra_check(vals, t, burst, cost, NOW_S, NOW_NS)
if limits[1] ~= 0 then return { 'limited', 0, unpack(limits) } end
local function charge_limits()
  -- A charged bucket is never full: always a value.
  for _, w in ipairs(writes) do put(field[w[1]], w[2]) end
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
local tail = enc(ikey) .. enc(r) .. enc(k)
put('h:' .. id, string.format('%d %d %s', amount, expiry, tail))
add_due(S, expiry)
if ikey ~= '' then
  local ik = P .. ':idem:' .. ikey
  redis.call('HSET', ik, 'fp', fp, 'hold', id, 'charged', 0)
  redis.call('PEXPIRE', ik, int(window))
end
journal(S, NOW, 'reserve', amount, amount, id, tail)
flush(S)
return { 'held', available - amount, unpack(limits) }
