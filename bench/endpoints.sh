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
# process's user and system CPU (from /proc/<pid>/stat) per transaction.
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
[[ $# -gt 0 ]] || { sed -n '2,24p' "$0" >&2; exit 2; }

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

echo "| round | endpoint | TPS | user µs/txn | system µs/txn |"
echo "|---:|---|---:|---:|---:|"
for round in $(seq "$ROUNDS"); do
    for endpoint in "$@"; do
        IFS=: read -r name port pid <<<"$endpoint"
        [[ -n $pid ]] && read -r u1 s1 < <(ticks "$pid")
        out=$(PGOPTIONS="-c shardgate.target=primary" "$PGBENCH" -n -S -M "$PROTOCOL" \
            -T "$DURATION" -c "$CLIENTS" -j "$THREADS" -h 127.0.0.1 -p "$port" -U "$DB_USER" "$DB" 2>&1) || true
        tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" || echo failed)
        n=$(grep -oP 'processed: \K[0-9]+' <<<"$out" || echo 0)
        user=- sys=-
        if [[ -n $pid && $n -gt 0 ]]; then
            read -r u2 s2 < <(ticks "$pid")
            user=$(awk -v t=$((u2 - u1)) -v n="$n" -v hz="$hz" 'BEGIN{printf "%.1f", t * 1e6 / hz / n}')
            sys=$(awk -v t=$((s2 - s1)) -v n="$n" -v hz="$hz" 'BEGIN{printf "%.1f", t * 1e6 / hz / n}')
        fi
        printf '| %d | %s | %s | %s | %s |\n' "$round" "$name" "${tps%.*}" "$user" "$sys"
    done
done
