# shellcheck shell=bash
# The private PostgreSQL cluster of scripts/test and scripts/bench, sourced by both. The caller
# sets REPO and defines say() and die(). Then:
#   test_pg_up     reuse the cluster running from $PG_DATA, or start it (PG_STARTED=1); sets
#                  PG_PORT and exports GCA_TEST_DATABASE_URL (what tests/src/db.rs reads)
#   test_pg_down   if test_pg_up started it: drop the per-test databases and stop it (for the
#                  caller's EXIT trap)
# The cluster lives in target/test-pg (or /tmp/gca-test-pg-<uid> when the postgres user cannot
# reach the checkout), under the same lock as tests/src/db.rs takes.

: "${REPO:?set REPO to the checkout before sourcing scripts/lib/test-pg.sh}"

# ---------------------------------------------------------------------------------------------
# PostgreSQL (same layout and rules as gcs::embedded_pg: DIR/pgdata, DIR/postgres.log, superuser
# gca with SCRAM auth and its password in DIR/superuser.password (0600), TCP only on 127.0.0.1,
# run as the postgres user when we are root)
# ---------------------------------------------------------------------------------------------

find_pg_bin() {
    local d
    if [ -n "${GCA_PG_BIN_DIR:-}" ]; then
        [ -x "$GCA_PG_BIN_DIR/initdb" ] || die "GCA_PG_BIN_DIR=$GCA_PG_BIN_DIR has no initdb"
        echo "$GCA_PG_BIN_DIR"; return
    fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then echo "$d"; return; fi
    fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"; return
    fi
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
    die "PostgreSQL server programs not found (apt-get install postgresql, or set GCA_PG_BIN_DIR)"
}

PG_BIN="$(find_pg_bin)"
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
    id -u postgres >/dev/null 2>&1 || die "running as root but there is no postgres system user"
    AS_PG=(runuser -u postgres --)
fi
pg_as() { (cd / && "${AS_PG[@]}" "$@"); }

# The cluster directory: target/test-pg, unless the postgres user cannot reach target/.
PG_DIR="$REPO/target/test-pg"
mkdir -p "$REPO/target"
if [ "${#AS_PG[@]}" -gt 0 ] && ! pg_as test -x "$REPO/target"; then
    PG_DIR="/tmp/gca-test-pg-$(id -u)"
    say "the postgres user cannot reach $REPO/target; using $PG_DIR"
fi
PG_DATA="$PG_DIR/pgdata"
PG_LOG="$PG_DIR/postgres.log"
PG_PASSWORD_FILE="$PG_DIR/superuser.password"
mkdir -p "$PG_DIR"
if [ "${#AS_PG[@]}" -gt 0 ]; then chmod o+x "$PG_DIR"; fi

psql_at() { # PORT SQL...
    local port="$1"; shift
    PGPASSWORD="$(cat "$PG_PASSWORD_FILE" 2>/dev/null || true)" PGCONNECT_TIMEOUT=3 \
        "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$port" -U gca -d postgres "$@"
}

