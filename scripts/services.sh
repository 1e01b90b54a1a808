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
# The cluster that listens on port 5432 (Debian's clusters: version, name, status), if any:
# after an upgrade the newest version's cluster often sits on 5433 beside the old one.
cluster_5432() { pg_lsclusters -h 2>/dev/null | awk '$3 == 5432 {print $1, $2, $4; exit}'; }
clusters() { pg_lsclusters -h 2>/dev/null | awk '{printf "%s%s/%s on port %s (%s)", (NR > 1 ? ", " : ""), $1, $2, $3, $4}'; }

if pg_up; then
  say "PostgreSQL is running on 127.0.0.1:5432"
else
  installed=""
  if [[ -z $(clusters) ]]; then
    apt_install postgresql postgresql-client
    installed=1
  fi
  if [[ -n $installed && -z $(clusters) ]]; then
    # The package could not create its cluster, usually for a locale named in the environment
    # (or /etc/default/locale) that is not generated: create it with one that always exists.
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    say "the PostgreSQL package created no cluster (a locale that is not generated is the usual"
    say "cause): creating $version/main on port 5432 with locale C.UTF-8 (pg_createcluster)"
    need_root pg_createcluster --locale C.UTF-8 -p 5432 "$version" main >/dev/null
  fi
  read -r ver name status < <(cluster_5432) || true
  if [[ -z ${ver:-} ]]; then
    if [[ -z $(clusters) ]]; then
      say "PostgreSQL is installed but has no cluster: its package could not create one (a"
      say "locale named in /etc/default/locale that is not generated is the usual cause)."
      say "Create one on port 5432 (pg_createcluster --start -p 5432 <version> main), then run this again."
    else
      say "no PostgreSQL cluster uses port 5432 (found: $(clusters)). Set port = 5432 in the"
      say "postgresql.conf of the one to use (under /etc/postgresql/<version>/<name>), then run this again."
    fi
    exit 1
  fi
  if [[ -n $installed ]]; then
    hba=/etc/postgresql/$ver/$name/pg_hba.conf
    say "allowing local development logins: trust for 127.0.0.1 and ::1 in $hba"
    need_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  # Debian's package starts the cluster it creates (where it can), before the edit above.
  # (pg_lsclusters works for any user; pg_ctlcluster status wants the cluster's owner.)
  if [[ $status == online* ]]; then
    say "PostgreSQL $ver/$name is running: reloading it (pg_ctlcluster $ver $name reload)"
    need_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload
  else
    say "starting PostgreSQL $ver/$name (pg_ctlcluster $ver $name start)"
    need_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
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
# Tenantry's migrations need PostgreSQL 14 or later (an older distribution's package is older).
if command -v psql >/dev/null; then
  server=$(psql -h 127.0.0.1 -U postgres -d postgres -qAtXw -c 'SHOW server_version_num') || {
    say "could not ask PostgreSQL on 127.0.0.1:5432 for its version (see psql's message above)"
    exit 1
  }
  if [[ ! $server =~ ^[0-9]+$ ]] || ((server < 140000)); then
    say "PostgreSQL on 127.0.0.1:5432 is version $((server / 10000)); Tenantry needs 14 or later"
    say "(Debian 12 and Ubuntu 22.04 ship 15 and 14; older systems can use apt.postgresql.org)."
    exit 1
  fi
fi

# --- RabbitMQ ---
if amqp_up; then
  say "RabbitMQ is running on 127.0.0.1:5672"
else
  # /usr/sbin is not on a normal user's PATH on Debian.
  rabbit=$(command -v rabbitmq-server || echo /usr/sbin/rabbitmq-server)
  started=""
  if [[ ! -x $rabbit ]]; then
    apt_install rabbitmq-server
    # Where systemd runs, the package has started it already.
    for _ in $(seq 50); do amqp_up && { started=1; break; }; sleep 0.2; done
    [[ -n $started ]] && say "RabbitMQ was started by its package"
  fi
  if [[ -z $started ]]; then
    say "starting RabbitMQ (rabbitmq-server -detached)"
    need_root "$rabbit" -detached
    wait_for RabbitMQ amqp_up 60
  fi
fi
