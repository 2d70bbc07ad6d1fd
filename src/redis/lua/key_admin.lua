-- Key mutations, checked and applied atomically. KEYS[1]: the key id's entry `{prefix}keyid:ID`
-- (declared so that the script runs on the node of the `{keys}` slot, where all its keys are).
-- ARGV[1]: the prefix, ARGV[2]: the operation.
-- insert: ARGV[3] digest, ARGV[4] id, ARGV[5] account, ARGV[6..] field/value pairs
-- update: ARGV[3] id, ARGV[4] account, ARGV[5..] field/value pairs (the record replaced)
-- status: ARGV[3] id, ARGV[4] status
-- rotate: ARGV[3] id, ARGV[4] new digest
-- Returns {'ok', digest...} | {'unknown_key'} | {'unknown_account'} | {'duplicate'} | {'revoked'}
-- Revocation is final: update and status refuse to give a revoked key another status.
local p, op = ARGV[1], ARGV[2]
local function fields(from)
  local out = {}
  for i = from, #ARGV do out[#out + 1] = ARGV[i] end
  return out
end
if op == 'insert' then
  local digest, id, account = ARGV[3], ARGV[4], ARGV[5]
  if redis.call('EXISTS', p .. 'keyid:' .. id) == 1 or redis.call('EXISTS', p .. 'key:' .. digest) == 1 then
    return { 'duplicate' }
  end
  if redis.call('EXISTS', p .. 'account:' .. account) == 0 then return { 'unknown_account' } end
  redis.call('HSET', p .. 'key:' .. digest, unpack(fields(6)))
  redis.call('SET', p .. 'keyid:' .. id, digest)
  return { 'ok', digest }
end
local id = ARGV[3]
local digest = redis.call('GET', p .. 'keyid:' .. id)
if not digest then return { 'unknown_key' } end
local revoked = redis.call('HGET', p .. 'key:' .. digest, 'status') == 'revoked'
if op == 'update' then
  if redis.call('EXISTS', p .. 'account:' .. ARGV[4]) == 0 then return { 'unknown_account' } end
  if revoked then
    local status
    for i = 5, #ARGV - 1, 2 do
      if ARGV[i] == 'status' then status = ARGV[i + 1] end
    end
    if status ~= 'revoked' then return { 'revoked' } end
  end
  redis.call('DEL', p .. 'key:' .. digest)
  redis.call('HSET', p .. 'key:' .. digest, unpack(fields(5)))
  return { 'ok', digest }
elseif op == 'status' then
  if revoked and ARGV[4] ~= 'revoked' then return { 'revoked' } end
  redis.call('HSET', p .. 'key:' .. digest, 'status', ARGV[4])
  return { 'ok', digest }
elseif op == 'rotate' then
  local new = ARGV[4]
  if redis.call('EXISTS', p .. 'key:' .. new) == 1 then return { 'duplicate' } end
  redis.call('RENAME', p .. 'key:' .. digest, p .. 'key:' .. new)
  redis.call('SET', p .. 'keyid:' .. id, new)
  return { 'ok', digest, new }
end
return redis.error_reply('unknown operation')
