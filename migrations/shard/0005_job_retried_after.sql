-- phase: expand
-- How many attempts a job had made when an operator last sent it back to `waiting`
-- (`tenantry admin jobs retry`). A retry used to start the count again at 0, but the count is
-- also the lease token a completion is fenced by: a worker whose slot still ran an old attempt,
-- and which claimed the retried job again, took the same (worker, attempt) lease, and the old
-- run's outcome was accepted as the new one's. The count now goes on, and a retry grants as
-- many attempts as the job's first round had: `max_attempts - retried_after`. Adding a column
-- with a constant default rewrites nothing, so this is safe while old code runs.
ALTER TABLE jobs ADD COLUMN retried_after integer NOT NULL DEFAULT 0;
