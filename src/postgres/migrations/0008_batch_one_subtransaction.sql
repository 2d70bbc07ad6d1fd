-- tollgate 0008: a batch in one subtransaction when none of its calls fails.
--
-- `reserve_many` and `close_many` (migrations 6 and 7) ran every call in a subtransaction of its
-- own (a PL/pgSQL block with an EXCEPTION clause), so that a failing call is rolled back alone:
-- a subtransaction started and committed, and a subtransaction id, per call. Now the calls run
-- first one after the other in one block (one subtransaction for the batch). Almost always none
-- fails, and the answers are those the calls would have had each in its own subtransaction. When
-- one fails (an error, or a lock waited on more than 100 ms), that block is rolled back as a whole
-- and the batch runs again with a subtransaction per call, as before (migration 7's code): each
-- call gets its own answer, the failing one fails alone. The account whose lock timed out in the
-- first pass counts as locked in the second (its calls answer 'retry' at once), so a batch still
-- waits at most 100 ms per account locked elsewhere. Same arguments, same answers.

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
    m int := coalesce(array_length(p_account, 1), 0);
    -- The accounts of this batch whose lock another transaction held past the lock timeout.
    locked text[] := '{}';
    -- The call running (PL/pgSQL variables keep their values when a block is rolled back).
    at_call int := 0;
    a_status text[] := '{}';
    a_available bigint[] := '{}';
    a_verdict int[] := '{}';
    a_idx int[] := '{}';
    a_wait bigint[] := '{}';
    a_rels text[] := '{}';
    one_pass boolean := true;
BEGIN
    PERFORM set_config('lock_timeout', '100ms', true);
    BEGIN
        FOR j IN 1..m LOOP
            at_call := j;
            k := p_nkeys[j];
            SELECT * INTO r FROM @schema@.reserve(
                p_account[j], p_id[j], p_amount[j], p_ttl_ms[j], p_window_ms[j],
                p_ikey[j], p_fingerprint[j], p_request_id[j], p_key_id[j],
                coalesce(p_keys[off + 1:off + k], '{}'), coalesce(p_t[off + 1:off + k], '{}'),
                coalesce(p_burst[off + 1:off + k], '{}'), coalesce(p_cost[off + 1:off + k], '{}'),
                p_now_ns[j]);
            a_status := a_status || r.status;
            a_available := a_available || r.available;
            a_verdict := a_verdict || r.verdict;
            a_idx := a_idx || r.idx;
            a_wait := a_wait || r.wait;
            -- Kept as text: an array of arrays of different lengths (or NULL) is no array.
            a_rels := a_rels || r.rels::text;
            off := off + k;
        END LOOP;
    EXCEPTION
        WHEN lock_not_available THEN
            one_pass := false;
            locked := ARRAY[p_account[at_call]];
        WHEN OTHERS THEN
            one_pass := false;
    END;
    IF one_pass THEN
        FOR j IN 1..m LOOP
            n := j; err := NULL;
            status := a_status[j]; available := a_available[j]; verdict := a_verdict[j];
            idx := a_idx[j]; wait := a_wait[j]; rels := a_rels[j]::bigint[];
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    off := 0;
    FOR j IN 1..m LOOP
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
    m int := coalesce(array_length(p_account, 1), 0);
    -- As in `reserve_many`.
    locked text[] := '{}';
    at_call int := 0;
    a_charged bigint[] := '{}';
    a_balance bigint[] := '{}';
    a_open boolean[] := '{}';
    one_pass boolean := true;
BEGIN
    PERFORM set_config('lock_timeout', '100ms', true);
    BEGIN
        FOR j IN 1..m LOOP
            at_call := j;
            k := p_nkeys[j];
            SELECT * INTO r FROM @schema@.close(
                p_account[j], p_id[j], p_how[j], p_actual[j], p_fence_ms[j], p_when[j],
                coalesce(p_keys[off + 1:off + k], '{}'), coalesce(p_t[off + 1:off + k], '{}'),
                coalesce(p_burst[off + 1:off + k], '{}'), coalesce(p_delta[off + 1:off + k], '{}'),
                p_now_ns[j]);
            a_charged := a_charged || r.charged;
            a_balance := a_balance || r.balance;
            a_open := a_open || r.was_open;
            off := off + k;
        END LOOP;
    EXCEPTION
        WHEN lock_not_available THEN
            one_pass := false;
            locked := ARRAY[p_account[at_call]];
        WHEN OTHERS THEN
            one_pass := false;
    END;
    IF one_pass THEN
        FOR j IN 1..m LOOP
            n := j; err := NULL; status := 'ok';
            charged := a_charged[j]; balance := a_balance[j]; was_open := a_open[j];
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    off := 0;
    FOR j IN 1..m LOOP
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
