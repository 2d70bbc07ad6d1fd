-- ARGV: (none). Settles expired holds first. Returns {balance, held, holds}.
local S = load(false)
return { S.balance, S.held, S.holds }
