#!/usr/bin/env bash
# PostgreSQL for the registry tests (and a local `database_url`): Debian's cluster, started when
# it is down, and a role `voicefoundry` (password `voicefoundry`) that may create databases.
# Installs Debian's `postgresql` package only where no cluster tooling exists. Safe to run again.
#   postgresql+psycopg://voicefoundry:voicefoundry@127.0.0.1:5432/DBNAME
set -euo pipefail

sudo=""
[[ "$(id -u)" -ne 0 ]] && sudo="sudo"

as_postgres() {
  if [[ "$(id -u)" -eq 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

if ! command -v pg_lsclusters >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no PostgreSQL and no apt-get: install PostgreSQL and create the voicefoundry role" >&2
    exit 1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql
fi

# The first cluster listed (Debian's package creates `<version> main`); one is made if none.
read -r version cluster port status _ < <(pg_lsclusters --no-header | head -n 1) || true
if [[ -z "${version:-}" ]]; then
  version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
  $sudo pg_createcluster "$version" main
  read -r version cluster port status _ < <(pg_lsclusters --no-header | head -n 1)
fi
if [[ "$status" != online* ]]; then
  $sudo pg_ctlcluster "$version" "$cluster" start
fi

for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$port" || {
  echo "error: PostgreSQL $version/$cluster is not accepting connections on 127.0.0.1:$port" >&2
  exit 1
}

exists="$(as_postgres psql -p "$port" -v ON_ERROR_STOP=1 -tAc \
  "SELECT 1 FROM pg_roles WHERE rolname = 'voicefoundry'")"
verb="CREATE"
[[ "$exists" == "1" ]] && verb="ALTER"
as_postgres psql -p "$port" -v ON_ERROR_STOP=1 -q -c \
  "$verb ROLE voicefoundry LOGIN CREATEDB PASSWORD 'voicefoundry'"
echo "PostgreSQL $version/$cluster on 127.0.0.1:$port; role voicefoundry (CREATEDB) ready"
