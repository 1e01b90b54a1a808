-- phase: expand
-- The shard's job queue: one row per job, the single record of a request from `waiting` to
-- `done`/`error`. See crates/queue for the statements that use these indexes.

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,              -- UUID v7: time-ordered
    request_id       text NOT NULL,                 -- the HTTP request that created it (log search)
    company_id       uuid NOT NULL,
    user_context     jsonb NOT NULL DEFAULT '{}',   -- who asked: {"user_id", "role"}
    kind             text NOT NULL,
    params           jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'waiting'
                     CHECK (state IN ('waiting', 'processing', 'done', 'error', 'error_resolved')),
    worker_id        text,
    attempts         integer NOT NULL DEFAULT 0,    -- also the lease token of the current attempt
    max_attempts     integer NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    run_at           timestamptz NOT NULL DEFAULT now(),  -- not claimable before (retry backoff)
    priority         bigint NOT NULL,               -- claim order: fair virtual time, see queue docs
    lease_expires_at timestamptz,
    result           jsonb,
    error            text,
    idempotency_key  text,
    resolution_note  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Claimable rows only, in claim order: the claim statement walks this index.
CREATE INDEX jobs_claimable ON jobs (priority) WHERE state = 'waiting';
-- Per-company waiting counts (backpressure) and fairness.
CREATE INDEX jobs_company_waiting ON jobs (company_id) WHERE state = 'waiting';
-- Running jobs: per-company concurrency caps, heartbeats, the rescuer.
CREATE INDEX jobs_processing ON jobs (company_id, lease_expires_at) WHERE state = 'processing';
-- Pruning finished rows.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('done', 'error_resolved');
-- Dead letters for operators. (Only the primary key is unconditional: every claim and
-- completion rewrites the row, and each unconditional index would be rewritten with it.)
CREATE INDEX jobs_dead ON jobs (created_at) WHERE state = 'error';
CREATE UNIQUE INDEX jobs_idempotency ON jobs (company_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Events to publish, written in the transaction that caused them and relayed to RabbitMQ's
-- tenantry.events exchange. One row holds the events of one transaction (a JSON array), so a
-- completion batch of 500 jobs writes one row, not 500.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    events       jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
