#!/usr/bin/env bash
# queue-completion-model.sh — what a batched completion, and a job's whole way from `waiting`
# to `done`, cost the server per job, for the ways a queue can record them. It backs the "What
# bounds each figure" part of crates/queue/README.md (Performance): why batched throughput
# stays near 1.5× graphile-worker's, and which row layout could lift it.
#
#   scripts/queue-completion-model.sh [ADMIN_DSN]   (default postgres://postgres@127.0.0.1:5432/postgres)
#
# Env: N=200000 rows per variant, ROUNDS=3 (each round runs every variant once, in a different
# order each round, so a slow phase of the machine does not favour one variant), VARIANTS (a
# space-separated subset of the names below; all by default).
#
# It creates the scratch database queue_model_<pid> from ADMIN_DSN, applies migrations/shard,
# and drops it at the end. Each variant fills its table with N rows (ids in creation order, as
# UUID v7 are), checkpoints, and then works through all of them from a PL/pgSQL loop in batches
# of 500 with a COMMIT after each statement, as the worker's claimer and completer do.
#
# Completion variants start from N rows that a worker holds (`processing`) and complete them:
#   in_place_events   the queue's completion (store::FINISH_SQL): the row becomes `done` in
#                     place, and the batch's job.finished events go to one outbox row
#   in_place          the same without the events
#   moved_events      the row is deleted from the live table and inserted into a table of
#                     finished rows (what list-partitioning `jobs` by state would do), with events
#   deleted           the row is deleted and nothing is kept (graphile-worker's completion)
# Lifecycle variants start from N `waiting` rows; each batch is claimed (one statement) and then
# completed with its events (another):
#   life_in_place     the queue's claim (store's uncapped claim) and completion: every state
#                     change writes a new row version and new index entries (the partial
#                     indexes over `state` rule out PostgreSQL's heap-only-tuple updates)
#   life_hot_leases   a row that no index looks at the state of, updated in place as a
#                     heap-only tuple (fill factor 50; the run fails if fewer than 80 % of its
#                     updates were), with a table of claimable ids the claim deletes from and a
#                     table of leases (indexed by company and expiry, for the rescuer and the
#                     per-company cap) the claim inserts into and the completion deletes from
#   life_hot_batch_leases  the same with one lease row per claimed batch (its job ids and
#                     attempts as arrays) instead of one per job, which the completion deletes;
#                     a lower bound, as here every completion batch is exactly one claim batch
#   life_hot_no_leases  the same without any lease rows: the floor of that design, not a
#                     queue (nothing could find a dead worker's jobs or count a company's)
# Output: "variant: µs per row" for each run, then the median per variant.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DSN=${1:-postgres://postgres@127.0.0.1:5432/postgres}
N=${N:-200000} ROUNDS=${ROUNDS:-3}
all_variants=(in_place_events in_place moved_events deleted
              life_in_place life_hot_leases life_hot_batch_leases life_hot_no_leases)
read -r -a variants <<< "${VARIANTS:-${all_variants[*]}}"
for v in "${variants[@]}"; do
  [[ " ${all_variants[*]} " == *" $v "* ]] ||
    { echo "queue-completion-model: unknown variant '$v' (variants: ${all_variants[*]})" >&2; exit 2; }
