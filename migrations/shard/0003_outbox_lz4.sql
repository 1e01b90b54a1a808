-- phase: expand
-- A completion batch writes its job.finished events as one outbox row (a JSON array of up to
-- 500 events, ~60 kB). PostgreSQL's default pglz compression of that value cost the
-- completing transaction 1-5 ms per batch of 500; lz4 compresses it about as well at a small
-- fraction of the CPU. Only new values are affected, so this is safe while old code runs.
-- A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN events SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: outbox.events stays pglz-compressed';
END
$$;
