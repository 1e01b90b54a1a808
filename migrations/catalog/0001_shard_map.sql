-- phase: expand
-- The catalog: which shards exist, how to reach them, and where every tenant lives.

-- One row per shard database. `version` increases on every change so gateways can ignore
-- stale shard-map messages.
CREATE TABLE shards (
    id           text PRIMARY KEY CHECK (id ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    database_url text NOT NULL,
    state        text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'retired')),
    accepting    boolean NOT NULL DEFAULT true,
    weight       integer NOT NULL DEFAULT 100 CHECK (weight BETWEEN 1 AND 10000),
    version      bigint NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The base URLs of a shard's API pool; the gateway balances over them.
CREATE TABLE shard_endpoints (
    shard_id text NOT NULL REFERENCES shards (id) ON DELETE CASCADE,
    url      text NOT NULL CHECK (url ~ '^https?://'),
    PRIMARY KEY (shard_id, url)
);

-- Tenant placements: company → shard. `version` increases on every change.
CREATE TABLE tenants (
    id         uuid PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    shard_id   text NOT NULL REFERENCES shards (id),
    state      text NOT NULL CHECK (state IN ('provisioning', 'active', 'moving', 'deleted')),
    version    bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenants_shard_id ON tenants (shard_id);

-- Changes to publish to RabbitMQ, written in the same transaction as the change itself.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    topic        text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- The shard map's version: one counter bumped by every change of a shard or a placement.
CREATE TABLE shard_map_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL
);
INSERT INTO shard_map_version (version) VALUES (0);
