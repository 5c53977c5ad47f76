#!/usr/bin/env bash
# User-space instructions per pgbench transaction, counted with callgrind:
# a repeatable number where TPS on a shared 2-core machine is not.
#
#   bench/callgrind.sh                                 # shardgate, select-only, 3 protocols
#   TARGET=pgbouncer PROTOCOLS="simple extended" bench/callgrind.sh
#   WORKLOAD=tpcb-like PROTOCOLS=simple bench/callgrind.sh
#
# Method: the proxy runs under `valgrind --tool=callgrind` (its own
# process, on its own ports), pooling the local topology's s0 primary. For
# each protocol: a warm-up run, then counters zeroed, a run of SHORT
# transactions per client, a dump; counters zeroed, a run of LONG
# transactions per client, a dump. Both runs connect and authenticate the
# same clients (PgBouncer derives a SCRAM key per login, far more work than
# the transactions), so the difference divided by CLIENTS * (LONG - SHORT)
# is the count per transaction. shardgate runs with `-c
# shardgate.target=primary` (pooling only, as bench/pgbench.sh's
# shardgate-primary) and `[health] probe_interval = "1h"`: under valgrind
# a probe can outlast `probe_timeout`, and the next one logs in again (a
# SCRAM login, millions of instructions, lands in the count). Pinned to the
# primary, the proxy needs no probe after the first. With ROUTING=default
# the interval is "5s": replica reads need probes.
#
# Needs the topology of `shardgate up --home $SHARDGATE_HOME` running, with
# pgbench tables in s0 (`pgbench -i -s 10 -h 127.0.0.1 -p 16000 -U app
# app`), valgrind, and pgbouncer for TARGET=pgbouncer. Run as root (the
# PgBouncer copy runs as the postgres user).
#
# Environment (defaults in brackets):
#   TARGET          shardgate or pgbouncer [shardgate]
#   ROUTING         shardgate only: primary (every statement pinned to s0's
#                   primary with -c shardgate.target=primary, pooling as
#                   PgBouncer does) or default (reads on s0's replicas)
#                   [primary]. With default, the warm-up is LONG
#                   transactions per client, and the two counted runs are
#                   repeated (up to 4 times) until no server connection
#                   was opened during them: each is a SCRAM login, about
#                   11 million instructions. The table's last column says
#                   how many the kept attempt opened (not 0: no
#                   per-transaction count).
#   WORKLOAD        select-only or tpcb-like [select-only]
#   PROTOCOLS       pgbench -M values [simple extended prepared]
#   CLIENTS         pgbench -c [4]
#   SHORT, LONG     transactions per client of the two counted runs [500, 2500]
#   SHARDGATE       proxy binary [target/release/shardgate]
#   SHARDGATE_HOME  topology home [/tmp/shardgate]
#   BASE_PORT       the topology's first Postgres port (s0's primary) [16000]
#   PORT            the measured proxy's port [6532]
#   OUT             directory for callgrind files and logs [/tmp/sg-callgrind]
#   CACHE           1: simulate the caches too (valgrind --cache-sim=yes,
#                   this machine's L1 sizes) and add L1 instruction and
#                   data misses per transaction to the table [0]
#   SPLIT           1: after each protocol's row, its instructions per
#                   transaction by kind of work (event loop, protocol
#                   handling, classification, pooling, ...), from
#                   bench/callgrind_split.py on the two counted dumps [0]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TARGET=${TARGET:-shardgate}
ROUTING=${ROUTING:-primary}
WORKLOAD=${WORKLOAD:-select-only}
PROTOCOLS=${PROTOCOLS:-simple extended prepared}
CLIENTS=${CLIENTS:-4}
SHORT=${SHORT:-500}
LONG=${LONG:-2500}
SHARDGATE=${SHARDGATE:-target/release/shardgate}
SHARDGATE_HOME=${SHARDGATE_HOME:-/tmp/shardgate}
BASE_PORT=${BASE_PORT:-16000}
PORT=${PORT:-6532}
OUT=${OUT:-/tmp/sg-callgrind}
SPLIT=${SPLIT:-0}
CACHE=${CACHE:-0}
VALGRIND=(valgrind --tool=callgrind)
[[ $CACHE == 1 ]] && VALGRIND+=(--cache-sim=yes)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