done
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
-- A job table whose rows can be updated as heap-only tuples: no index over a column a claim or
-- a completion changes, and room on each page for the new versions.
CREATE TABLE jobs_hot (LIKE jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS) WITH (fillfactor = 50);
ALTER TABLE jobs_hot ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX ON jobs_hot (company_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE job_ready (id uuid PRIMARY KEY, company_id uuid NOT NULL, priority bigint NOT NULL,
                        run_at timestamptz NOT NULL);
CREATE INDEX ON job_ready (priority);
CREATE INDEX ON job_ready (company_id);
CREATE TABLE job_leases (id uuid PRIMARY KEY, company_id uuid NOT NULL, worker_id text NOT NULL,
                         attempt int NOT NULL, lease_expires_at timestamptz NOT NULL);
CREATE INDEX ON job_leases (company_id, lease_expires_at);
CREATE TABLE job_claims (first_id uuid PRIMARY KEY, worker_id text NOT NULL, job_ids uuid[] NOT NULL,
                         attempts int[] NOT NULL, lease_expires_at timestamptz NOT NULL);
CREATE INDEX ON job_claims (lease_expires_at);
SQL

fill() { # table state
  local held="'w', 1, now() + interval '1 hour', now()"
  [[ $2 == waiting ]] && held="NULL, 0, NULL, NULL"
  "${PSQL[@]}" "$DB_DSN" <<SQL
TRUNCATE jobs, jobs_live, jobs_finished_rows, jobs_hot, job_ready, job_leases, job_claims, outbox;
INSERT INTO $1 (id, request_id, company_id, kind, params, state, worker_id, attempts,
                lease_expires_at, started_at, priority)
SELECT ('01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'r' || g,
       ('00000000-0000-0000-0000-' || lpad(to_hex(g % 50), 12, '0'))::uuid, 'noop', '{}',
       '$2', $held, g
  FROM generate_series(1, $N) g;
INSERT INTO job_ready SELECT id, company_id, priority, run_at FROM jobs_hot;
VACUUM ANALYZE jobs; VACUUM ANALYZE jobs_live; VACUUM ANALYZE jobs_finished_rows;
VACUUM ANALYZE jobs_hot; VACUUM ANALYZE job_ready; VACUUM ANALYZE job_leases; VACUUM ANALYZE job_claims;
DO \$\$ BEGIN PERFORM pg_stat_reset_single_table_counters('jobs_hot'::regclass); END \$\$;
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

# The claim takes a batch and records what the completion is fenced by in ids and att.
CLAIM_IN_PLACE="WITH candidate AS (
         SELECT j.id FROM jobs j WHERE j.state = 'waiting' AND j.run_at <= now()
          ORDER BY j.priority LIMIT 500 FOR UPDATE OF j SKIP LOCKED
     ), claimed AS (
         UPDATE jobs j SET state = 'processing', worker_id = 'w', attempts = j.attempts + 1,
                started_at = now(), lease_expires_at = now() + interval '1 hour', updated_at = now()
           FROM candidate WHERE j.id = candidate.id
         RETURNING j.id, j.attempts)
     SELECT array_agg(id), array_agg(attempts) INTO ids, att FROM claimed"
CLAIM_HOT="WITH candidate AS (
         SELECT r.id FROM job_ready r WHERE r.run_at <= now()
          ORDER BY r.priority LIMIT 500 FOR UPDATE OF r SKIP LOCKED
     ), taken AS (
         DELETE FROM job_ready r USING candidate WHERE r.id = candidate.id RETURNING r.id
     ), claimed AS (
         UPDATE jobs_hot j SET state = 'processing', worker_id = 'w', attempts = j.attempts + 1,
                started_at = now(), lease_expires_at = now() + interval '1 hour', updated_at = now()
           FROM taken WHERE j.id = taken.id
         RETURNING j.id, j.attempts, j.company_id, j.lease_expires_at)"
LEASES="leased AS (INSERT INTO job_leases SELECT id, company_id, 'w', attempts, lease_expires_at FROM claimed)"
BATCH_LEASE="leased AS (INSERT INTO job_claims
    SELECT (array_agg(id ORDER BY id))[1], 'w', array_agg(id ORDER BY id), array_agg(attempts ORDER BY id),
           min(lease_expires_at)
      FROM claimed HAVING count(*) > 0)"
CLAIMED_INTO="SELECT array_agg(id ORDER BY id), array_agg(attempts ORDER BY id) INTO ids, att FROM claimed"
HOT_DONE="UPDATE jobs_hot j SET state = 'done', result = '{}'::jsonb, error = NULL, finished_at = now(),
           worker_id = NULL, lease_expires_at = NULL, updated_at = now()"
HOT_RETURNING="RETURNING j.id, j.state, j.company_id, j.kind, j.request_id, j.finished_at,
              j.awaited_until > now() AS awaited"
