-- tollgate 0010: reserves and closes in one batch, one commit.
--
-- Until now the client coalesced reserves into `reserve_many` and closes into `close_many`: two
-- statements in flight at once, two commits. Under load the reserve of an account's next request
-- waited on the row lock the close of its previous one held until the close batch committed, so
-- the two kinds ran one after the other anyway, each waiting for its own WAL flush. `book_many`
-- runs both kinds in one statement, in the order the client gives (sorted by account, so that
-- concurrent batches take the accounts' locks in the same order; calls of one account in the
-- order they came), with one commit for all.
--
-- `p_kind[j]` is 'r' (the next reserve of the `p_r_*` arrays) or 'c' (the next close of the
-- `p_c_*` arrays); the arrays are those of `reserve_many` and `close_many`. As in migration 8,
-- the calls run first in one subtransaction; if one fails (an error, or a lock waited on more
-- than 100 ms) the batch runs again with a subtransaction per call, the account whose lock timed
-- out counting as locked (its calls answer 'retry' at once, sent again alone by the client).
-- One row per call, `n` its 1-based position; a reserve's answer in `status` .. `rels`, a
-- close's in `charged`, `balance`, `was_open` (`status` 'ok').

CREATE FUNCTION @schema@.book_many(
    p_kind text[],
    p_r_account text[], p_r_id bigint[], p_r_amount bigint[], p_r_ttl_ms bigint[], p_r_window_ms bigint[],
    p_r_ikey text[], p_r_fingerprint bytea[], p_r_request_id text[], p_r_key_id text[],
    p_r_nkeys int[], p_r_keys text[], p_r_t bigint[], p_r_burst bigint[], p_r_cost bigint[], p_r_now_ns bigint[],
    p_c_account text[], p_c_id bigint[], p_c_how text[], p_c_actual bigint[], p_c_fence_ms bigint[], p_c_when text[],
    p_c_nkeys int[], p_c_keys text[], p_c_t bigint[], p_c_burst bigint[], p_c_delta bigint[], p_c_now_ns bigint[]
) RETURNS TABLE (
    n int, status text, available bigint, verdict int, idx int, wait bigint, rels bigint[],
    charged bigint, balance bigint, was_open boolean, err text
)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    m int := coalesce(array_length(p_kind, 1), 0);
    -- The next reserve and close, and where their buckets start.
    ri int; ci int; roff int; coff int; k int;
    acct text;
    locked text[] := '{}';
    at_call int := 0;
    a_status text[] := '{}';
    a_available bigint[] := '{}';
    a_verdict int[] := '{}';
    a_idx int[] := '{}';
    a_wait bigint[] := '{}';
    a_rels text[] := '{}';
    a_charged bigint[] := '{}';
    a_balance bigint[] := '{}';
    a_open boolean[] := '{}';
    one_pass boolean := true;
