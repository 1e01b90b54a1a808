#!/usr/bin/env bash
# queue-completion-model.sh — what a batched completion costs the server per job, for the ways
# a queue can record an outcome. It backs the "What bounds each figure" part of
# crates/queue/README.md (Performance): why batched throughput stays near 1.5× graphile-worker's.
#
#   scripts/queue-completion-model.sh [ADMIN_DSN]   (default postgres://postgres@127.0.0.1:5432/postgres)
#
# Env: N=200000 processing rows per variant, ROUNDS=3 (each round runs every variant once, in
# a different order each round, so a slow phase of the machine does not favour one variant).
#
# It creates the scratch database queue_model_<pid> from ADMIN_DSN, applies migrations/shard,
# and drops it at the end. For each variant it fills `jobs` with N rows that a worker holds
# (`processing`; ids in creation order, as UUID v7 are), checkpoints, and then completes all
# of them from a PL/pgSQL loop in batches of 500 with a COMMIT after each batch, as the
# worker's completer does. The variants:
#   in_place_events   the queue's completion (store::FINISH_SQL): the row becomes `done` in
#                     place, and the batch's job.finished events go to one outbox row
#   in_place          the same without the events
#   moved_events      the row is deleted from the live table and inserted into a table of
#                     finished rows (what list-partitioning `jobs` by state would do), with events
#   deleted           the row is deleted and nothing is kept (graphile-worker's completion)
# Output: "variant: µs per row" for each run, then the median per variant.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DSN=${1:-postgres://postgres@127.0.0.1:5432/postgres}
N=${N:-200000} ROUNDS=${ROUNDS:-3}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "queue-completion-model: N must be a positive integer, got '$N'" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "queue-completion-model: ROUNDS must be a positive integer, got '$ROUNDS'" >&2; exit 2; }
DB=queue_model_$$
PSQL=(psql -qX -v ON_ERROR_STOP=1)
DB_DSN=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$DSN" "$DB")
OUT=$(mktemp)
trap '"${PSQL[@]}" "$DSN" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; rm -f "$OUT"' EXIT

