#!/usr/bin/env bash
# Context switches and CPU per transaction of running proxies, under
# pgbench select-only: how often each proxy sleeps (voluntary switches:
# it waited in epoll_wait with nothing to do) and is preempted
# (involuntary), per transaction. Use it next to bench/endpoints.sh, which
# gives throughput; this gives the scheduler's view of the same load.
#
#   bench/switches.sh shardgate:6432:<pid> pgbouncer:6440:<pid>
#
# Each endpoint is name:port:pid. Counters are read from
# /proc/<pid>/status (the main thread: shardgate and PgBouncer run their
# sessions on one thread) and /proc/<pid>/stat over MEASURE seconds in the
# middle of a pgbench run. shardgate endpoints get -c
# shardgate.target=primary, as in bench/endpoints.sh.
#
# Environment (defaults in brackets): ROUNDS [2], DURATION seconds of
# each pgbench run [6], MEASURE seconds counted [4], CLIENTS [16],
# THREADS [2], PROTOCOL simple|extended|prepared [simple],
# DB_USER/DB/PGPASSWORD [app/app/app].
set -euo pipefail

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
MEASURE=${MEASURE:-4}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
PROTOCOL=${PROTOCOL:-simple}
DB_USER=${DB_USER:-app}
DB=${DB:-app}
export PGPASSWORD=${PGPASSWORD:-app}
PGBENCH=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)/pgbench
[[ -x $PGBENCH ]] || PGBENCH=$(command -v pgbench)
[[ $# -gt 0 ]] || { sed -n '2,19p' "$0" >&2; exit 2; }
((DURATION >= MEASURE + 2)) || { echo "DURATION must be at least MEASURE + 2" >&2; exit 2; }

switches() { awk '/^voluntary_ctxt_switches/ {v=$2} /^nonvoluntary_ctxt_switches/ {n=$2} END {print v, n}' "/proc/$1/status"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "| round | endpoint | TPS | voluntary switches/txn | involuntary switches/txn | CPU µs/txn |"
echo "|---:|---|---:|---:|---:|---:|"
for round in $(seq "$ROUNDS"); do
    for endpoint in "$@"; do
        IFS=: read -r name port pid <<<"$endpoint"
        [[ -n ${pid:-} && -r /proc/$pid/status ]] || { echo "$endpoint: no such process" >&2; exit 2; }
        opts=""
        [[ $name == *shardgate* || $name == sg* ]] && opts="-c shardgate.target=primary"
        PGOPTIONS=$opts "$PGBENCH" -n -S -M "$PROTOCOL" -c "$CLIENTS" -j "$THREADS" \
            -T "$DURATION" -h 127.0.0.1 -p "$port" -U "$DB_USER" "$DB" >"$log" 2>&1 &
        bench=$!
        sleep 1
        read -r v0 n0 < <(switches "$pid")
        t0=$(ticks "$pid")
        sleep "$MEASURE"
        read -r v1 n1 < <(switches "$pid")
        t1=$(ticks "$pid")
        wait "$bench" || { echo "$name: pgbench failed: $(tail -1 "$log")" >&2; continue; }
        tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$log" | head -1)
        awk -v r="$round" -v n="$name" -v tps="$tps" -v s="$MEASURE" -v hz="$hz" \
            -v dv=$((v1 - v0)) -v dn=$((n1 - n0)) -v dt=$((t1 - t0)) 'BEGIN {
                txns = tps * s
                printf "| %d | %s | %.0f | %.3f | %.3f | %.1f |\n", r, n, tps, dv / txns, dn / txns, dt * 1e6 / hz / txns
            }'
    done
done