die() { echo "callgrind.sh: $*" >&2; exit 1; }
[[ $TARGET == shardgate || $TARGET == pgbouncer ]] || die "TARGET must be shardgate or pgbouncer, got '$TARGET'"
[[ $ROUTING == primary || $ROUTING == default ]] || die "ROUTING must be primary or default, got '$ROUTING'"
[[ $ROUTING == primary || $TARGET == shardgate ]] || die "ROUTING=default is for TARGET=shardgate"
[[ $WORKLOAD == select-only || $WORKLOAD == tpcb-like ]] || die "WORKLOAD must be select-only or tpcb-like"
[[ $SHORT =~ ^[0-9]+$ && $LONG =~ ^[0-9]+$ && $LONG -gt $SHORT ]] || die "need numbers with LONG > SHORT"
command -v valgrind >/dev/null || die "valgrind is missing (apt-get install valgrind)"
[[ -r $SHARDGATE_HOME/shardgate.toml ]] || die "no topology config at $SHARDGATE_HOME/shardgate.toml (run shardgate up --home $SHARDGATE_HOME)"
PGPASSWORD=app "$PGBIN/psql" -h 127.0.0.1 -p "$BASE_PORT" -U app app -Atc 'select 1 from pgbench_branches limit 1' >/dev/null 2>&1 ||
    die "no pgbench tables on 127.0.0.1:$BASE_PORT (pgbench -i -s 10 -h 127.0.0.1 -p $BASE_PORT -U app app)"

