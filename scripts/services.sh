#!/usr/bin/env bash
# services.sh — make sure PostgreSQL and RabbitMQ run on this machine, for `make run`,
# `make test` and CI. For each service it checks, starts it if installed but stopped, and
# installs it with apt if missing, saying what it does. Local development only: an installed
# PostgreSQL is configured to trust connections from 127.0.0.1 (user postgres, no password).
set -euo pipefail

say() { echo "services: $*" >&2; }
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Accepting connections (pg_isready: not while starting up, recovering or shutting down); a bare
# TCP check only where the client tools are not installed.
pg_up() {
  if command -v pg_isready >/dev/null; then pg_isready -q -h 127.0.0.1 -p 5432; else (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; fi
}
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

wait_for() { # name check seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do "$2" && return 0; sleep 0.2; done
  say "$1 did not come up within $3 s"; return 1
}

# --- PostgreSQL ---
if pg_up; then
  say "PostgreSQL is running on 127.0.0.1:5432"
else
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql postgresql-client
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    say "allowing local development logins: trust for 127.0.0.1 and ::1 in $hba"
    need_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  # Debian's package starts the cluster it creates (where it can), before the edit above.
  # (pg_lsclusters works for any user; pg_ctlcluster status wants the cluster's owner.)
  if [[ $(pg_lsclusters -h 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" {print $4}') == online ]]; then
    say "PostgreSQL $ver is running: reloading it (pg_ctlcluster $ver main reload)"
    need_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
  else
    say "starting PostgreSQL $ver (pg_ctlcluster $ver main start)"
    need_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  fi
  wait_for PostgreSQL pg_up 30
fi
# Everything here connects as postgres without a password.
if command -v psql >/dev/null && ! psql -h 127.0.0.1 -U postgres -d postgres -qAtXw -c 'SELECT 1' >/dev/null 2>&1; then
  say "PostgreSQL on 127.0.0.1:5432 refuses user postgres without a password. For local"
  say "development, set the method of the 'host all all 127.0.0.1/32' line in pg_hba.conf"
  say "(psql -c 'SHOW hba_file' as postgres tells where it is) to trust, then reload PostgreSQL."
  exit 1
fi

# --- RabbitMQ ---
if amqp_up; then
  say "RabbitMQ is running on 127.0.0.1:5672"
else
  # /usr/sbin is not on a normal user's PATH on Debian.
  rabbit=$(command -v rabbitmq-server || echo /usr/sbin/rabbitmq-server)
  if [[ ! -x $rabbit ]]; then
    apt_install rabbitmq-server
  fi
  say "starting RabbitMQ (rabbitmq-server -detached)"
  need_root "$rabbit" -detached
  wait_for RabbitMQ amqp_up 60
fi
