-- ARGV: (none). Settles expired holds first. Returns {balance, held, holds}.
local S = load({})
return { S.balance, S.held, S.holds }
