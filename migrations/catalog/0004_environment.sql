-- phase: expand
-- The environment a catalog serves (production, staging, …), recorded by the first
-- `tenantry admin shard apply` from its file's `environment`. A later apply of a file for
-- another environment is refused before it touches anything: a staging map applied to the
-- production catalog would point production's shards at staging's databases. Older binaries
-- do not read this table.
CREATE TABLE catalog_environment (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    environment text NOT NULL CHECK (environment <> '' AND length(environment) <= 200),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
