#!/usr/bin/env bash
# services.sh — make sure PostgreSQL and RabbitMQ run on this machine, for `make run`,
# `make test` and CI. For each service it checks, starts it if installed but stopped, and
# installs it with apt if missing, saying what it does. Local development only: an installed
# PostgreSQL is configured to trust connections from 127.0.0.1 (user postgres, no password).
set -euo pipefail

say() { echo "services: $*" >&2; }
need_root() { [[ $(id -u) -eq 0 ]] && "$@" || sudo "$@"; }

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

wait_for() { # name check seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do "$2" && return 0; sleep 0.2; done
  say "$1 did not come up within $3 s"; return 1
}

apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || { say "apt-get not found: install $* yourself"; exit 1; }
  if [[ -z $apt_updated ]]; then say "running apt-get update"; need_root apt-get update -qq; apt_updated=1; fi
  say "installing $* with apt-get"
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
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
  say "starting PostgreSQL $ver (pg_ctlcluster $ver main start)"
  need_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_for PostgreSQL pg_up 30
fi

# --- RabbitMQ ---
if amqp_up; then
  say "RabbitMQ is running on 127.0.0.1:5672"
else
  if ! command -v rabbitmq-server >/dev/null; then
    apt_install rabbitmq-server
  fi
  say "starting RabbitMQ (rabbitmq-server -detached)"
  need_root rabbitmq-server -detached || true
  wait_for RabbitMQ amqp_up 60
fi
