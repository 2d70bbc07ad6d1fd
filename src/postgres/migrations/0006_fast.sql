-- tollgate 0006: the hot path, faster, with the same answers.
--
-- Every function of the request path is replaced by one that runs fewer statements, each with a
-- plan PL/pgSQL caches (the SQL-language `gcra_store` was planned again at every call): the
-- account's row is read and locked once, the update of `balances`, the hold and the journal row
-- are one statement, expired holds are looked for with one index probe before the loop that
-- settles them runs, the buckets are read and written one key at a time (one or two per request)
-- instead of through arrays. Nothing else changes: the same statuses, the same journal rows, the
-- same fences, the database's clock read at the same points.
--
-- `reserve_many` and `close_many` run several calls in one statement (the coalescing of
-- `PostgresOptions::coalesce`), each in a subtransaction of its own: a call that fails (or that
-- waits on a lock more than 100 ms: status 'retry', sent again alone by the client) is rolled back
-- alone, and the others keep their exact answers.

-- Store bucket states `rels` (tat - now) at `now`: a full bucket (rel <= 0) is deleted. With
-- `p_only`, only the buckets whose flag is true.
CREATE OR REPLACE FUNCTION @schema@.gcra_store(p_keys text[], p_rels bigint[], p_now bigint, p_only boolean[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..coalesce(array_length(p_keys, 1), 0) LOOP
        CONTINUE WHEN NOT p_only[i];
        IF p_rels[i] <= 0 THEN
            DELETE FROM @schema@.rate_buckets WHERE key = p_keys[i];
        ELSE
            INSERT INTO @schema@.rate_buckets (key, tat)
            VALUES (p_keys[i], p_now + least(p_rels[i], 1000000000000000000))
            ON CONFLICT (key) DO UPDATE SET tat = excluded.tat;
        END IF;
    END LOOP;
END
$$;

-- Lock the buckets `p_keys` (transaction advisory locks, distinct, in a fixed order).
CREATE FUNCTION @schema@.gcra_lock(p_keys text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF array_length(p_keys, 1) = 1 THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_keys[1], 7431));
    ELSE
        PERFORM pg_advisory_xact_lock(h)
           FROM (SELECT DISTINCT hashtextextended(k, 7431) AS h FROM unnest(p_keys) k ORDER BY 1) s;
    END IF;
END
$$;

-- GCRA on several buckets, all-or-nothing (as migration 1's, same answers): locks the buckets,
-- reads the time once they are locked, then each bucket by its key.
CREATE OR REPLACE FUNCTION @schema@.gcra_check(
    p_keys text[], p_t bigint[], p_burst bigint[], p_cost bigint[], p_now bigint,
    OUT verdict int, OUT idx int, OUT wait bigint, OUT rels bigint[], OUT nexts bigint[], OUT at bigint
) LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_keys, 1), 0);
    cur bigint[] := '{}';
    v bigint;
    rel numeric;
    earliest numeric;
    too_large int := 0;
    refused int := 0;
    longest numeric := 0;
BEGIN
    verdict := 0; idx := 0; wait := 0; rels := '{}'; nexts := '{}'; at := p_now;
    IF n = 0 THEN RETURN; END IF;
    PERFORM @schema@.gcra_lock(p_keys);
    at := coalesce(p_now, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint);
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
        verdict := 2; idx := too_large;
    ELSIF refused > 0 THEN
        verdict := 1; idx := refused; wait := longest::bigint;
    ELSE
        rels := nexts;
    END IF;
END
$$;

-- Corrections, never refused (as migration 1's): a positive delta consumes (possibly into debt,
-- at most one window beyond an empty bucket: 2 × t × burst), a negative one gives back, never
-- beyond a full bucket.
CREATE OR REPLACE FUNCTION @schema@.gcra_settle(p_keys text[], p_t bigint[], p_burst bigint[], p_delta bigint[], p_now bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_keys, 1), 0);
    cur bigint[] := '{}';
    v bigint;
    next bigint[] := '{}';
    touch boolean[] := '{}';
