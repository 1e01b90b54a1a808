-- phase: expand
-- Each shard's companies that are not deleted, kept by a trigger in the transaction that
-- changes them, so a company creation chooses its shard by reading one row per shard instead
-- of counting every tenant of every shard (300 ms at a million companies, holding the shard
-- rows it considers). Older binaries keep counting and do not read this table; the triggers
-- keep it right under their writes too, and under hand-written INSERT, UPDATE, DELETE and
-- TRUNCATE. Writes made with triggers off (`session_replication_role = replica`, a data-only
-- restore with --disable-triggers) are not counted; recount after them with:
--   BEGIN; LOCK TABLE tenants IN SHARE MODE; DELETE FROM shard_live_tenants;
--   INSERT INTO shard_live_tenants SELECT shard_id, count(*) FROM tenants
--    WHERE state <> 'deleted' GROUP BY shard_id; COMMIT;
--
-- Tenant writes are held off while the counts are taken and the trigger is created, so that
-- no write falls between the two.
LOCK TABLE tenants IN SHARE MODE;

CREATE TABLE shard_live_tenants (
    shard_id text PRIMARY KEY,
    -- No CHECK (live >= 0): the upserts below propose a row with the change alone (negative
    -- when companies leave), which always meets the shard's existing row, but a CHECK is
    -- tested on the proposed row first.
    live     bigint NOT NULL
);

INSERT INTO shard_live_tenants (shard_id, live)
SELECT shard_id, count(*) FROM tenants WHERE state <> 'deleted' GROUP BY shard_id;

-- Statement-level, from the transition tables: one write per shard a statement changes,
-- whatever the number of rows (a row-level trigger made a bulk insert of 100,000 companies
-- take 40 s, each row rewriting its shard's one counter row in one transaction), and none for
-- an activation (provisioning → active), which changes no count. Rows are written in shard
-- order, so two statements that change several shards each lock them in the same order.
-- A shard's row stays locked until the writing transaction commits: creations placed on one
-- shard commit their first step one after another (each a single insert), and a long
-- transaction writing tenants of a shard holds its creations up meanwhile.
CREATE FUNCTION tenantry_count_live_tenants() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM shard_live_tenants;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO shard_live_tenants (shard_id, live)
        SELECT shard_id, count(*) FROM new_rows WHERE state <> 'deleted'
         GROUP BY shard_id ORDER BY shard_id
        ON CONFLICT (shard_id) DO UPDATE SET live = shard_live_tenants.live + excluded.live;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO shard_live_tenants (shard_id, live)
        SELECT shard_id, -count(*) FROM old_rows WHERE state <> 'deleted'
         GROUP BY shard_id ORDER BY shard_id
        ON CONFLICT (shard_id) DO UPDATE SET live = shard_live_tenants.live + excluded.live;
    ELSE
        INSERT INTO shard_live_tenants (shard_id, live)
        SELECT shard_id, sum(n) FROM (
            SELECT shard_id, 1 AS n FROM new_rows WHERE state <> 'deleted'
            UNION ALL
            SELECT shard_id, -1 FROM old_rows WHERE state <> 'deleted') delta
         GROUP BY shard_id HAVING sum(n) <> 0 ORDER BY shard_id
        ON CONFLICT (shard_id) DO UPDATE SET live = shard_live_tenants.live + excluded.live;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER count_live_tenants_inserted AFTER INSERT ON tenants
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tenantry_count_live_tenants();

CREATE TRIGGER count_live_tenants_updated AFTER UPDATE ON tenants
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tenantry_count_live_tenants();

CREATE TRIGGER count_live_tenants_deleted AFTER DELETE ON tenants
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION tenantry_count_live_tenants();

CREATE TRIGGER count_live_tenants_truncated AFTER TRUNCATE ON tenants
FOR EACH STATEMENT EXECUTE FUNCTION tenantry_count_live_tenants();
