-- tollgate 0001: the books (balances, holds, journal, idempotency), the key store and the
-- rate-limit buckets, with the functions that move money in one statement each.
-- `@schema@` is replaced by the configured schema (a validated, quoted identifier).

-- One row per account of the ledger: what it has and what is held on it. Every movement locks
-- this row (SELECT ... FOR UPDATE), so each operation on an account is serialized across every
-- replica, and the CHECKs make a negative balance impossible even for a bug in this file.
CREATE TABLE @schema@.balances (
    account text PRIMARY KEY,
    balance bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    held    bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    holds   bigint NOT NULL DEFAULT 0 CHECK (holds >= 0),
    -- The last journal sequence number of the account (entries are numbered from 1).
    seq     bigint NOT NULL DEFAULT 0,
    CHECK (held <= balance)
);

-- Open holds only: a closed hold is deleted in the statement that journals its close.
CREATE TABLE @schema@.holds (
    id              bigint PRIMARY KEY,
    account         text NOT NULL,
    amount          bigint NOT NULL CHECK (amount >= 0),
    placed_at       timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    request_id      text,
    key_id          text,
    idempotency_key text
);
CREATE INDEX holds_by_expiry ON @schema@.holds (expires_at);
CREATE INDEX holds_by_account ON @schema@.holds (account, expires_at);

-- Hold ids released before their reserve was seen (a reserve whose answer was lost): such a
-- reserve, should it still arrive, places nothing. Kept for twice the hold TTL.
CREATE TABLE @schema@.fenced_holds (
    id    bigint PRIMARY KEY,
    until timestamptz NOT NULL
);

-- `Idempotency-Key`s of requests, per account, within the idempotency window.
CREATE TABLE @schema@.idempotency_keys (
    account     text NOT NULL,
    key         text NOT NULL,
    fingerprint bytea NOT NULL,
    hold_id     bigint NOT NULL,
    charged     boolean NOT NULL DEFAULT false,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX idempotency_keys_by_expiry ON @schema@.idempotency_keys (expires_at);

-- Every top-up ever applied, by its idempotency key: a repeat is answered from here.
CREATE TABLE @schema@.top_ups (
    account         text NOT NULL,
    idempotency_key text NOT NULL,
    amount          bigint NOT NULL CHECK (amount >= 0),
    at              timestamptz NOT NULL,
    PRIMARY KEY (account, idempotency_key)
);

-- One row per movement, appended in the statement that makes it, never updated. Rows may be
-- deleted (retention): balances live in `balances`, and every row carries the balance after it.
CREATE TABLE @schema@.journal (
    account         text NOT NULL,
    seq             bigint NOT NULL,
    at              timestamptz NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('reserve', 'settle', 'release', 'expire', 'top_up')),
    amount          bigint NOT NULL,
    hold            bigint NOT NULL,
    hold_id         bigint,
    balance_after   bigint NOT NULL,
    held_after      bigint NOT NULL,
    request_id      text,
    key_id          text,
    idempotency_key text,
    PRIMARY KEY (account, seq)
);
CREATE INDEX journal_by_time ON @schema@.journal (at);

-- GCRA state: a bucket's theoretical arrival time in ns since the Unix epoch (the database's
-- clock). A row whose `tat` has passed is a full bucket, the same as no row. UNLOGGED: rate-limit
-- state is not money; after a PostgreSQL crash the buckets start full.
CREATE UNLOGGED TABLE @schema@.rate_buckets (
    key text PRIMARY KEY,
    tat bigint NOT NULL
);

-- The key store: plans (the models they may use), accounts, keys by SHA-256 digest.
CREATE TABLE @schema@.plans (
    name   text PRIMARY KEY,
    -- A JSON array of model ids; no row: every model.
    models jsonb NOT NULL
);

CREATE TABLE @schema@.accounts (
    id     text PRIMARY KEY,
    plan   text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'frozen', 'blocked')),
    reason text NOT NULL DEFAULT ''
);

