#!/usr/bin/env bash
# pgbench select-only against endpoints that are already running (two
# shardgate builds, PgBouncer, Postgres itself), interleaved round by
# round, with each process's CPU per transaction. Use it to compare builds
# side by side: bench/pgbench.sh measures only the proxy `shardgate up`
# started.
#
#   bench/endpoints.sh direct:16000 old:6632:<pid> new:6432:<pid> pgbouncer:6440:<pid>
#
# Each endpoint is name:port[:pid]; with a pid, the row shows that
# process's user and system CPU (from /proc/<pid>/stat) and its voluntary
# and involuntary context switches (from /proc/<pid>/status: the main
# thread, which runs the sessions of shardgate and PgBouncer alike) per
# transaction: how often it slept in epoll_wait and was preempted.
# shardgate endpoints get -c shardgate.target=primary (every statement on
# the primary, so pooling is compared with pooling); PgBouncer needs
# `ignore_startup_parameters = options` for that.
#
# Start each proxy in a session of its own (`setsid shardgate serve ...`,
# as `shardgate up` and `pgbouncer -d` do): with the kernel's autogroup
# scheduling on (/proc/sys/kernel/sched_autogroup_enabled), a proxy left in
# the shell's session shares one CPU share with the pgbench this script
# runs from that shell, and is measured at a disadvantage.
#
# Environment (defaults in brackets): ROUNDS [3], DURATION seconds [8],
# CLIENTS [16], THREADS [2], PROTOCOL simple|extended|prepared [simple],
# DB_USER/DB/PGPASSWORD [app/app/app].
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
PROTOCOL=${PROTOCOL:-simple}
DB_USER=${DB_USER:-app}
DB=${DB:-app}
export PGPASSWORD=${PGPASSWORD:-app}
PGBENCH=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)/pgbench
[[ -x $PGBENCH ]] || PGBENCH=$(command -v pgbench)
[[ $# -gt 0 ]] || { sed -n '2,27p' "$0" >&2; exit 2; }

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
switches() { awk '/^voluntary_ctxt_switches/ {v=$2} /^nonvoluntary_ctxt_switches/ {n=$2} END {print v, n}' "/proc/$1/status"; }
per_txn() { awk -v d="$1" -v n="$2" -v scale="$3" 'BEGIN{printf "%.'"$4"'f", d * scale / n}'; }
us_per_tick=$(awk -v hz="$(getconf CLK_TCK)" 'BEGIN{print 1e6 / hz}')

echo "| round | endpoint | TPS | user µs/txn | system µs/txn | voluntary switches/txn | involuntary switches/txn |"
echo "|---:|---|---:|---:|---:|---:|---:|"
for round in $(seq "$ROUNDS"); do
    for endpoint in "$@"; do
        IFS=: read -r name port pid <<<"$endpoint"
        if [[ -n $pid ]]; then
            read -r u1 s1 < <(ticks "$pid")
            read -r v1 i1 < <(switches "$pid")
        fi
        out=$(PGOPTIONS="-c shardgate.target=primary" "$PGBENCH" -n -S -M "$PROTOCOL" \
            -T "$DURATION" -c "$CLIENTS" -j "$THREADS" -h 127.0.0.1 -p "$port" -U "$DB_USER" "$DB" 2>&1) || true
        tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" || echo failed)
        n=$(grep -oP 'processed: \K[0-9]+' <<<"$out" || echo 0)
        user=- sys=- vol=- invol=-
        if [[ -n $pid && $n -gt 0 ]]; then
            read -r u2 s2 < <(ticks "$pid")
            read -r v2 i2 < <(switches "$pid")
            user=$(per_txn $((u2 - u1)) "$n" "$us_per_tick" 1)
            sys=$(per_txn $((s2 - s1)) "$n" "$us_per_tick" 1)
            vol=$(per_txn $((v2 - v1)) "$n" 1 3)
            invol=$(per_txn $((i2 - i1)) "$n" 1 3)
        fi
        printf '| %d | %s | %s | %s | %s | %s | %s |\n' "$round" "$name" "${tps%.*}" "$user" "$sys" "$vol" "$invol"
    done
done