BEGIN
    PERFORM set_config('lock_timeout', '100ms', true);
    BEGIN
        ri := 0; ci := 0; roff := 0; coff := 0;
        FOR j IN 1..m LOOP
            at_call := j;
            IF p_kind[j] = 'r' THEN
                ri := ri + 1; k := p_r_nkeys[ri];
                SELECT * INTO r FROM @schema@.reserve(
                    p_r_account[ri], p_r_id[ri], p_r_amount[ri], p_r_ttl_ms[ri], p_r_window_ms[ri],
                    p_r_ikey[ri], p_r_fingerprint[ri], p_r_request_id[ri], p_r_key_id[ri],
                    coalesce(p_r_keys[roff + 1:roff + k], '{}'), coalesce(p_r_t[roff + 1:roff + k], '{}'),
                    coalesce(p_r_burst[roff + 1:roff + k], '{}'), coalesce(p_r_cost[roff + 1:roff + k], '{}'),
                    p_r_now_ns[ri]);
                roff := roff + k;
                a_status[j] := r.status; a_available[j] := r.available; a_verdict[j] := r.verdict;
                a_idx[j] := r.idx; a_wait[j] := r.wait;
                -- Kept as text: an array of arrays of different lengths (or NULL) is no array.
                a_rels[j] := r.rels::text;
            ELSE
                ci := ci + 1; k := p_c_nkeys[ci];
                SELECT * INTO r FROM @schema@.close(
                    p_c_account[ci], p_c_id[ci], p_c_how[ci], p_c_actual[ci], p_c_fence_ms[ci], p_c_when[ci],
                    coalesce(p_c_keys[coff + 1:coff + k], '{}'), coalesce(p_c_t[coff + 1:coff + k], '{}'),
                    coalesce(p_c_burst[coff + 1:coff + k], '{}'), coalesce(p_c_delta[coff + 1:coff + k], '{}'),
                    p_c_now_ns[ci]);
                coff := coff + k;
                a_status[j] := 'ok'; a_charged[j] := r.charged; a_balance[j] := r.balance;
                a_open[j] := r.was_open;
            END IF;
        END LOOP;
    EXCEPTION
        WHEN lock_not_available THEN
            one_pass := false;
            IF p_kind[at_call] = 'r' THEN
                locked := ARRAY[p_r_account[ri]];
            ELSE
                locked := ARRAY[p_c_account[ci]];
            END IF;
        WHEN OTHERS THEN
            one_pass := false;
    END;
    IF one_pass THEN
        FOR j IN 1..m LOOP
            n := j; err := NULL; status := a_status[j];
            IF p_kind[j] = 'r' THEN
                available := a_available[j]; verdict := a_verdict[j]; idx := a_idx[j];
                wait := a_wait[j]; rels := a_rels[j]::bigint[];
                charged := NULL; balance := NULL; was_open := NULL;
            ELSE
                available := NULL; verdict := NULL; idx := NULL; wait := NULL; rels := NULL;
                charged := a_charged[j]; balance := a_balance[j]; was_open := a_open[j];
            END IF;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    ri := 0; ci := 0; roff := 0; coff := 0;
    FOR j IN 1..m LOOP
        n := j; err := NULL;
        available := NULL; verdict := NULL; idx := NULL; wait := NULL; rels := NULL;
        charged := NULL; balance := NULL; was_open := NULL;
        IF p_kind[j] = 'r' THEN
            ri := ri + 1; k := p_r_nkeys[ri]; acct := p_r_account[ri];
        ELSE
            ci := ci + 1; k := p_c_nkeys[ci]; acct := p_c_account[ci];
        END IF;
        IF acct = ANY (locked) THEN
            status := 'retry';
        ELSE
            BEGIN
                IF p_kind[j] = 'r' THEN
                    SELECT * INTO r FROM @schema@.reserve(
                        p_r_account[ri], p_r_id[ri], p_r_amount[ri], p_r_ttl_ms[ri], p_r_window_ms[ri],
                        p_r_ikey[ri], p_r_fingerprint[ri], p_r_request_id[ri], p_r_key_id[ri],
                        coalesce(p_r_keys[roff + 1:roff + k], '{}'), coalesce(p_r_t[roff + 1:roff + k], '{}'),
                        coalesce(p_r_burst[roff + 1:roff + k], '{}'), coalesce(p_r_cost[roff + 1:roff + k], '{}'),
                        p_r_now_ns[ri]);
                    status := r.status; available := r.available; verdict := r.verdict;
                    idx := r.idx; wait := r.wait; rels := r.rels;
                ELSE
                    SELECT * INTO r FROM @schema@.close(
                        p_c_account[ci], p_c_id[ci], p_c_how[ci], p_c_actual[ci], p_c_fence_ms[ci], p_c_when[ci],
                        coalesce(p_c_keys[coff + 1:coff + k], '{}'), coalesce(p_c_t[coff + 1:coff + k], '{}'),
                        coalesce(p_c_burst[coff + 1:coff + k], '{}'), coalesce(p_c_delta[coff + 1:coff + k], '{}'),
                        p_c_now_ns[ci]);
                    status := 'ok'; charged := r.charged; balance := r.balance; was_open := r.was_open;
                END IF;
            EXCEPTION
                WHEN lock_not_available THEN
                    locked := locked || acct;
                    status := 'retry';
                WHEN OTHERS THEN
                    status := 'error';
                    err := SQLSTATE || ': ' || SQLERRM;
            END;
        END IF;
        IF p_kind[j] = 'r' THEN roff := roff + k; ELSE coff := coff + k; END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