# The port of a server running from $PG_DATA that answers, or nothing.
running_port() {
    [ -f "$PG_DATA/postmaster.pid" ] || return 0
    local port dd
    port="$(sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null | tr -d '[:space:]')"
    [ -n "$port" ] || return 0
    dd="$(psql_at "$port" -c "select current_setting('data_directory')" 2>/dev/null || true)"
    if [ -n "$dd" ] && [ "$(readlink -f "$dd")" = "$(readlink -f "$PG_DATA")" ]; then echo "$port"; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

log_tail_since() { # OFFSET
    tail -c +"$(( $1 + 1 ))" "$PG_LOG" 2>/dev/null | tail -n 20 | sed 's/^/    /'
}

drop_test_databases() { # PORT
    psql_at "$1" -c "select format('DROP DATABASE IF EXISTS %I WITH (FORCE);', datname) \
        from pg_database where datname like 'gca\\_test\\_%'" | psql_at "$1" >/dev/null || true
}

init_cluster() {
    [ -f "$PG_DATA/PG_VERSION" ] && return 0
    mkdir -p "$PG_DATA"
    if [ "${#AS_PG[@]}" -gt 0 ]; then chown -R postgres: "$PG_DATA"; fi
    local locale out pwfile="$PG_DIR/.initdb-password"
    (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$PG_PASSWORD_FILE")
    (umask 077; cp "$PG_PASSWORD_FILE" "$pwfile")
    if [ "${#AS_PG[@]}" -gt 0 ]; then chown postgres: "$pwfile"; fi
    for locale in C.UTF-8 C; do
        if out="$(pg_as "$PG_BIN/initdb" -D "$PG_DATA" -U gca --auth=scram-sha-256 --pwfile="$pwfile" -E UTF8 --locale="$locale" 2>&1)"; then
            rm -f "$pwfile"
            say "created the test cluster in $PG_DATA"
            return 0
        fi
    done
    rm -f "$pwfile"
    printf '%s\n' "$out" >&2
    die "initdb -D $PG_DATA failed"
}

start_cluster() {
    init_cluster
    touch "$PG_LOG"
    if [ "${#AS_PG[@]}" -gt 0 ]; then chown postgres: "$PG_LOG"; fi
    local attempt port offset
    for attempt in 1 2 3 4 5; do
        port="$(free_port)"
        offset="$(stat -c %s "$PG_LOG")"
        # fsync off: a throwaway test cluster.
        if pg_as "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -o \
            "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
            >/dev/null; then
            local i
            for i in $(seq 1 100); do
                if psql_at "$port" -c 'select 1' >/dev/null 2>&1; then
                    PG_PORT="$port"
                    return 0
                fi
                sleep 0.1
            done
            log_tail_since "$offset" >&2
            die "PostgreSQL started from $PG_DATA but does not accept connections on 127.0.0.1:$port"
        fi
        if log_tail_since "$offset" | grep -qE 'could not bind|Address already in use'; then
            say "port $port taken, retrying"
            continue
        fi
        log_tail_since "$offset" >&2
        die "pg_ctl start -D $PG_DATA failed (log: $PG_LOG)"
    done
    die "could not find a free port for PostgreSQL after 5 attempts"
}

PG_STARTED=0
PG_PORT=""

test_pg_up() {
    # The same lock tests/src/db.rs takes, so that concurrent starters do not race.
    exec 9>"$PG_DIR.lock"
    flock 9
    if [ -f "$PG_DATA/PG_VERSION" ] && [ ! -s "$PG_PASSWORD_FILE" ]; then
        # Made before the cluster had a password (trust): a throwaway cluster, made again.
        say "the test cluster in $PG_DATA has no password; recreating it"
        pg_as "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 60 >/dev/null 2>&1 || true
        rm -rf "$PG_DATA"
    fi
    PG_PORT="$(running_port)"
    if [ -n "$PG_PORT" ]; then
        say "reusing the PostgreSQL cluster running from $PG_DATA on port $PG_PORT"
    else
        if [ -f "$PG_DATA/postmaster.pid" ] && pg_as "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1; then
            die "a PostgreSQL server runs from $PG_DATA but does not answer; stop it: ${AS_PG[*]} $PG_BIN/pg_ctl stop -D $PG_DATA"
        fi
        start_cluster
        PG_STARTED=1
        drop_test_databases "$PG_PORT" # left over by an interrupted run
        say "started PostgreSQL from $PG_DATA on 127.0.0.1:$PG_PORT"
    fi
    flock -u 9
    exec 9>&-
    GCA_TEST_DATABASE_URL="postgres://gca:$(cat "$PG_PASSWORD_FILE")@127.0.0.1:$PG_PORT/postgres"
    export GCA_TEST_DATABASE_URL
}

test_pg_down() {
    if [ "$PG_STARTED" -eq 1 ]; then
        drop_test_databases "$PG_PORT"
        if pg_as "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 60 >/dev/null; then
            say "stopped the test cluster"
        else
            say "warning: pg_ctl stop -D $PG_DATA failed"
        fi
        PG_STARTED=0
    fi
}