CREATE TABLE @schema@.api_keys (
    id           text PRIMARY KEY,
    digest       bytea NOT NULL UNIQUE CHECK (length(digest) = 32),
    account      text NOT NULL REFERENCES @schema@.accounts (id),
    status       text NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
    expires_at   timestamptz,
    plan         text,
    models       jsonb,
    scopes       jsonb NOT NULL DEFAULT '[]',
    ip_allowlist text,
    metadata     jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_by_account ON @schema@.api_keys (account);

-- Revocation is final, whoever writes: a revoked key never gets another status.
CREATE FUNCTION @schema@.revocation_is_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'revoked' AND NEW.status <> 'revoked' THEN
        RAISE EXCEPTION 'the key % is revoked, and revocation is final', OLD.id
            USING ERRCODE = 'TGRVK';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER revocation_is_final BEFORE UPDATE OF status ON @schema@.api_keys
    FOR EACH ROW EXECUTE FUNCTION @schema@.revocation_is_final();

-- The database's clock in ns since the Unix epoch (microsecond resolution).
CREATE FUNCTION @schema@.now_ns() RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint
$$;

-- GCRA on several buckets, all-or-nothing: the arithmetic of `ratelimit::gcra` (governor's), on
-- times relative to `now` (ns). Locks the buckets (transaction advisory locks, in a fixed order,
-- so concurrent checks never deadlock) and reads them. Returns the verdict (0 allowed, 1 refused,
-- 2 too large), the 1-based index of the refusing bucket, the wait (ns), the buckets' states
-- (`rel` = tat - now, after the charge when allowed) and the states to write when allowed.
CREATE FUNCTION @schema@.gcra_check(
    p_keys text[], p_t bigint[], p_burst bigint[], p_cost bigint[], p_now bigint,
    OUT verdict int, OUT idx int, OUT wait bigint, OUT rels bigint[], OUT nexts bigint[], OUT at bigint
) LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_keys, 1), 0);
    cur bigint[];
    rel numeric;
    earliest numeric;
    too_large int := 0;
    refused int := 0;
    longest numeric := 0;
BEGIN
    verdict := 0; idx := 0; wait := 0; rels := '{}'; nexts := '{}'; at := p_now;
    IF n = 0 THEN RETURN; END IF;
    PERFORM pg_advisory_xact_lock(h)
       FROM (SELECT DISTINCT hashtextextended(k, 7431) AS h FROM unnest(p_keys) k ORDER BY 1) s;
    -- The time is read once the buckets are locked: checks are ordered as their times are.
    at := coalesce(p_now, @schema@.now_ns());
    SELECT array_agg(greatest(coalesce(b.tat - at, 0), 0) ORDER BY u.i)
      INTO cur
      FROM unnest(p_keys) WITH ORDINALITY AS u(k, i)
      LEFT JOIN @schema@.rate_buckets b ON b.key = u.k;
    FOR i IN 1..n LOOP
        rel := cur[i];
        rels := rels || cur[i];
        nexts := nexts || cur[i];
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
    IF too_large > 0 THEN
        verdict := 2; idx := too_large;
    ELSIF refused > 0 THEN
        verdict := 1; idx := refused; wait := longest::bigint;
    ELSE
        rels := nexts;
    END IF;
END
$$;

-- Store bucket states `rels` (tat - now) at `now`: a full bucket (rel <= 0) is deleted. With
-- `p_only`, only the buckets whose flag is true.
CREATE FUNCTION @schema@.gcra_store(p_keys text[], p_rels bigint[], p_now bigint, p_only boolean[])
RETURNS void LANGUAGE sql AS $$
    DELETE FROM @schema@.rate_buckets b
     USING unnest(p_keys, p_rels, p_only) AS u(k, r, o)
     WHERE b.key = u.k AND u.o AND u.r <= 0;
    INSERT INTO @schema@.rate_buckets (key, tat)
    SELECT u.k, p_now + least(u.r, 1000000000000000000)
      FROM unnest(p_keys, p_rels, p_only) AS u(k, r, o)
     WHERE u.o AND u.r > 0
    ON CONFLICT (key) DO UPDATE SET tat = excluded.tat;
$$;

-- Corrections, never refused: a positive delta consumes (possibly into debt, at most one window
-- beyond an empty bucket: 2 × t × burst), a negative one gives back, never beyond a full bucket.
CREATE FUNCTION @schema@.gcra_settle(p_keys text[], p_t bigint[], p_burst bigint[], p_delta bigint[], p_now bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_keys, 1), 0);
    cur bigint[];
    next bigint[] := '{}';
    touch boolean[] := '{}';
BEGIN
    IF n = 0 THEN RETURN; END IF;
    PERFORM pg_advisory_xact_lock(h)
       FROM (SELECT DISTINCT hashtextextended(k, 7431) AS h FROM unnest(p_keys) k ORDER BY 1) s;
    p_now := coalesce(p_now, @schema@.now_ns());
    SELECT array_agg(b.tat - p_now ORDER BY u.i)
      INTO cur
      FROM unnest(p_keys) WITH ORDINALITY AS u(k, i)
      LEFT JOIN @schema@.rate_buckets b ON b.key = u.k;
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