"${PSQL[@]}" "$DSN" -c "CREATE DATABASE $DB"
for f in "$ROOT"/migrations/shard/*.sql; do "${PSQL[@]}" "$DB_DSN" -f "$f" >/dev/null; done
"${PSQL[@]}" "$DB_DSN" <<'SQL'
-- The live table of a partitioned queue has no index over finished rows; the finished table
-- has only those (and its primary key).
CREATE TABLE jobs_live (LIKE jobs INCLUDING ALL);
DROP INDEX jobs_live_finished_at_idx, jobs_live_created_at_idx;
CREATE TABLE jobs_finished_rows (LIKE jobs INCLUDING DEFAULTS);
ALTER TABLE jobs_finished_rows ADD PRIMARY KEY (id);
CREATE INDEX ON jobs_finished_rows (finished_at) WHERE state IN ('done', 'error_resolved');
CREATE INDEX ON jobs_finished_rows (created_at) WHERE state = 'error';
SQL

fill() { # table
  "${PSQL[@]}" "$DB_DSN" <<SQL
TRUNCATE jobs, jobs_live, jobs_finished_rows, outbox;
INSERT INTO $1 (id, request_id, company_id, kind, params, state, worker_id, attempts, priority,
                lease_expires_at, started_at)
SELECT ('01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'r' || g, '00000000-0000-0000-0000-000000000001', 'noop', '{}',
       'processing', 'w', 1, g, now() + interval '1 hour', now()
  FROM generate_series(1, $N) g;
VACUUM ANALYZE jobs; VACUUM ANALYZE jobs_live; VACUUM ANALYZE jobs_finished_rows;
CHECKPOINT;
SQL
}

EVENTS="events AS (
    INSERT INTO outbox (events)
    SELECT jsonb_agg(e) FROM (
        SELECT 'job.finished' AS type, company_id, id AS job_id, kind AS job_kind, state,
               request_id, finished_at
          FROM updated WHERE state IN ('done', 'error')) e
    HAVING count(*) > 0)"
IN_PLACE="updated AS (
    UPDATE jobs j SET state = 'done', result = '{}'::jsonb, error = NULL, finished_at = now(),
           worker_id = NULL, lease_expires_at = NULL, updated_at = now()
      FROM input i WHERE j.id = i.id AND j.worker_id = 'w' AND j.attempts = i.attempt
    RETURNING j.id, j.state, j.company_id, j.kind, j.request_id, j.finished_at,
              j.awaited_until > now() AS awaited)"
MOVED="moved AS (
    DELETE FROM jobs_live j USING input i
     WHERE j.id = i.id AND j.worker_id = 'w' AND j.attempts = i.attempt
    RETURNING j.*
), updated AS (
    INSERT INTO jobs_finished_rows
    SELECT id, request_id, company_id, user_context, kind, params, 'done', worker_id, attempts,
           max_attempts, run_at, priority, NULL, '{}'::jsonb, NULL, idempotency_key,
           resolution_note, created_at, started_at, now(), now(), awaited_until, retried_after
      FROM moved
    RETURNING id, state, company_id, kind, request_id, finished_at,
              awaited_until > now() AS awaited)"

run() { # name table statement
  fill "$2"
  "${PSQL[@]}" "$DB_DSN" <<SQL 2>&1 | sed -n 's/^NOTICE:  //p; /^ERROR/p' | tee -a "$OUT"
CREATE TEMP TABLE batches AS
SELECT (row_number() OVER () - 1) / 500 AS k, id FROM $2;
CREATE INDEX ON batches (k);
ANALYZE batches;
DO \$\$
DECLARE ids uuid[]; att int4[]; t0 timestamptz := clock_timestamp(); b int := 0; n bigint; total bigint := 0;
BEGIN
  LOOP
    SELECT array_agg(id), array_agg(1) INTO ids, att FROM batches WHERE batches.k = b;
    EXIT WHEN ids IS NULL;
    b := b + 1;
    WITH input AS (SELECT * FROM unnest(ids, att) AS x(id, attempt)), $3;
    total := total + n;
    COMMIT;
  END LOOP;
  IF total <> $N OR EXISTS (SELECT 1 FROM $2 WHERE worker_id = 'w') THEN
    RAISE EXCEPTION '$1 completed % of $N rows', total;
  END IF;
  RAISE NOTICE '$1: % µs per row',
    round((extract(epoch FROM clock_timestamp() - t0) * 1e6 / $N)::numeric, 1);
END \$\$;
SQL
}

variants=(in_place_events in_place moved_events deleted)
for r in $(seq "$ROUNDS"); do
  for i in "${!variants[@]}"; do
    v=${variants[$(((i + r - 1) % ${#variants[@]}))]}
    case $v in
      in_place_events) run "$v" jobs "$IN_PLACE, $EVENTS SELECT count(*) INTO n FROM updated" ;;
      in_place) run "$v" jobs "$IN_PLACE SELECT count(*) INTO n FROM updated" ;;
      moved_events) run "$v" jobs_live "$MOVED, $EVENTS SELECT count(*) INTO n FROM updated" ;;
      deleted) run "$v" jobs "x AS (DELETE FROM jobs j USING input i
          WHERE j.id = i.id AND j.worker_id = 'w' AND j.attempts = i.attempt RETURNING 1)
          SELECT count(*) INTO n FROM x" ;;
    esac
  done
done

echo "median µs per row over $ROUNDS round(s), N=$N:"
python3 - "$OUT" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r'^(\w+): ([0-9.]+) µs per row$', line.strip())
    if m:
        runs.setdefault(m[1], []).append(float(m[2]))
for name, xs in runs.items():
    print(f"  {name:16} {statistics.median(xs):6.1f}")
PY