BEGIN
    IF n = 0 THEN RETURN; END IF;
    PERFORM @schema@.gcra_lock(p_keys);
    p_now := coalesce(p_now, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint);
    FOR i IN 1..n LOOP
        SELECT b.tat INTO v FROM @schema@.rate_buckets b WHERE b.key = p_keys[i];
        cur := cur || (v - p_now);
    END LOOP;
    FOR i IN 1..n LOOP
        IF p_delta[i] >= 0 THEN
            next := next || least(greatest(coalesce(cur[i], 0), 0) + p_t[i]::numeric * p_delta[i],
                                  2 * p_t[i]::numeric * p_burst[i], 1e18)::bigint;
            touch := touch || true;
        ELSIF cur[i] IS NOT NULL THEN
            next := next || greatest(greatest(cur[i], 0) + p_t[i]::numeric * p_delta[i], 0)::bigint;
            touch := touch || true;
        ELSE
            next := next || 0::bigint;
            touch := touch || false;
        END IF;
    END LOOP;
    PERFORM @schema@.gcra_store(p_keys, next, p_now, touch);
END
$$;

-- The reserve of migration 1, same arguments and answers, fewer statements.
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
    g record;
    n int := coalesce(array_length(p_keys, 1), 0);
    now_ts timestamptz;
    rec @schema@.idempotency_keys%ROWTYPE;
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
        SELECT * INTO g FROM @schema@.gcra_check(p_keys, p_t, p_burst, p_cost, p_now_ns);
        verdict := g.verdict; idx := g.idx; wait := g.wait; rels := g.rels;
        IF g.verdict <> 0 THEN status := 'limited'; RETURN; END IF;
    END IF;
    IF p_ikey IS NOT NULL AND known THEN
        SELECT * INTO rec FROM @schema@.idempotency_keys k
         WHERE k.account = p_account AND k.key = p_ikey AND k.expires_at > now_ts;
        IF FOUND THEN
            IF rec.fingerprint <> p_fingerprint THEN status := 'reused'; RETURN; END IF;
            IF rec.charged THEN
                IF n > 0 THEN
                    PERFORM @schema@.gcra_store(p_keys, g.nexts, g.at, array_fill(true, ARRAY[n]));
                END IF;
                status := 'replayed'; RETURN;
            END IF;
            status := 'in_use'; RETURN;
        END IF;
    END IF;
    available := coalesce(a_balance - a_held, 0);
    IF NOT known OR p_amount > available THEN
        status := 'insufficient'; RETURN;
    END IF;
    IF n > 0 THEN
        PERFORM @schema@.gcra_store(p_keys, g.nexts, g.at, array_fill(true, ARRAY[n]));
    END IF;
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

-- The close of migration 1, same arguments and answers, fewer statements.
CREATE OR REPLACE FUNCTION @schema@.close(
    p_account text, p_id bigint, p_how text, p_actual bigint, p_fence_ms bigint, p_when text,
    p_keys text[], p_t bigint[], p_burst bigint[], p_delta bigint[], p_now_ns bigint,
    OUT charged bigint, OUT balance bigint, OUT was_open boolean
) LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz;
    a_balance bigint;
    a_held bigint;
    h_amount bigint;
    h_request_id text;
    h_key_id text;
    h_ikey text;
    c bigint;
    known boolean;
