-- phase: expand
-- Wake shard-map relays the moment a change commits: every statement that writes outbox rows
-- sends one notification on `tenantry_shardmap_outbox` (delivered at commit, dropped on
-- rollback). Relays still poll as a fallback, so a lost notification only costs latency.

CREATE FUNCTION tenantry_shardmap_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tenantry_shardmap_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION tenantry_shardmap_outbox_notify();
