-- KEYS[1]: the account's journal list (`P:log`). ARGV: after (a sequence number, '' for the
-- oldest entry kept), limit (0: all). Returns the entries, oldest first. Entries are
-- consecutive: the one of sequence s is at index s - (the first one's sequence).
local first = redis.call('LINDEX', KEYS[1], 0)
if not first then return {} end
local start = 0
if ARGV[1] ~= '' then
  start = tonumber(ARGV[1]) - tonumber(string.match(first, '^(%d+) ')) + 1
  if start < 0 then start = 0 end
end
local limit = tonumber(ARGV[2])
local stop = -1
if limit > 0 then stop = start + limit - 1 end
return redis.call('LRANGE', KEYS[1], string.format('%d', start), string.format('%d', stop))