# A proxy left on the port (say, from an interrupted run) would be measured instead.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "127.0.0.1:$PORT is in use; stop what listens there or set PORT"
fi
rm -rf "$OUT"
mkdir -p "$OUT"
chmod 777 "$OUT"
VG_PID=
as_owner() { if [[ $TARGET == pgbouncer ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop() {
    [[ -n $VG_PID ]] || return 0
    # Every process of this run: for PgBouncer, runuser and valgrind under it.
    pkill -INT -f "callgrind-out-file=$OUT/cg.out" 2>/dev/null || true
    for _ in $(seq 50); do pgrep -f "callgrind-out-file=$OUT/cg.out" >/dev/null || break; sleep 0.2; done
    pkill -KILL -f "callgrind-out-file=$OUT/cg.out" 2>/dev/null || true
    VG_PID=
}
trap stop EXIT

if [[ $TARGET == shardgate ]]; then
    [[ -x $SHARDGATE ]] || die "$SHARDGATE missing (cargo build --release)"
    # The topology's own configuration on other ports and a state dir of
    # its own, with slower health probes.
    PROBE_INTERVAL=1h
    [[ $ROUTING == default ]] && PROBE_INTERVAL=5s
    sed -e "s/^listen = \"127.0.0.1:[0-9]*\"/listen = \"127.0.0.1:$((PORT + 1))\"/" \
        -e "0,/^listen = /s/^listen = \"127.0.0.1:[0-9]*\"/listen = \"127.0.0.1:$PORT\"/" \
        -e "s/^metrics_listen = .*/metrics_listen = \"127.0.0.1:$((PORT + 2))\"/" \
        -e "s|^state_dir = .*|state_dir = \"$OUT/state\"|" \
        -e "s/^\\[health\\]\$/[health]\\nprobe_interval = \"$PROBE_INTERVAL\"/" \
        "$SHARDGATE_HOME/shardgate.toml" >"$OUT/shardgate.toml"
    "${VALGRIND[@]}" --callgrind-out-file="$OUT/cg.out" \
        "$SHARDGATE" serve --config "$OUT/shardgate.toml" >"$OUT/proxy.log" 2>&1 &
    VG_PID=$!
    OPTS="-c shardgate.target=primary"
    [[ $ROUTING == default ]] && OPTS=
else
    command -v pgbouncer >/dev/null || die "pgbouncer is missing (apt-get install pgbouncer)"
    printf '"app" "app"\n' >"$OUT/userlist.txt"
    cat >"$OUT/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$BASE_PORT dbname=app

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $OUT/userlist.txt
pool_mode = transaction
default_pool_size = 20
logfile = $OUT/pgbouncer.log
pidfile = $OUT/pgbouncer.pid
ignore_startup_parameters = extra_float_digits,options
EOF
    chown -R postgres "$OUT"
    runuser -u postgres -- "${VALGRIND[@]}" --callgrind-out-file="$OUT/cg.out" \
        pgbouncer -q "$OUT/pgbouncer.ini" >"$OUT/proxy.log" 2>&1 &
    sleep 1
    VG_PID=$(pgrep -f "callgrind.*pgbouncer.*$OUT" | head -1 || true)
    OPTS=
fi

for _ in $(seq 240); do
    PGPASSWORD=app "$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U app app -c 'select 1' >/dev/null 2>&1 && break
    [[ -n $VG_PID ]] && kill -0 "$VG_PID" 2>/dev/null || die "the proxy under valgrind exited; see $OUT/proxy.log"
    sleep 0.5
done
# The valgrind'ed process itself (runuser may sit in between).
PID=$(pgrep -f "callgrind-out-file=$OUT/cg.out" | tail -1)

mode=-S
[[ $WORKLOAD == tpcb-like ]] && mode=
pgb() {
    PGOPTIONS=$OPTS PGPASSWORD=app "$PGBIN/pgbench" -n $mode -c "$CLIENTS" -j 1 -t "$1" -M "$2" \
        -h 127.0.0.1 -p "$PORT" -U app app >"$OUT/pgbench-$2-$1.log" 2>&1 ||
        die "pgbench failed; see $OUT/pgbench-$2-$1.log"
}
# event FILE NAME: the dump's total of one event (Ir, I1mr, D1mr, ...; 0
# when not recorded).
event() { awk -v want="$2" '/^events:/ {for (i = 2; i <= NF; i++) at[$i] = i} /^(summary|totals):/ {print (want in at) ? $(at[want]) : 0; exit}' "$1"; }
counted() { # run N PROTOCOL: the dump of that run alone
    as_owner callgrind_control -z "$PID" >/dev/null 2>&1
    pgb "$1" "$2"
    local before
    before=$(ls "$OUT"/cg.out.* 2>/dev/null | wc -l)
    as_owner callgrind_control -d "$PID" >/dev/null 2>&1
    for _ in $(seq 50); do (($(ls "$OUT"/cg.out.* 2>/dev/null | wc -l) > before)) && break; sleep 0.2; done
    ls -t "$OUT"/cg.out.* | head -1
}

connects() { # server connections the proxy has opened so far
    curl -s "http://127.0.0.1:$((PORT + 2))/metrics" |
        awk '/^shardgate_server_connects_total/ {n += $2} END {print n + 0}'
}

head=
rule=
[[ $CACHE == 1 ]] && head=" L1 instruction misses per transaction | L1 data misses per transaction |" && rule="---:|---:|"
if [[ $ROUTING == default ]]; then
    echo "| target | routing | workload | protocol | clients | instructions per transaction | server connections opened while counted |$head"
    echo "|---|---|---|---|---:|---:|---:|$rule"
else
    echo "| target | workload | protocol | clients | instructions per transaction |$head"
    echo "|---|---|---|---:|---:|$rule"
fi
for proto in $PROTOCOLS; do
    if [[ $ROUTING == default ]]; then
        # Long enough for every replica's pool to hold the connections
        # the clients' picks need.
        pgb "$LONG" "$proto"
        opened=$(connects)
    else
        pgb 100 "$proto"
    fi
    for attempt in 1 2 3 4; do
        short_dump=$(counted "$SHORT" "$proto")
        long_dump=$(counted "$LONG" "$proto")
        [[ $ROUTING == default ]] || break
        # A connection opened in a counted run swamps the count: measure
        # again (a client's picks can still land on a replica whose pool
        # has fewer connections than clients).
        new=$(($(connects) - opened))
        ((new == 0)) && break
        opened=$((opened + new))
    done
    txns=$((CLIENTS * (LONG - SHORT)))
    per=$((($(event "$long_dump" Ir) - $(event "$short_dump" Ir)) / txns))
    misses=
    # Misses to the tenth: a few per transaction is a normal count.
    [[ $CACHE == 1 ]] && misses=" $(awk -v i="$(($(event "$long_dump" I1mr) - $(event "$short_dump" I1mr)))" \
        -v d="$(($(event "$long_dump" D1mr) + $(event "$long_dump" D1mw) - $(event "$short_dump" D1mr) - $(event "$short_dump" D1mw)))" \
        -v n="$txns" 'BEGIN {printf "%.1f | %.1f |", i / n, d / n}')"
    if [[ $ROUTING == default ]]; then
        echo "| $TARGET | default | $WORKLOAD | $proto | $CLIENTS | $per | $new (attempt $attempt) |$misses"
    else
        echo "| $TARGET | $WORKLOAD | $proto | $CLIENTS | $per |$misses"
    fi
    if [[ $SPLIT == 1 ]]; then
        echo
        echo "$TARGET, $proto, by kind of work:"
        echo
        "$ROOT/bench/callgrind_split.py" "$short_dump" "$long_dump" "$txns"
        echo
    fi
done
