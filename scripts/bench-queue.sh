#!/usr/bin/env bash
# bench-queue.sh — `make bench-queue`: Tenantry's queue and graphile-worker, measured in the
# same run against the same PostgreSQL on this machine, printed side by side with ratios.
#
#   scripts/bench-queue.sh [ADMIN_DSN]     (default postgres://postgres@127.0.0.1:5432/postgres)
#
# Env: REPS=3 rounds (interleaved: tenantry, graphile, tenantry, graphile, …; medians shown,
# then each round's figures: a batched round lasts well under a second, so one round's verdict
# is mostly the machine's mood),
# and N, C, LAT_N, LAT_WARMUP, passed to both (see the header of each for its method).
# Tenantry's method mirrors ../shared/bench/peers/graphile-worker-bench.sh; read
# crates/queue/examples/queue_bench.rs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DSN=${1:-postgres://postgres@127.0.0.1:5432/postgres}
REPS=${REPS:-3}
PEERS=${PEERS:-$ROOT/../shared/bench/peers}
[[ -x $PEERS/graphile-worker-bench.sh ]] || { echo "bench-queue: $PEERS/graphile-worker-bench.sh not found" >&2; exit 1; }

bash "$ROOT/scripts/services.sh"
# The side-by-side table is computed by a few lines of Python.
if ! command -v python3 >/dev/null; then
  say() { echo "bench-queue: $*" >&2; }
  source "$ROOT/scripts/lib.sh"
  apt_install python3
fi
echo "bench-queue: building the benchmark (release)" >&2
cargo build --quiet --release --example queue_bench -p tenantry-queue
BIN=$ROOT/target/release/examples/queue_bench
OUT=$(mktemp -d /tmp/bench-queue.XXXXXX)
# A round stopped by Ctrl-C cannot drop its databases itself: drop whatever tqbench_* is left.
cleanup() {
  rm -rf "$OUT"
  psql "$DSN" -qAtX -c "SELECT datname FROM pg_database WHERE datname LIKE 'tqbench\_%'" 2>/dev/null |
    while read -r db; do psql "$DSN" -qX -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for r in $(seq "$REPS"); do
  echo "bench-queue: round $r/$REPS: tenantry" >&2
  "$BIN" "$DSN" >"$OUT/tenantry.$r"
  echo "bench-queue: round $r/$REPS: graphile-worker" >&2
  "$PEERS/graphile-worker-bench.sh" "$DSN" >"$OUT/graphile.$r"
done

python3 - "$OUT" "$REPS" <<'PY'
import re, statistics, sys
out, reps = sys.argv[1], int(sys.argv[2])
line = re.compile(r'^([a-z_0-9]+): (-?[0-9.]+) (\S+)$')
def figures(name):
    figs = {}
    for r in range(1, reps + 1):
        for l in open(f'{out}/{name}.{r}'):
            m = line.match(l.strip())
            if m:
                figs.setdefault(m[1], (m[3], []))[1].append(float(m[2]))
    return figs
rounds = {'tenantry': figures('tenantry'), 'graphile': figures('graphile')}
t, g = ({k: (u, statistics.median(v)) for k, (u, v) in f.items()} for f in rounds.values())
targets = {'throughput': ('≥ 1.5× peer', lambda a, b: a >= 1.5 * b),
           'throughput_batched': ('≥ 2× peer', lambda a, b: a >= 2 * b),
           'latency_p50': ('≤ 1 ms', lambda a, b: a <= 1.0),
           'latency_p99': ('≤ 5 ms', lambda a, b: a <= 5.0)}
print(f"{'figure':<20} {'tenantry':>14} {'graphile-worker':>16} {'ratio':>7}  target")
for k in ['enqueue_bulk', 'throughput', 'throughput_batched', 'latency_p50', 'latency_p99']:
    if k not in t or k not in g:
        continue
    (unit, a), (_, b) = t[k], g[k]
    ratio = a / b if b else float('nan')
    goal, ok = targets.get(k, ('', None))
    verdict = '' if ok is None else (' met' if ok(a, b) else ' MISSED')
    print(f"{k:<20} {a:>10.2f} {unit:<4}{b:>12.2f} {unit:<4}{ratio:>6.2f}×  {goal}{verdict}")
if reps > 1:
    print("\nrounds (in order; ratio = tenantry / graphile-worker of the same round):")
    for k in ['throughput', 'throughput_batched', 'latency_p50', 'latency_p99']:
        if k not in t or k not in g:
            continue
        a, b = rounds['tenantry'][k][1], rounds['graphile'][k][1]
        pairs = ', '.join(f"{x:.{2 if x < 100 else 0}f}/{y:.{2 if y < 100 else 0}f} ({x / y:.2f}×)"
                          for x, y in zip(a, b) if y)
        print(f"{k:<20} {pairs}")
PY
