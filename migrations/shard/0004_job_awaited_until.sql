-- phase: expand
-- Until when a request may be waiting for the job to finish (an API's synchronous answer or a
-- long poll). A completion notifies waiters only while this lies ahead: a finished
-- notification goes to every API process of the shard, and one nobody waits for was a third
-- of a statement per job. Rows written by versions that do not set it get 'infinity', so their
-- completions are always announced, as before. Adding a column with a constant default
-- rewrites nothing, so this is safe while old code runs.
ALTER TABLE jobs ADD COLUMN awaited_until timestamptz NOT NULL DEFAULT 'infinity';
