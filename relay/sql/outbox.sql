-- The Freshness outbox: what `freshness-relay migrate` runs (idempotent).
--
-- A writer inserts one row per changed entity in the same transaction as
-- the change itself; `freshness-relay run` publishes committed rows to the
-- hub and deletes them once the hub answered. A rolled-back transaction
-- leaves no row, so nothing is published for it.
--
--   INSERT INTO freshness_outbox (entity, version) VALUES ('user:42', 7);
--
-- Versions are BIGINT: 1 to 9223372036854775807.

CREATE TABLE IF NOT EXISTS freshness_outbox (
    id          BIGSERIAL PRIMARY KEY,
    entity      TEXT        NOT NULL,
    version     BIGINT      NOT NULL,
    payload     BYTEA,
    traceparent TEXT,
    tracestate  TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- Oldest row age (a relay metric) without a scan.
CREATE INDEX IF NOT EXISTS freshness_outbox_created_at ON freshness_outbox (created_at);

-- Rows the hub can never accept (malformed entity, version 0, payload over
-- the limit), with the reason. The relay moves them here so that they do
-- not block the rows behind them; nothing else reads this table.
CREATE TABLE IF NOT EXISTS freshness_outbox_dead (
    id          BIGINT      PRIMARY KEY,
    entity      TEXT        NOT NULL,
    version     BIGINT      NOT NULL,
    payload     BYTEA,
    traceparent TEXT,
    tracestate  TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    dead_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    error       TEXT        NOT NULL
);

-- Wakes the relays (LISTEN freshness_outbox) when an inserting transaction
-- commits: a notification is delivered at commit and never for a rollback.
-- One per statement; the relay reads the table, not the payload.
CREATE OR REPLACE FUNCTION freshness_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('freshness_outbox', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS freshness_outbox_notify ON freshness_outbox;
CREATE TRIGGER freshness_outbox_notify
    AFTER INSERT ON freshness_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION freshness_outbox_notify();