FINISH_HOT_LEASES="released AS (
    DELETE FROM job_leases l USING input i
     WHERE l.id = i.id AND l.worker_id = 'w' AND l.attempt = i.attempt RETURNING l.id
), updated AS ($HOT_DONE FROM released i WHERE j.id = i.id $HOT_RETURNING)"
FINISH_HOT_NO_LEASES="updated AS ($HOT_DONE FROM input i
     WHERE j.id = i.id AND j.worker_id = 'w' AND j.attempts = i.attempt $HOT_RETURNING)"
FINISH_HOT_BATCH_LEASES="released AS (DELETE FROM job_claims WHERE first_id = ids[1]), $FINISH_HOT_NO_LEASES"

# Runs one variant. With a claim, the rows start `waiting`, and each batch is claimed and then
# completed; without one, they start `processing`, and each batch of ids is completed.
run() { # name table completion [claim]
  local claim=${4:-} fetch="SELECT array_agg(id), array_agg(1) INTO ids, att FROM batches WHERE batches.k = b;"
  local state=processing batches="CREATE TEMP TABLE batches AS
SELECT (row_number() OVER () - 1) / 500 AS k, id FROM $2;
CREATE INDEX ON batches (k);
ANALYZE batches;"
  if [[ -n $claim ]]; then state=waiting fetch="$claim; COMMIT;" batches=""; fi
  fill "$2" "$state"
  "${PSQL[@]}" "$DB_DSN" <<SQL 2>&1 | sed -n 's/^NOTICE:  //p; /^ERROR/p' | tee -a "$OUT"
$batches
DO \$\$
DECLARE ids uuid[]; att int4[]; t0 timestamptz := clock_timestamp(); b int := 0; n bigint; total bigint := 0;
BEGIN
  LOOP
    $fetch
    EXIT WHEN ids IS NULL;
    b := b + 1;
    WITH input AS (SELECT * FROM unnest(ids, att) AS x(id, attempt)), $3;
    total := total + n;
    COMMIT;
  END LOOP;
  IF total <> $N OR EXISTS (SELECT 1 FROM $2 WHERE worker_id = 'w' OR state <> 'done') THEN
    RAISE EXCEPTION '$1 completed % of $N rows', total;
  END IF;
  RAISE NOTICE '$1: % µs per row',
    round((extract(epoch FROM clock_timestamp() - t0) * 1e6 / $N)::numeric, 1);
END \$\$;
SELECT pg_stat_force_next_flush();
SQL
  if [[ $2 == jobs_hot ]]; then # the design only means something if its updates are heap-only
    "${PSQL[@]}" "$DB_DSN" <<SQL 2>&1 | sed -n 's/^NOTICE:  //p; /^ERROR/p' | tee -a "$OUT"
DO \$\$ DECLARE u bigint; h bigint; BEGIN
  SELECT n_tup_upd, n_tup_hot_upd INTO u, h FROM pg_stat_user_tables WHERE relname = 'jobs_hot';
  IF h < u * 0.8 THEN RAISE EXCEPTION '$1: only % of % updates were heap-only', h, u; END IF;
  RAISE NOTICE '$1: % of % updates heap-only', h, u;
END \$\$;
SQL
  fi
}

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
      life_in_place) run "$v" jobs "$IN_PLACE, $EVENTS SELECT count(*) INTO n FROM updated" \
        "$CLAIM_IN_PLACE" ;;
      life_hot_leases) run "$v" jobs_hot "$FINISH_HOT_LEASES, $EVENTS SELECT count(*) INTO n FROM updated" \
        "$CLAIM_HOT, $LEASES $CLAIMED_INTO" ;;
      life_hot_batch_leases) run "$v" jobs_hot "$FINISH_HOT_BATCH_LEASES, $EVENTS SELECT count(*) INTO n FROM updated" \
        "$CLAIM_HOT, $BATCH_LEASE $CLAIMED_INTO" ;;
      life_hot_no_leases) run "$v" jobs_hot "$FINISH_HOT_NO_LEASES, $EVENTS SELECT count(*) INTO n FROM updated" \
        "$CLAIM_HOT $CLAIMED_INTO" ;;
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
    print(f"  {name:22} {statistics.median(xs):6.1f}")
PY
