#!/usr/bin/env bash
# Where the CPU of a pgbench run goes: microseconds of CPU per transaction
# used by pgbench, by each of s0's Postgres servers (postmaster and all its
# children) and by the proxy, from /proc/<pid>/stat before and after one
# run. Run it against direct Postgres and against a proxy in turn to see
# what the proxy costs the other processes on the same machine.
#
#   bench/server_cpu.sh                                   # direct to s0's primary
#   PORT=6432 PROXY_PID=$(cat /tmp/shardgate/shardgate.pid) \
#     PGOPTIONS="-c shardgate.target=primary" bench/server_cpu.sh
#   PORT=16001 bench/server_cpu.sh                        # one replica directly
#   PORT="16001 16002" CLIENTS=8 bench/server_cpu.sh      # both replicas at once
#
# Needs the topology of `shardgate up --home $SHARDGATE_HOME` running, with
# pgbench tables in s0 (`pgbench -i -s 10 -h 127.0.0.1 -p 16000 -U app app`).
#
# Environment (defaults in brackets):
#   PORT            where pgbench connects [16000, s0's primary]; several
#                   ports: one pgbench per port, at the same time, and the
#                   counts are per transaction of all of them
#   PROXY_PID       the proxy's pid, or empty for none []
#   PGOPTIONS       passed to pgbench (e.g. -c shardgate.target=primary) []
#   PROTOCOL        pgbench -M [simple]
#   CLIENTS         pgbench -c (per port) [16]; -j is min(2, CLIENTS)
#   DURATION        seconds [5]
#   WORKLOAD        pgbench script flag [-S]
#   SHARDGATE_HOME  topology home [/tmp/shardgate]
#   SERVERS         server directories under SHARDGATE_HOME [s0-primary s0-replica1 s0-replica2]
set -euo pipefail

PORT=${PORT:-16000}
PROXY_PID=${PROXY_PID:-}
PROTOCOL=${PROTOCOL:-simple}
CLIENTS=${CLIENTS:-16}
DURATION=${DURATION:-5}
WORKLOAD=${WORKLOAD:--S}
SHARDGATE_HOME=${SHARDGATE_HOME:-/tmp/shardgate}
SERVERS=${SERVERS:-s0-primary s0-replica1 s0-replica2}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
TICK=$(getconf CLK_TCK)

die() { echo "server_cpu.sh: $*" >&2; exit 1; }
for s in $SERVERS; do
    [[ -r $SHARDGATE_HOME/$s/postmaster.pid ]] || die "no running server at $SHARDGATE_HOME/$s"
done
[[ -z $PROXY_PID || -r /proc/$PROXY_PID/stat ]] || die "no process $PROXY_PID"

# CPU ticks (user + system, with reaped children) of a server's processes.
server_ticks() {
    local pm total=0 a b c d
    pm=$(head -1 "$SHARDGATE_HOME/$1/postmaster.pid")
    for p in $pm $(pgrep -P "$pm" || true); do
        read -r a b c d < <(awk '{print $14, $15, $16, $17}' "/proc/$p/stat" 2>/dev/null || echo 0 0 0 0)
        total=$((total + a + b + c + d))
    done
    echo "$total"
}
proxy_ticks() { [[ -z $PROXY_PID ]] && echo 0 || awk '{print $14 + $15}' "/proc/$PROXY_PID/stat"; }

declare -A before
for s in $SERVERS; do before[$s]=$(server_ticks "$s"); done
p0=$(proxy_ticks)
j=$((CLIENTS < 2 ? CLIENTS : 2))
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for port in $PORT; do
    /usr/bin/time -f "%U %S" -o "$dir/time.$port" env PGPASSWORD="${PGPASSWORD:-app}" PGOPTIONS="${PGOPTIONS:-}" \
        "$PGBIN/pgbench" -n "$WORKLOAD" -M "$PROTOCOL" -c "$CLIENTS" -j "$j" -T "$DURATION" \
        -h 127.0.0.1 -p "$port" -U app app >"$dir/out.$port" 2>&1 &
done
failed=0
for pid in $(jobs -p); do wait "$pid" || failed=1; done
p1=$(proxy_ticks)
[[ $failed == 0 ]] || die "pgbench failed: $(tail -3 "$dir"/out.*)"
n=0 pgbench_s=0
for port in $PORT; do
    k=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$dir/out.$port")
    n=$((n + ${k:-0}))
    pgbench_s=$(awk -v a="$pgbench_s" '{print a + $1 + $2}' "$dir/time.$port")
done
[[ $n -gt 0 ]] || die "pgbench completed no transactions"

per_txn() { awk -v t="$1" -v hz="$TICK" -v n="$n" 'BEGIN{printf "%.1f", t * 1e6 / hz / n}'; }
printf 'port %s, %s, %d clients per port, %s s: %d transactions (%d TPS)\n' "$PORT" "$PROTOCOL" "$CLIENTS" "$DURATION" "$n" $((n / DURATION))
printf '  %-14s %8s µs/txn\n' pgbench "$(awk -v t="$pgbench_s" -v n="$n" 'BEGIN{printf "%.1f", t * 1e6 / n}')"
for s in $SERVERS; do
    printf '  %-14s %8s µs/txn\n' "$s" "$(per_txn $(($(server_ticks "$s") - before[$s])))"
done
[[ -z $PROXY_PID ]] || printf '  %-14s %8s µs/txn\n' proxy "$(per_txn $((p1 - p0)))"
