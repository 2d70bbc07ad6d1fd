-- The durable record of the Redis backend's journal (`RedisOptions::record`): every entry of
-- every account's journal list, drained from Redis before it is trimmed. Keyed by (account,
-- seq), the entry's sequence number in its account: a drainer inserts with ON CONFLICT DO
-- NOTHING, so two replicas draining the same entries (or one retrying after a lost answer)
-- record each exactly once.
CREATE TABLE @schema@.redis_journal (
    account         text        NOT NULL,
    seq             bigint      NOT NULL CHECK (seq > 0),
    at              timestamptz NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('reserve', 'settle', 'release', 'expire', 'top_up')),
    amount          bigint      NOT NULL CHECK (amount >= 0),
    hold            bigint      NOT NULL CHECK (hold >= 0),
    hold_id         bigint,
    balance_after   bigint      NOT NULL CHECK (balance_after >= 0),
    held_after      bigint      NOT NULL CHECK (held_after >= 0),
    request_id      text,
    key_id          text,
    idempotency_key text,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, seq)
);
