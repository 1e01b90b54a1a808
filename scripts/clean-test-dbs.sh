#!/usr/bin/env bash
# clean-test-dbs.sh — `make clean-test-dbs`: drops the scratch databases that a killed test or
# benchmark run left behind on the test server ($TEST_PG_URL, as the test harness uses it;
# default postgres://postgres@127.0.0.1:5432/postgres): the tests' tenantry_t_*, their template
# databases tenantry_tpl_* (the next `make test` builds them again), the queue benchmark's
# tqbench_*, scripts/queue-completion-model.sh's queue_model_* and graphile-worker's gwbench_*.
set -euo pipefail
URL=${TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PSQL=(psql "$URL" -qAtX -v ON_ERROR_STOP=1)
dbs=$("${PSQL[@]}" -c "SELECT datname FROM pg_database
  WHERE datname ~ '^(tenantry_t_|tenantry_tpl_|tqbench_|queue_model_|gwbench_)[a-z0-9_]+$'")
failed=0
for db in $dbs; do
  # A template cannot be dropped until it stops being one.
  if "${PSQL[@]}" -c "ALTER DATABASE $db WITH IS_TEMPLATE false" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"; then
    echo "dropped $db"
  else
    echo "could not drop $db" >&2; failed=1
  fi
done
[[ -n $dbs ]] || echo "no test databases to drop"
exit "$failed"
