-- tollgate 0011: the hot path without its function calls inside function calls.
--
-- Measured with `pg_stat_statements.track = all` under the gateway's load (scripts/
-- bench_postgres.sh with BENCH_PG_PROFILE=1), a third of PostgreSQL's time per billed request was
-- calling functions, not running statements: `book_many` ran each reserve and close as
-- `SELECT * FROM reserve(...)` (a function scan that materializes its one row), and `reserve`
-- ran `gcra_check`, `gcra_lock` and `gcra_store` the same way, `close` its hold's delete apart
-- from its charge. Now `reserve` and `close` do the GCRA of migration 6 themselves (the same
-- locks, in the same order, the database's clock read at the same point, the same arithmetic),
-- `close` deletes the hold, charges the account and journals the close in one statement, and
-- `book_many` calls them as expressions. Same arguments, same answers, same journal rows.

CREATE OR REPLACE FUNCTION @schema@.reserve(
    p_account text, p_id bigint, p_amount bigint, p_ttl_ms bigint, p_window_ms bigint,
    p_ikey text, p_fingerprint bytea, p_request_id text, p_key_id text,
    p_keys text[], p_t bigint[], p_burst bigint[], p_cost bigint[], p_now_ns bigint,
    OUT status text, OUT available bigint,
    OUT verdict int, OUT idx int, OUT wait bigint, OUT rels bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    a_balance bigint;
    a_held bigint;
    known boolean;
    fenced boolean;
    placed boolean;
    n int := coalesce(array_length(p_keys, 1), 0);
    now_ts timestamptz;
    rec @schema@.idempotency_keys%ROWTYPE;
    -- The buckets (as gcra_check): their states (tat - at) when read, and after the charge.
    at bigint;
    v bigint;
    cur bigint[] := '{}';
    nexts bigint[];
    rel numeric;
    earliest numeric;
    too_large int := 0;
    refused int := 0;
    longest numeric := 0;
BEGIN
    available := 0; verdict := 0; idx := 0; wait := 0; rels := '{}';
    SELECT b.balance, b.held INTO a_balance, a_held
      FROM @schema@.balances b WHERE b.account = p_account FOR UPDATE;
    known := FOUND;
    IF NOT known AND p_amount = 0 THEN
        INSERT INTO @schema@.balances (account) VALUES (p_account) ON CONFLICT DO NOTHING;
        SELECT b.balance, b.held INTO a_balance, a_held
          FROM @schema@.balances b WHERE b.account = p_account FOR UPDATE;
        known := FOUND;
    END IF;
    now_ts := clock_timestamp();
    IF known AND EXISTS (SELECT 1 FROM @schema@.holds h
                          WHERE h.account = p_account AND h.expires_at <= now_ts) THEN
        PERFORM @schema@.expire_due(p_account, now_ts, 64);
        SELECT b.balance, b.held INTO a_balance, a_held
          FROM @schema@.balances b WHERE b.account = p_account;
    END IF;
    SELECT EXISTS (SELECT 1 FROM @schema@.fenced_holds f WHERE f.id = p_id),
           EXISTS (SELECT 1 FROM @schema@.holds h WHERE h.id = p_id)
      INTO fenced, placed;
    IF fenced THEN
        status := 'fenced'; RETURN;
    END IF;
    IF placed THEN
        -- The same reserve again (a retried statement): it was placed already.
        status := 'held'; available := coalesce(a_balance - a_held, 0); rels := NULL; RETURN;
    END IF;
    IF n > 0 THEN
        -- Lock the buckets (distinct, in a fixed order), then read the time: checks are ordered
        -- as their times are.
        IF n = 1 THEN
            PERFORM pg_advisory_xact_lock(hashtextextended(p_keys[1], 7431));
        ELSE
            PERFORM pg_advisory_xact_lock(h)
               FROM (SELECT DISTINCT hashtextextended(k, 7431) AS h FROM unnest(p_keys) k ORDER BY 1) s;
        END IF;
        at := coalesce(p_now_ns, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint);
        FOR i IN 1..n LOOP
            SELECT b.tat INTO v FROM @schema@.rate_buckets b WHERE b.key = p_keys[i];
            cur := cur || greatest(coalesce(v - at, 0), 0);
        END LOOP;
        nexts := cur;
        FOR i IN 1..n LOOP
            rel := cur[i];
            IF p_cost[i] > p_burst[i] THEN
                IF too_large = 0 THEN too_large := i; END IF;
            ELSIF p_cost[i] > 0 THEN
                earliest := rel + p_t[i]::numeric * (p_cost[i] - 1) - p_t[i]::numeric * (p_burst[i] - 1);
                IF earliest > 0 THEN
                    IF refused = 0 OR earliest > longest THEN refused := i; longest := earliest; END IF;
                ELSE
                    nexts[i] := least(rel + p_t[i]::numeric * p_cost[i], 1e18)::bigint;
                END IF;
            END IF;
        END LOOP;
        rels := cur;
        IF too_large > 0 THEN
            verdict := 2; idx := too_large; status := 'limited'; RETURN;
        ELSIF refused > 0 THEN
            verdict := 1; idx := refused; wait := longest::bigint; status := 'limited'; RETURN;
        END IF;
        rels := nexts;
    END IF;
    IF p_ikey IS NOT NULL AND known THEN
        SELECT * INTO rec FROM @schema@.idempotency_keys k
         WHERE k.account = p_account AND k.key = p_ikey AND k.expires_at > now_ts;
        IF FOUND THEN
            IF rec.fingerprint <> p_fingerprint THEN status := 'reused'; RETURN; END IF;
            IF NOT rec.charged THEN status := 'in_use'; RETURN; END IF;
            -- A replay calls the upstream again: its buckets are charged below.
            status := 'replayed';
        END IF;
    END IF;
    IF status IS NULL THEN
        available := coalesce(a_balance - a_held, 0);
        IF NOT known OR p_amount > available THEN
            status := 'insufficient'; RETURN;
        END IF;
    END IF;
    -- Charge the buckets (as gcra_store): a full one (state <= 0) is no row.
    FOR i IN 1..n LOOP
        IF nexts[i] <= 0 THEN
            DELETE FROM @schema@.rate_buckets WHERE key = p_keys[i];
        ELSE
            INSERT INTO @schema@.rate_buckets (key, tat)
            VALUES (p_keys[i], at + least(nexts[i], 1000000000000000000))
            ON CONFLICT (key) DO UPDATE SET tat = excluded.tat;
        END IF;
    END LOOP;
    IF status = 'replayed' THEN RETURN; END IF;
    WITH b AS (
        UPDATE @schema@.balances x
           SET held = x.held + p_amount, holds = x.holds + 1, seq = x.seq + 1
         WHERE x.account = p_account
     RETURNING x.balance, x.held, x.seq
    ), h AS (
        INSERT INTO @schema@.holds (id, account, amount, placed_at, expires_at, request_id, key_id, idempotency_key)
        VALUES (p_id, p_account, p_amount, now_ts, now_ts + p_ttl_ms * interval '1 millisecond',
                p_request_id, p_key_id, p_ikey)
    )
    INSERT INTO @schema@.journal
        (account, seq, at, kind, amount, hold, hold_id, balance_after, held_after, request_id, key_id, idempotency_key)
    SELECT p_account, b.seq, now_ts, 'reserve', p_amount, p_amount, p_id, b.balance, b.held,
           p_request_id, p_key_id, p_ikey
      FROM b;
    IF p_ikey IS NOT NULL THEN
        INSERT INTO @schema@.idempotency_keys (account, key, fingerprint, hold_id, charged, expires_at)
        VALUES (p_account, p_ikey, p_fingerprint, p_id, false, now_ts + p_window_ms * interval '1 millisecond')
        ON CONFLICT (account, key) DO UPDATE
           SET fingerprint = excluded.fingerprint, hold_id = excluded.hold_id,
               charged = false, expires_at = excluded.expires_at;
    END IF;
    status := 'held';
    available := available - p_amount;
END
$$;

CREATE OR REPLACE FUNCTION @schema@.close(
    p_account text, p_id bigint, p_how text, p_actual bigint, p_fence_ms bigint, p_when text,
    p_keys text[], p_t bigint[], p_burst bigint[], p_delta bigint[], p_now_ns bigint,
    OUT charged bigint, OUT balance bigint, OUT was_open boolean
) LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz;
    a_balance bigint;
    j_charged bigint;
    j_balance bigint;
    h_ikey text;
    c bigint;
    known boolean;
    n int := coalesce(array_length(p_keys, 1), 0);
    -- The buckets (as gcra_settle): their states (tat - at, NULL for no row) and the new ones.
    at bigint;
    v bigint;
    cur bigint[] := '{}';
    nxt bigint;
BEGIN
    charged := 0; balance := 0; was_open := false;
    SELECT b.balance INTO a_balance
      FROM @schema@.balances b WHERE b.account = p_account FOR UPDATE;
    known := FOUND;
    now_ts := clock_timestamp();
    IF known THEN
        balance := a_balance;
        -- The hold's delete, the charge (settle: `actual`, at most what is not held by others;
        -- expire: its amount; release: nothing) and the journal row, in one statement.
        WITH h AS (
            DELETE FROM @schema@.holds h WHERE h.id = p_id AND h.account = p_account
             RETURNING h.amount, h.request_id, h.key_id, h.idempotency_key
        ), b AS (
            UPDATE @schema@.balances x
               SET balance = x.balance - CASE p_how
                       WHEN 'settle' THEN least(greatest(p_actual, 0), x.balance - (x.held - h.amount))
                       WHEN 'expire' THEN h.amount
                       ELSE 0 END,
                   held = x.held - h.amount, holds = x.holds - 1, seq = x.seq + 1
              FROM h
             WHERE x.account = p_account
         RETURNING x.balance, x.held, x.seq, h.amount, h.request_id, h.key_id, h.idempotency_key
        )
        INSERT INTO @schema@.journal
            (account, seq, at, kind, amount, hold, hold_id, balance_after, held_after, request_id, key_id, idempotency_key)
        SELECT p_account, b.seq, now_ts, p_how, a_balance - b.balance, b.amount, p_id, b.balance, b.held,
               b.request_id, b.key_id, b.idempotency_key
          FROM b
        RETURNING journal.amount, journal.balance_after, journal.idempotency_key INTO j_charged, j_balance, h_ikey;
        IF FOUND THEN
            c := j_charged; balance := j_balance;
        END IF;
        IF h_ikey IS NOT NULL THEN
            IF p_how = 'release' THEN
                -- Not charged: the key may be used again.
                DELETE FROM @schema@.idempotency_keys k
                 WHERE k.account = p_account AND k.key = h_ikey AND k.hold_id = p_id;
            ELSE
                UPDATE @schema@.idempotency_keys k SET charged = true
                 WHERE k.account = p_account AND k.key = h_ikey AND k.hold_id = p_id;
            END IF;
        END IF;
        IF EXISTS (SELECT 1 FROM @schema@.holds h
                    WHERE h.account = p_account AND h.expires_at <= now_ts) THEN
            PERFORM @schema@.expire_due(p_account, now_ts, 64);
            SELECT b.balance INTO balance FROM @schema@.balances b WHERE b.account = p_account;
        END IF;
    END IF;
    IF c IS NOT NULL THEN
        charged := c; was_open := true;
    ELSIF p_fence_ms > 0 THEN
        INSERT INTO @schema@.fenced_holds (id, until)
        VALUES (p_id, now_ts + p_fence_ms * interval '1 millisecond') ON CONFLICT DO NOTHING;
    END IF;
    IF n > 0 AND (p_when = 'always' OR c IS NOT NULL) THEN
        -- The token correction, never refused: a positive delta consumes (possibly into debt, at
        -- most one window beyond an empty bucket: 2 × t × burst), a negative one gives back,
        -- never beyond a full bucket.
        IF n = 1 THEN
            PERFORM pg_advisory_xact_lock(hashtextextended(p_keys[1], 7431));
        ELSE
            PERFORM pg_advisory_xact_lock(h)
               FROM (SELECT DISTINCT hashtextextended(k, 7431) AS h FROM unnest(p_keys) k ORDER BY 1) s;
        END IF;
        at := coalesce(p_now_ns, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint);
        FOR i IN 1..n LOOP
            SELECT b.tat INTO v FROM @schema@.rate_buckets b WHERE b.key = p_keys[i];
            cur := cur || (v - at);
        END LOOP;
        FOR i IN 1..n LOOP
            IF p_delta[i] >= 0 THEN
                nxt := least(greatest(coalesce(cur[i], 0), 0) + p_t[i]::numeric * p_delta[i],
                             2 * p_t[i]::numeric * p_burst[i], 1e18)::bigint;
            ELSIF cur[i] IS NOT NULL THEN
                nxt := greatest(greatest(cur[i], 0) + p_t[i]::numeric * p_delta[i], 0)::bigint;
            ELSE
                CONTINUE;
            END IF;
            IF nxt <= 0 THEN
                DELETE FROM @schema@.rate_buckets WHERE key = p_keys[i];
            ELSE
                INSERT INTO @schema@.rate_buckets (key, tat)
                VALUES (p_keys[i], at + least(nxt, 1000000000000000000))
                ON CONFLICT (key) DO UPDATE SET tat = excluded.tat;
            END IF;
        END LOOP;
    END IF;
END
$$;

-- The book_many of migration 10, its calls as expressions (no function scan per call).
CREATE OR REPLACE FUNCTION @schema@.book_many(
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
                r := @schema@.reserve(
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
                r := @schema@.close(
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
                    r := @schema@.reserve(
                        p_r_account[ri], p_r_id[ri], p_r_amount[ri], p_r_ttl_ms[ri], p_r_window_ms[ri],
                        p_r_ikey[ri], p_r_fingerprint[ri], p_r_request_id[ri], p_r_key_id[ri],
                        coalesce(p_r_keys[roff + 1:roff + k], '{}'), coalesce(p_r_t[roff + 1:roff + k], '{}'),
                        coalesce(p_r_burst[roff + 1:roff + k], '{}'), coalesce(p_r_cost[roff + 1:roff + k], '{}'),
                        p_r_now_ns[ri]);
                    status := r.status; available := r.available; verdict := r.verdict;
                    idx := r.idx; wait := r.wait; rels := r.rels;
                ELSE
                    r := @schema@.close(
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