-- Close an open hold of a locked account: 'settle' (charging `actual`, at most what is not held
-- by others), 'release' (nothing) or 'expire' (its amount). Returns the credits charged, or NULL
-- when the hold is not open.
CREATE FUNCTION @schema@.close_hold(p_account text, p_id bigint, p_how text, p_actual bigint, p_at timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    h @schema@.holds%ROWTYPE;
    a @schema@.balances%ROWTYPE;
    charged bigint := 0;
BEGIN
    DELETE FROM @schema@.holds WHERE id = p_id AND account = p_account RETURNING * INTO h;
    IF NOT FOUND THEN RETURN NULL; END IF;
    SELECT * INTO a FROM @schema@.balances WHERE account = p_account;
    a.held := a.held - h.amount;
    IF p_how = 'settle' THEN
        charged := least(greatest(p_actual, 0), a.balance - a.held);
    ELSIF p_how = 'expire' THEN
        charged := h.amount;
    END IF;
    a.balance := a.balance - charged;
    a.seq := a.seq + 1;
    UPDATE @schema@.balances
       SET balance = a.balance, held = a.held, holds = holds - 1, seq = a.seq
     WHERE account = p_account;
    IF h.idempotency_key IS NOT NULL THEN
        IF p_how = 'release' THEN
            -- Not charged: the key may be used again.
            DELETE FROM @schema@.idempotency_keys
             WHERE account = p_account AND key = h.idempotency_key AND hold_id = p_id;
        ELSE
            UPDATE @schema@.idempotency_keys SET charged = true
             WHERE account = p_account AND key = h.idempotency_key AND hold_id = p_id;
        END IF;
    END IF;
    INSERT INTO @schema@.journal
        (account, seq, at, kind, amount, hold, hold_id, balance_after, held_after, request_id, key_id, idempotency_key)
    VALUES (p_account, a.seq, p_at, p_how, charged, h.amount, p_id, a.balance, a.held,
            h.request_id, h.key_id, h.idempotency_key);
    RETURN charged;
END
$$;

-- Settle at their amount the locked account's holds that expired at or before `p_at` (at most
-- `p_max`). Returns the number closed and the credits charged.
CREATE FUNCTION @schema@.expire_due(p_account text, p_at timestamptz, p_max int, OUT closed bigint, OUT charged bigint)
LANGUAGE plpgsql AS $$
DECLARE
    due bigint;
    c bigint;
BEGIN
    closed := 0; charged := 0;
    FOR due IN SELECT id FROM @schema@.holds
                WHERE account = p_account AND expires_at <= p_at
                ORDER BY expires_at, id LIMIT p_max LOOP
        c := @schema@.close_hold(p_account, due, 'expire', 0, p_at);
        IF c IS NOT NULL THEN closed := closed + 1; charged := charged + c; END IF;
    END LOOP;
END
$$;

