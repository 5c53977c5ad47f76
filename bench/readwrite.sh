#!/usr/bin/env bash
# Read/write splitting benchmark on the local topology (shard s0: a primary
# and two streaming replicas), as root from anywhere in the repository:
#
#   bench/readwrite.sh
#
# 1. Select-only pgbench at 16 clients, simple and extended protocol, ROUNDS
#    interleaved rounds: direct to the primary, shardgate spreading reads
#    over the two replicas, shardgate with everything on the primary
#    (shardgate-primary), and PgBouncer in front of the primary alone
#    (bench/pgbench.sh does this part; its settings apply).
# 2. A mixed workload (bench/scripts/read.sql weighted READ_WEIGHT against
#    bench/scripts/write.sql weighted WRITE_WEIGHT: autocommit reads and
#    single-row updates, each client doing both) through shardgate, direct
#    and PgBouncer, reporting TPS and, for shardgate, the share of read
#    transactions served by replicas (from shardgate_routed_total).
#
# Environment: everything bench/pgbench.sh takes, plus
#   READ_WEIGHT / WRITE_WEIGHT  script weights of the mixed run [9 / 1]
#   MIXED_CLIENTS               clients of the mixed run [16]
#   OUT                         results file [bench/results-readwrite-<date>.md]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STAMP=$(date +%Y-%m-%d-%H%M%S)
OUT=${OUT:-bench/results-readwrite-$STAMP.md}
READ_WEIGHT=${READ_WEIGHT:-9}
WRITE_WEIGHT=${WRITE_WEIGHT:-1}
MIXED_CLIENTS=${MIXED_CLIENTS:-16}
DURATION=${DURATION:-10}
DURATION=${DURATION%s}
SG_PORT=${SG_PORT:-6432}
METRICS_PORT=${METRICS_PORT:-9930}
BASE_PORT=${BASE_PORT:-16000}
PGB_PORT=${PGB_PORT:-6433}
export PGPASSWORD=app PGSSLMODE=disable PGGSSENCMODE=disable

# Part 1 (also starts the topology and leaves the tables initialized).
SELECT_OUT=${OUT%.md}-select.md
TARGETS=${TARGETS:-direct shardgate shardgate-primary pgbouncer} \
    WORKLOADS=select-only PROTOCOLS=${PROTOCOLS:-simple extended} CLIENTS=16 CONNECT_CLIENTS=0 \
    ROUNDS=${ROUNDS:-3} DURATION=$DURATION OUT=$SELECT_OUT bench/pgbench.sh >&2

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
routed() {
    curl -s "http://127.0.0.1:$METRICS_PORT/metrics" |
        awk -v r="$1" -F'[ ]' '$1 ~ "^shardgate_routed_total\\{route=\""r"\"" {s += $2} END {print s + 0}'
}

# Part 2: PgBouncer runs only inside pgbench.sh; start one for this part.
PGB_DIR=$(mktemp -d /tmp/sg-bench-rw-pgbouncer.XXXXXX)
cleanup() {
    [[ -r $PGB_DIR/pgbouncer.pid ]] && kill "$(cat "$PGB_DIR/pgbouncer.pid")" 2>/dev/null || true
    rm -rf "$PGB_DIR"
}
trap cleanup EXIT
cat >"$PGB_DIR/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$BASE_PORT dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $PGB_DIR/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 20000
logfile = $PGB_DIR/pgbouncer.log
pidfile = $PGB_DIR/pgbouncer.pid
INI
printf '"app" "app"\n' >"$PGB_DIR/userlist.txt"
chmod 600 "$PGB_DIR/userlist.txt"
chown -R postgres:postgres "$PGB_DIR"
runuser -u postgres -- bash -c 'ulimit -n "$(ulimit -Hn)"; exec pgbouncer -d -q "$1"' _ "$PGB_DIR/pgbouncer.ini"
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PGB_PORT") 2>/dev/null && break; sleep 0.1; done

mixed() {
    PGOPTIONS=$2 "$PGBIN/pgbench" -h 127.0.0.1 -p "$1" -U app -n -T "$DURATION" -c "$MIXED_CLIENTS" -j 2 \
        -f "bench/scripts/read.sql@$READ_WEIGHT" -f "bench/scripts/write.sql@$WRITE_WEIGHT" app 2>&1
}

{
    echo "# Read/write splitting: select-only and mixed pgbench"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); shardgate at $(git rev-parse --short HEAD)"
    echo "- select-only part: $SELECT_OUT (direct = the primary; shardgate = reads over both replicas; shardgate-primary = shardgate with -c shardgate.target=primary; pgbouncer = the primary)"
    echo "- mixed part: $MIXED_CLIENTS clients, $DURATION s, read.sql@$READ_WEIGHT + write.sql@$WRITE_WEIGHT (autocommit), -M simple"
    echo
    echo "| target | TPS | read transactions | reads served by replicas |"
    echo "|---|---:|---:|---:|"
} >"$OUT"
for target in direct shardgate shardgate-primary pgbouncer; do
    options=
    case $target in
        direct) port=$BASE_PORT ;;
        shardgate) port=$SG_PORT ;;
        shardgate-primary) port=$SG_PORT options="-c shardgate.target=primary" ;;
        pgbouncer) port=$PGB_PORT ;;
    esac
    before=$(routed replica)
    log=$(mixed "$port" "$options")
    after=$(routed replica)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$log" | head -1)
    reads=$(awk '/^SQL script 1:/{f=1} f && /- [0-9]+ transactions/{print $2; exit}' <<<"$log")
    share=-
    if [[ $target == shardgate && -n $reads && $reads -gt 0 ]]; then
        share=$(awk -v a=$((after - before)) -v b="$reads" 'BEGIN{printf "%.0f %%", 100 * a / b}')
    fi
    printf '| %s | %.0f | %s | %s |\n' "$target" "${tps:-0}" "${reads:--}" "$share" >>"$OUT"
    echo "$target: $tps tps, reads $reads, replica share $share" >&2
done
echo >>"$OUT"
cat "$SELECT_OUT" "$OUT"
