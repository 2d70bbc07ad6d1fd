-- A hold's TTL is idle time: a response that is still streaming keeps its hold alive.
--
-- extend_hold moves an open hold's expiry to `p_ttl_ms` from now (never earlier than it was) and
-- answers whether the hold is open; a closed hold (settled, released or expired) is untouched.
-- One statement on the hold's row: no lock on the account's balance.
CREATE FUNCTION @schema@.extend_hold(p_account text, p_id bigint, p_ttl_ms bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE @schema@.holds
       SET expires_at = greatest(expires_at, clock_timestamp() + p_ttl_ms * interval '1 millisecond')
     WHERE account = p_account AND id = p_id;
    RETURN FOUND;
END;
$$;