-- Charge the rate-limit buckets and place a hold, both or neither: one statement, one round trip.
-- Status: 'held' (available after), 'replayed', 'limited', 'insufficient' (available),
-- 'reused', 'in_use' or 'fenced'; with the limits' GCRA answer (verdict, idx, wait, rels). The
-- buckets are charged only with 'held' and 'replayed' (a replay calls the upstream again).
CREATE FUNCTION @schema@.reserve(
    p_account text, p_id bigint, p_amount bigint, p_ttl_ms bigint, p_window_ms bigint,
    p_ikey text, p_fingerprint bytea, p_request_id text, p_key_id text,
    p_keys text[], p_t bigint[], p_burst bigint[], p_cost bigint[], p_now_ns bigint,
    OUT status text, OUT available bigint,
    OUT verdict int, OUT idx int, OUT wait bigint, OUT rels bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    a @schema@.balances%ROWTYPE;
    g record;
    now_ts timestamptz;
    rec @schema@.idempotency_keys%ROWTYPE;
BEGIN
    available := 0; verdict := 0; idx := 0; wait := 0; rels := '{}';
    SELECT * INTO a FROM @schema@.balances WHERE account = p_account FOR UPDATE;
    IF NOT FOUND AND p_amount = 0 THEN
        INSERT INTO @schema@.balances (account) VALUES (p_account) ON CONFLICT DO NOTHING;
        SELECT * INTO a FROM @schema@.balances WHERE account = p_account FOR UPDATE;
    END IF;
    now_ts := clock_timestamp();
    IF a.account IS NOT NULL THEN
        PERFORM @schema@.expire_due(p_account, now_ts, 64);
        SELECT * INTO a FROM @schema@.balances WHERE account = p_account;
    END IF;
    IF EXISTS (SELECT 1 FROM @schema@.fenced_holds WHERE id = p_id) THEN
        status := 'fenced'; RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM @schema@.holds WHERE id = p_id) THEN
        -- The same reserve again (a retried statement): it was placed already.
        status := 'held'; available := coalesce(a.balance - a.held, 0); rels := NULL; RETURN;
    END IF;
    SELECT * INTO g FROM @schema@.gcra_check(p_keys, p_t, p_burst, p_cost, p_now_ns);
    verdict := g.verdict; idx := g.idx; wait := g.wait; rels := g.rels;
    IF g.verdict <> 0 THEN status := 'limited'; RETURN; END IF;
    IF p_ikey IS NOT NULL AND a.account IS NOT NULL THEN
        SELECT * INTO rec FROM @schema@.idempotency_keys
         WHERE account = p_account AND key = p_ikey AND expires_at > now_ts;
        IF FOUND THEN
            IF rec.fingerprint <> p_fingerprint THEN status := 'reused'; RETURN; END IF;
            IF rec.charged THEN
                PERFORM @schema@.gcra_store(p_keys, g.nexts, g.at, array_fill(true, ARRAY[coalesce(array_length(p_keys, 1), 0)]));
                status := 'replayed'; RETURN;
            END IF;
            status := 'in_use'; RETURN;
        END IF;
    END IF;
    available := coalesce(a.balance - a.held, 0);
    IF a.account IS NULL OR p_amount > available THEN
        status := 'insufficient'; RETURN;
    END IF;
    PERFORM @schema@.gcra_store(p_keys, g.nexts, g.at,
        array_fill(true, ARRAY[coalesce(array_length(p_keys, 1), 0)]));
    a.held := a.held + p_amount;
    a.seq := a.seq + 1;
    UPDATE @schema@.balances SET held = a.held, holds = holds + 1, seq = a.seq
     WHERE account = p_account;
    INSERT INTO @schema@.holds (id, account, amount, placed_at, expires_at, request_id, key_id, idempotency_key)
    VALUES (p_id, p_account, p_amount, now_ts, now_ts + p_ttl_ms * interval '1 millisecond',
            p_request_id, p_key_id, p_ikey);
    IF p_ikey IS NOT NULL THEN
        INSERT INTO @schema@.idempotency_keys (account, key, fingerprint, hold_id, charged, expires_at)
        VALUES (p_account, p_ikey, p_fingerprint, p_id, false, now_ts + p_window_ms * interval '1 millisecond')
        ON CONFLICT (account, key) DO UPDATE
           SET fingerprint = excluded.fingerprint, hold_id = excluded.hold_id,
               charged = false, expires_at = excluded.expires_at;
    END IF;
    INSERT INTO @schema@.journal
        (account, seq, at, kind, amount, hold, hold_id, balance_after, held_after, request_id, key_id, idempotency_key)
    VALUES (p_account, a.seq, now_ts, 'reserve', p_amount, p_amount, p_id, a.balance, a.held,
            p_request_id, p_key_id, p_ikey);
    status := 'held';
    available := available - p_amount;
END
$$;

-- Close a hold ('settle' or 'release') and correct rate-limit buckets in the same statement.
-- `p_when`: 'always', or 'if_open' (only if this call closed the hold). With `p_fence_ms` > 0,
-- closing a hold that is not open forbids placing it later. Returns charged, balance, was_open.
CREATE FUNCTION @schema@.close(
    p_account text, p_id bigint, p_how text, p_actual bigint, p_fence_ms bigint, p_when text,
    p_keys text[], p_t bigint[], p_burst bigint[], p_delta bigint[], p_now_ns bigint,
    OUT charged bigint, OUT balance bigint, OUT was_open boolean
) LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz;
    c bigint;
    known boolean;
BEGIN
    charged := 0; balance := 0; was_open := false;
    PERFORM 1 FROM @schema@.balances WHERE account = p_account FOR UPDATE;
    known := FOUND;
    now_ts := clock_timestamp();
    IF known THEN
        c := @schema@.close_hold(p_account, p_id, p_how, p_actual, now_ts);
        PERFORM @schema@.expire_due(p_account, now_ts, 64);
        SELECT b.balance INTO balance FROM @schema@.balances b WHERE account = p_account;
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