BEGIN
    charged := 0; balance := 0; was_open := false;
    SELECT b.balance, b.held INTO a_balance, a_held
      FROM @schema@.balances b WHERE b.account = p_account FOR UPDATE;
    known := FOUND;
    now_ts := clock_timestamp();
    IF known THEN
        balance := a_balance;
        DELETE FROM @schema@.holds h WHERE h.id = p_id AND h.account = p_account
         RETURNING h.amount, h.request_id, h.key_id, h.idempotency_key
              INTO h_amount, h_request_id, h_key_id, h_ikey;
        IF FOUND THEN
            a_held := a_held - h_amount;
            IF p_how = 'settle' THEN
                c := least(greatest(p_actual, 0), a_balance - a_held);
            ELSIF p_how = 'expire' THEN
                c := h_amount;
            ELSE
                c := 0;
            END IF;
            WITH b AS (
                UPDATE @schema@.balances x
                   SET balance = x.balance - c, held = x.held - h_amount, holds = x.holds - 1, seq = x.seq + 1
                 WHERE x.account = p_account
             RETURNING x.balance, x.held, x.seq
            )
            INSERT INTO @schema@.journal
                (account, seq, at, kind, amount, hold, hold_id, balance_after, held_after, request_id, key_id, idempotency_key)
            SELECT p_account, b.seq, now_ts, p_how, c, h_amount, p_id, b.balance, b.held,
                   h_request_id, h_key_id, h_ikey
              FROM b
            RETURNING journal.balance_after INTO balance;
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
    IF coalesce(array_length(p_keys, 1), 0) > 0 AND (p_when = 'always' OR c IS NOT NULL) THEN
        PERFORM @schema@.gcra_settle(p_keys, p_t, p_burst, p_delta, p_now_ns);
    END IF;
END
$$;

-- Several reserves in one statement, in the order given (the client sorts them by account, so
-- concurrent batches take the accounts' locks in the same order). `p_nkeys[j]` buckets of the
-- flattened bucket arrays belong to call j. Each call runs in a subtransaction of its own: one
-- that fails answers 'error' (with the message in `err`) or, when it waited on a lock more than
-- 100 ms, 'retry' (the client sends it again alone); it is rolled back alone, and the others keep
-- their answers. Returns one row per call, `n` its 1-based position.
CREATE FUNCTION @schema@.reserve_many(
    p_account text[], p_id bigint[], p_amount bigint[], p_ttl_ms bigint[], p_window_ms bigint[],
    p_ikey text[], p_fingerprint bytea[], p_request_id text[], p_key_id text[],
    p_nkeys int[], p_keys text[], p_t bigint[], p_burst bigint[], p_cost bigint[], p_now_ns bigint[]
) RETURNS TABLE (n int, status text, available bigint, verdict int, idx int, wait bigint, rels bigint[], err text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    off int := 0;
    k int;
BEGIN
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR j IN 1..coalesce(array_length(p_account, 1), 0) LOOP
        k := p_nkeys[j];
        n := j; err := NULL;
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
                status := 'retry'; available := 0; verdict := 0; idx := 0; wait := 0; rels := NULL;
            WHEN OTHERS THEN
                status := 'error'; available := 0; verdict := 0; idx := 0; wait := 0; rels := NULL;
                err := SQLSTATE || ': ' || SQLERRM;
        END;
        off := off + k;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Several closes in one statement, as `reserve_many` does reserves.
CREATE FUNCTION @schema@.close_many(
    p_account text[], p_id bigint[], p_how text[], p_actual bigint[], p_fence_ms bigint[], p_when text[],
    p_nkeys int[], p_keys text[], p_t bigint[], p_burst bigint[], p_delta bigint[], p_now_ns bigint[]
) RETURNS TABLE (n int, status text, charged bigint, balance bigint, was_open boolean, err text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    off int := 0;
    k int;
BEGIN
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR j IN 1..coalesce(array_length(p_account, 1), 0) LOOP
        k := p_nkeys[j];
        n := j; err := NULL;
        BEGIN
            SELECT * INTO r FROM @schema@.close(
                p_account[j], p_id[j], p_how[j], p_actual[j], p_fence_ms[j], p_when[j],
                coalesce(p_keys[off + 1:off + k], '{}'), coalesce(p_t[off + 1:off + k], '{}'),
                coalesce(p_burst[off + 1:off + k], '{}'), coalesce(p_delta[off + 1:off + k], '{}'),
                p_now_ns[j]);
            status := 'ok'; charged := r.charged; balance := r.balance; was_open := r.was_open;
        EXCEPTION
            WHEN lock_not_available THEN
                status := 'retry'; charged := 0; balance := 0; was_open := false;
            WHEN OTHERS THEN
                status := 'error'; charged := 0; balance := 0; was_open := false;
                err := SQLSTATE || ': ' || SQLERRM;
        END;
        off := off + k;
        RETURN NEXT;
    END LOOP;
END
$$;
