# Sourced by .ci/run: make sure a PostgreSQL server answers on 127.0.0.1:5432 with a `test`
# database, so the PostgreSQL half of the suite never skips in CI. On the CI machines one is
# normally running already; otherwise start it, and if it is not installed, install it (Debian).
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }
if ! pg_up; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "installing PostgreSQL (Debian package)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up || { echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
if [ -z "${EXCHANGE_TEST_POSTGRES_DSN:-}" ]; then
  if psql -h 127.0.0.1 -U postgres -d test -c 'SELECT 1' >/dev/null 2>&1; then
    export EXCHANGE_TEST_POSTGRES_DSN="postgresql://postgres@127.0.0.1:5432/test"
  else
    # A fresh Debian install asks for passwords over TCP: give the test role one, locally.
    su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'exchange-ci'\"" >/dev/null
    su postgres -c "createdb test" 2>/dev/null || true
    export EXCHANGE_TEST_POSTGRES_DSN="postgresql://postgres:exchange-ci@127.0.0.1:5432/test"
  fi
fi
