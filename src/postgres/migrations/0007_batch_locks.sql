-- tollgate 0007: a batch's lock waits no longer add up.
--
-- In `reserve_many` and `close_many` (migration 6) every call waited up to `lock_timeout`
-- (100 ms) on a row or bucket lock held elsewhere (another replica's statement): several calls of
-- one account, each waiting in turn, could sum past `statement_timeout` and fail the whole batch.
-- Now, once a call of an account has waited its 100 ms in vain, the batch's later calls of that
-- account are not tried at all: they answer 'retry' at once (rolled back, nothing done, sent
-- again alone by the client), like the call that waited. A batch waits at most 100 ms per account
-- whose lock is held elsewhere. Same arguments, same answers otherwise.

CREATE OR REPLACE FUNCTION @schema@.reserve_many(
    p_account text[], p_id bigint[], p_amount bigint[], p_ttl_ms bigint[], p_window_ms bigint[],
    p_ikey text[], p_fingerprint bytea[], p_request_id text[], p_key_id text[],
    p_nkeys int[], p_keys text[], p_t bigint[], p_burst bigint[], p_cost bigint[], p_now_ns bigint[]
) RETURNS TABLE (n int, status text, available bigint, verdict int, idx int, wait bigint, rels bigint[], err text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    off int := 0;
    k int;
    -- The accounts of this batch whose lock another transaction held past the lock timeout.
    locked text[] := '{}';
BEGIN
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR j IN 1..coalesce(array_length(p_account, 1), 0) LOOP
        k := p_nkeys[j];
        n := j; err := NULL;
        IF p_account[j] = ANY (locked) THEN
            status := 'retry'; available := 0; verdict := 0; idx := 0; wait := 0; rels := NULL;
        ELSE
            BEGIN
                SELECT * INTO r FROM @schema@.reserve(
                    p_account[j], p_id[j], p_amount[j], p_ttl_ms[j], p_window_ms[j],
                    p_ikey[j], p_fingerprint[j], p_request_id[j], p_key_id[j],
                    coalesce(p_keys[off + 1:off + k], '{}'), coalesce(p_t[off + 1:off + k], '{}'),
                    coalesce(p_burst[off + 1:off + k], '{}'), coalesce(p_cost[off + 1:off + k], '{}'),
                    p_now_ns[j]);
                status := r.status; available := r.available; verdict := r.verdict; idx := r.idx;
                wait := r.wait; rels := r.rels;
            EXCEPTION
                WHEN lock_not_available THEN
                    locked := locked || p_account[j];
                    status := 'retry'; available := 0; verdict := 0; idx := 0; wait := 0; rels := NULL;
                WHEN OTHERS THEN
                    status := 'error'; available := 0; verdict := 0; idx := 0; wait := 0; rels := NULL;
                    err := SQLSTATE || ': ' || SQLERRM;
            END;
        END IF;
        off := off + k;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION @schema@.close_many(
    p_account text[], p_id bigint[], p_how text[], p_actual bigint[], p_fence_ms bigint[], p_when text[],
    p_nkeys int[], p_keys text[], p_t bigint[], p_burst bigint[], p_delta bigint[], p_now_ns bigint[]
) RETURNS TABLE (n int, status text, charged bigint, balance bigint, was_open boolean, err text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    off int := 0;
    k int;
    -- As in `reserve_many`.
    locked text[] := '{}';
BEGIN
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR j IN 1..coalesce(array_length(p_account, 1), 0) LOOP
        k := p_nkeys[j];
        n := j; err := NULL;
        IF p_account[j] = ANY (locked) THEN
            status := 'retry'; charged := 0; balance := 0; was_open := false;
        ELSE
            BEGIN
                SELECT * INTO r FROM @schema@.close(
                    p_account[j], p_id[j], p_how[j], p_actual[j], p_fence_ms[j], p_when[j],
                    coalesce(p_keys[off + 1:off + k], '{}'), coalesce(p_t[off + 1:off + k], '{}'),
                    coalesce(p_burst[off + 1:off + k], '{}'), coalesce(p_delta[off + 1:off + k], '{}'),
                    p_now_ns[j]);
                status := 'ok'; charged := r.charged; balance := r.balance; was_open := r.was_open;
            EXCEPTION
                WHEN lock_not_available THEN
                    locked := locked || p_account[j];
                    status := 'retry'; charged := 0; balance := 0; was_open := false;
                WHEN OTHERS THEN
                    status := 'error'; charged := 0; balance := 0; was_open := false;
                    err := SQLSTATE || ': ' || SQLERRM;
            END;
        END IF;
        off := off + k;
        RETURN NEXT;
    END LOOP;
END
$$;