-- Add credits, idempotently, up to a balance of `p_max`. Status 'applied' | 'duplicate' (with the
-- balance), 'reused' (with the first top-up's amount in `balance`) or 'overflow'.
CREATE FUNCTION @schema@.top_up(
    p_account text, p_amount bigint, p_key text, p_max bigint,
    OUT status text, OUT balance bigint, OUT held bigint, OUT holds bigint
) LANGUAGE plpgsql AS $$
DECLARE
    a @schema@.balances%ROWTYPE;
    previous bigint;
    now_ts timestamptz;
BEGIN
    INSERT INTO @schema@.balances (account) VALUES (p_account) ON CONFLICT DO NOTHING;
    SELECT * INTO a FROM @schema@.balances WHERE account = p_account FOR UPDATE;
    now_ts := clock_timestamp();
    PERFORM @schema@.expire_due(p_account, now_ts, 64);
    SELECT * INTO a FROM @schema@.balances WHERE account = p_account;
    SELECT amount INTO previous FROM @schema@.top_ups WHERE account = p_account AND idempotency_key = p_key;
    IF FOUND THEN
        IF previous = p_amount THEN
            status := 'duplicate'; balance := a.balance; held := a.held; holds := a.holds;
        ELSE
            status := 'reused'; balance := previous;
        END IF;
        RETURN;
    END IF;
    IF a.balance::numeric + p_amount > p_max THEN status := 'overflow'; RETURN; END IF;
    a.balance := a.balance + p_amount;
    a.seq := a.seq + 1;
    UPDATE @schema@.balances SET balance = a.balance, seq = a.seq WHERE account = p_account;
    INSERT INTO @schema@.top_ups (account, idempotency_key, amount, at) VALUES (p_account, p_key, p_amount, now_ts);
    INSERT INTO @schema@.journal
        (account, seq, at, kind, amount, hold, hold_id, balance_after, held_after, idempotency_key)
    VALUES (p_account, a.seq, now_ts, 'top_up', p_amount, 0, NULL, a.balance, a.held, p_key);
    status := 'applied'; balance := a.balance; held := a.held; holds := a.holds;
END
$$;

-- Settle at their amount up to `p_max` holds that expired at or before `least(p_at, now)`, across
-- accounts, locking accounts in order (concurrent expiries never deadlock); forget fences,
-- idempotency keys and full buckets that are past. Returns holds closed and credits charged.
CREATE FUNCTION @schema@.expire(p_at timestamptz, p_max int, OUT closed bigint, OUT charged bigint)
LANGUAGE plpgsql AS $$
DECLARE
    due record;
    c bigint;
    locked text := NULL;
    v_at timestamptz := least(p_at, clock_timestamp());
BEGIN
    closed := 0; charged := 0;
    FOR due IN SELECT account, id FROM @schema@.holds WHERE expires_at <= v_at
                ORDER BY account, id LIMIT p_max LOOP
        IF locked IS DISTINCT FROM due.account THEN
            PERFORM 1 FROM @schema@.balances WHERE account = due.account FOR UPDATE;
            locked := due.account;
        END IF;
        c := @schema@.close_hold(due.account, due.id, 'expire', 0, v_at);
        IF c IS NOT NULL THEN closed := closed + 1; charged := charged + c; END IF;
    END LOOP;
    DELETE FROM @schema@.fenced_holds WHERE until <= v_at;
    DELETE FROM @schema@.idempotency_keys k WHERE k.expires_at <= v_at AND k.charged;
    DELETE FROM @schema@.rate_buckets b WHERE b.tat <= @schema@.now_ns();
END
$$;

-- The limiter's check: every bucket or none, one statement.
CREATE FUNCTION @schema@.rate_limit(
    p_keys text[], p_t bigint[], p_burst bigint[], p_cost bigint[], p_now_ns bigint,
    OUT verdict int, OUT idx int, OUT wait bigint, OUT rels bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    g record;
BEGIN
    SELECT * INTO g FROM @schema@.gcra_check(p_keys, p_t, p_burst, p_cost, p_now_ns);
    verdict := g.verdict; idx := g.idx; wait := g.wait; rels := g.rels;
    IF g.verdict = 0 THEN
        PERFORM @schema@.gcra_store(p_keys, g.nexts, g.at,
            array_fill(true, ARRAY[coalesce(array_length(p_keys, 1), 0)]));
    END IF;
END
$$;
