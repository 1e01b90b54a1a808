-- phase: expand
-- What a shard database knows about itself.

-- Which shard this database is. A node configured with another shard.id refuses to serve it,
-- so a copy-pasted URL cannot make shard-2's API answer from shard-1's data.
CREATE TABLE shard_identity (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shard_id   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The tenants this shard owns. Every tenant-scoped write checks its row here in the same
-- transaction (fencing): `moved` answers 421, `frozen` answers 503.
CREATE TABLE placements (
    company_id uuid PRIMARY KEY,
    state      text NOT NULL CHECK (state IN ('owned', 'frozen', 'moved')),
    epoch      bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
