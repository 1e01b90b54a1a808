#!/usr/bin/env bash
# run.sh — the local cluster, for `make run`: PostgreSQL and RabbitMQ (started or installed if
# needed), the catalog and two shard databases (created and migrated), shard-map/local.toml
# applied, then one gateway and two shard nodes, each a `tenantry serve` with a config from
# this folder. Ctrl-C stops everything it started. Running it again reuses what exists.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
LOGS=$ROOT/.local/logs
say() { echo "run: $*" >&2; }
source scripts/lib.sh

# The cheap checks first: no services are installed for a machine that cannot build.
need_rust
bash scripts/services.sh
command -v curl >/dev/null || apt_install curl

# A node left over from an earlier run would answer in place of the new one.
for port in 8080 8101 8102; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "port $port is already in use; stop what holds it first:"
    (ss -ltnp "sport = :$port" 2>/dev/null || true) | tail -n +2 >&2
    exit 1
  fi
done

say "building tenantry (cargo build --bin tenantry; the first build takes several minutes)"
cargo build --quiet --bin tenantry
BIN=$ROOT/target/debug/tenantry

# Admin commands read the catalog address from the gateway's config.
ADMIN=("$BIN" --dev --config deploy/local/gateway.toml admin)
say "migrating the catalog"
"${ADMIN[@]}" migrate up --create-databases
say "applying shard-map/local.toml"
"${ADMIN[@]}" shard apply shard-map/local.toml --create-databases

mkdir -p "$LOGS"
PIDS=()
# The nodes are signalled before anything is printed (a terminal that is gone makes `echo`
# fail), and a second Ctrl-C while they drain kills them rather than leave them running.
stop() {
  trap - EXIT
  trap 'kill -KILL "${PIDS[@]}" 2>/dev/null; exit 130' INT TERM HUP
  if ((${#PIDS[@]})); then
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    say "stopping the local cluster (Ctrl-C again to kill it at once)" || true
    wait "${PIDS[@]}" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 0' INT TERM HUP

# Each node runs in a session of its own, so Ctrl-C reaches only this script, which then stops
# the nodes with one SIGTERM each: a node that got Ctrl-C's SIGINT too would take the SIGTERM
# as a second signal and exit without draining.
start() { # name config
  setsid "$BIN" --dev --config "deploy/local/$2.toml" serve >"$LOGS/$1.log" 2>&1 &
  PIDS+=($!)
  say "started $1 (pid $!), log: .local/logs/$1.log"
}
start gateway gateway
start shard-1 shard-1
start shard-2 shard-2

ready() { # name url
  for _ in $(seq 150); do
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { say "a process exited during startup; last lines of the logs:"; tail -n 5 "$LOGS"/*.log >&2; exit 1; }
    done
    curl -fsS --max-time 2 -o /dev/null "$2/readyz" 2>/dev/null && return 0
    sleep 0.2
  done
  say "$1 not ready after 30 s; see .local/logs/$1.log"; exit 1
}
ready gateway http://127.0.0.1:8080
ready shard-1 http://127.0.0.1:8101
ready shard-2 http://127.0.0.1:8102

# A fixed demo company, so the example calls below can be pasted again after a restart
# (creating it a second time answers 200 with the same company).
COMPANY=01900000-0000-7000-8000-00000000d3e0
TOKEN=$("$BIN" --dev admin token --user dev-operator --company "$COMPANY:admin" \
  --scope "companies:create shardmap:read" --ttl 12h)
cat <<MSG

Tenantry is running:
  gateway  http://127.0.0.1:8080   (logs: .local/logs/gateway.log)
  shard-1  http://127.0.0.1:8101   (api; logs: .local/logs/shard-1.log)
  shard-2  http://127.0.0.1:8102   (api; logs: .local/logs/shard-2.log)

A development token (valid 12 h, signed with the public dev key):
  export TOKEN=$TOKEN

Try (through the gateway):
  # create the demo company (201; 200 when it already exists)
  curl -s -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
    -d '{"id":"$COMPANY","name":"Demo Company"}' http://127.0.0.1:8080/v1/companies
  # run a job on its shard (200 with the result within 3 s, else 202 + Location)
  curl -s -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
    -d '{"kind":"echo","params":{"hello":"world"}}' \\
    http://127.0.0.1:8080/v1/companies/$COMPANY/jobs
  # the shard map the gateways route by
  curl -s -H "Authorization: Bearer \$TOKEN" http://127.0.0.1:8080/v1/shard-map/version

Ctrl-C stops the cluster.
MSG

# If any node dies, stop the others too: a half cluster only confuses.
wait -n "${PIDS[@]}" || true
say "a process exited; see .local/logs"
exit 1
