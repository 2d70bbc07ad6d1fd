-- tollgate schema version 1: the ledger and the key store.
-- Amounts are whole credits (INTEGER, at most 2^63 - 1); times are milliseconds since the epoch.

CREATE TABLE tollgate_meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO tollgate_meta (name, value) VALUES ('last_hold_id', 0), ('opened_at_ms', 0);

-- One row per account: its balance and credits held after its journal's last entry.
CREATE TABLE ledger_accounts (
    account  TEXT PRIMARY KEY,
    balance  INTEGER NOT NULL CHECK (balance >= 0),
    held     INTEGER NOT NULL CHECK (held >= 0 AND held <= balance),
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

-- Every movement, append-only: balance = sum(top_up) - sum(settle + expire).
CREATE TABLE ledger_journal (
    account         TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    at_ms           INTEGER NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('reserve', 'settle', 'release', 'expire', 'top_up')),
    amount          INTEGER NOT NULL CHECK (amount >= 0),
    hold            INTEGER NOT NULL CHECK (hold >= 0),
    hold_id         INTEGER,
    balance_after   INTEGER NOT NULL CHECK (balance_after >= 0),
    held_after      INTEGER NOT NULL CHECK (held_after >= 0 AND held_after <= balance_after),
    request_id      TEXT,
    key_id          TEXT,
    idempotency_key TEXT,
    PRIMARY KEY (account, seq)
) WITHOUT ROWID;

-- Open holds (a hold settled within one group commit is never written here).
CREATE TABLE ledger_holds (
    id              INTEGER PRIMARY KEY,
    account         TEXT NOT NULL,
    amount          INTEGER NOT NULL CHECK (amount >= 0),
    expires_at_ms   INTEGER NOT NULL,
    request_id      TEXT,
    key_id          TEXT,
    idempotency_key TEXT
);

-- Top-up idempotency keys, forever: a retried top-up (or a restart's starting balance) is
-- applied once.
CREATE TABLE ledger_top_ups (
    account         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    PRIMARY KEY (account, idempotency_key)
) WITHOUT ROWID;

-- Request idempotency keys (Idempotency-Key), within the ledger's window.
CREATE TABLE ledger_idempotency (
    account         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     BLOB NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    hold_id         INTEGER NOT NULL,
    charged         INTEGER NOT NULL,
    PRIMARY KEY (account, idempotency_key)
) WITHOUT ROWID;

-- The key store: plans' models, accounts, keys (by the SHA-256 digest, never the key).
CREATE TABLE key_plans (
    plan   TEXT PRIMARY KEY,
    models TEXT -- a JSON array, NULL for every model
) WITHOUT ROWID;

CREATE TABLE key_accounts (
    id             TEXT PRIMARY KEY,
    plan           TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'frozen', 'blocked')),
    blocked_reason TEXT
) WITHOUT ROWID;

CREATE TABLE key_keys (
    id            TEXT PRIMARY KEY,
    digest        BLOB NOT NULL UNIQUE,
    account_id    TEXT NOT NULL REFERENCES key_accounts (id),
    status        TEXT NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
    expires_at_ms INTEGER,
    plan          TEXT,
    models        TEXT, -- a JSON array, NULL for every model of the plan
    scopes        TEXT NOT NULL, -- a JSON array
    ip_allowlist  TEXT, -- CIDRs, comma-separated
    metadata      TEXT NOT NULL -- a JSON object
) WITHOUT ROWID;
