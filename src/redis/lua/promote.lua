-- A plan promotion on its own (Redis Cluster: the top-up ran in the account's `{acct:ID}` slot,
-- this runs in the key store's `{keys}` slot). KEYS[1]: the key store's account hash.
-- ARGV: (from plan, to plan) pairs. Returns {from, to} when the plan moved, {} otherwise.
local plan = redis.call('HGET', KEYS[1], 'plan')
if plan then
  for i = 1, #ARGV - 1, 2 do
    if ARGV[i] == plan then
      redis.call('HSET', KEYS[1], 'plan', ARGV[i + 1])
      return { plan, ARGV[i + 1] }
    end
  end
end
return {}
