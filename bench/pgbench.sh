#!/usr/bin/env bash
# pgbench matrix: Postgres direct vs shardgate vs PgBouncer, on one machine.
#
# Run as root on Debian from anywhere in the repository:
#
#   bench/pgbench.sh                                   # full matrix, 10 s per run
#   DURATION=2 WORKLOADS=select-only CLIENTS=16 bench/pgbench.sh   # a quick subset
#
# What it does:
#   1. `shardgate up` (idempotent): 3 local Postgres shards + the proxy on
#      127.0.0.1:6432 (user/password/database app/app/app). Builds the
#      binary with `cargo build --release` only if it is missing.
#   2. Installs pgbouncer with apt-get if missing, writes its own config to
#      a temporary directory and runs it as the postgres OS user on
#      127.0.0.1:6433 in transaction mode, in front of shard s0's primary,
#      with the same pool size as shardgate. Stopped on exit.
#   3. `pgbench -i -s $SCALE` directly on s0's primary, once (FORCE_INIT=1
#      to redo it).
#   4. For each (workload, protocol, clients) cell, runs direct, shardgate
#      and pgbouncer back to back (so noise hits them alike), then a
#      connect-per-transaction (-C) row. Before every run the pgbench
#      tables are vacuumed and pgbench_history truncated directly on the
#      server (pgbench itself runs with -n), so every run starts alike.
#   5. Prints a markdown table and writes it to $OUT. A failed run is a
#      "failed" row with pgbench's first error line; the script goes on.
#
# Environment (defaults in brackets):
#   SHARDGATE       proxy binary [target/release/shardgate]
#   SHARDGATE_HOME  topology home passed to `shardgate up --home` [/tmp/shardgate]
#   BASE_PORT       s0 primary port (`up --base-port`) [16000]
#   SG_PORT         shardgate listen port (`up --listen`) [6432]
#   METRICS_PORT    shardgate metrics port (`up --metrics-listen`) [9930]
#   PGB_PORT        pgbouncer listen port [6440; 6433 is the admin API of `shardgate up`]
#   DURATION        seconds per run; "10" or "10s" [10]
#   SCALE           pgbench scale factor [10]
#   FORCE_INIT      1 = re-run pgbench -i even if the tables exist [0]
#   WORKLOADS       space-separated subset of: select-only tpcb-like
#   PROTOCOLS       space-separated subset of: simple extended prepared
#   CLIENTS         space-separated client counts [1 16 64]
#   TARGETS         space-separated subset of: direct shardgate pgbouncer
#                   shardgate-primary (shardgate with every statement on the
#                   primary: startup option -c shardgate.target=primary)
#   CONNECT_CLIENTS clients of the -C (new connection per transaction) row;
#                   0 skips that row [32]
#   THREADS         pgbench -j (capped at the client count) [2]
#   WARMUP          seconds of unreported select-only load per target
#                   before the matrix, to fill the pools; 0 skips [3]
#   ROUNDS          runs of every target per cell, interleaved with the
#                   target order rotated each round; the table shows
#                   medians and the range of per-round ratios [1]
#   OUT             results file [bench/results-<date>.md]; raw pgbench
#                   logs go to a directory next to it (<OUT without .md>.logs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SHARDGATE=${SHARDGATE:-target/release/shardgate}
SHARDGATE_HOME=${SHARDGATE_HOME:-/tmp/shardgate}
BASE_PORT=${BASE_PORT:-16000}
SG_PORT=${SG_PORT:-6432}
METRICS_PORT=${METRICS_PORT:-9930}
PGB_PORT=${PGB_PORT:-6440}
DURATION=${DURATION:-10}
DURATION=${DURATION%s}
SCALE=${SCALE:-10}
FORCE_INIT=${FORCE_INIT:-0}
WORKLOADS=${WORKLOADS:-select-only tpcb-like}
PROTOCOLS=${PROTOCOLS:-simple extended prepared}
CLIENTS=${CLIENTS:-1 16 64}
TARGETS=${TARGETS:-direct shardgate pgbouncer}
CONNECT_CLIENTS=${CONNECT_CLIENTS:-32}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-1}
STAMP=$(date +%Y-%m-%d-%H%M%S)
OUT=${OUT:-bench/results-$STAMP.md}
LOGDIR=${OUT%.md}.logs

DB=app
DB_USER=app
export PGPASSWORD=app
# No TLS anywhere: every target is plain TCP on loopback, and an
# SSLRequest round trip would only skew the -C row.
export PGSSLMODE=disable PGGSSENCMODE=disable

log() { printf '%s\n' "$*" >&2; }
die() { log "pgbench.sh: $*"; exit 1; }

[[ $DURATION =~ ^[0-9]+$ && $DURATION -gt 0 ]] || die "DURATION must be a positive number of seconds, got '$DURATION'"
for w in $WORKLOADS; do [[ $w == select-only || $w == tpcb-like ]] || die "unknown workload '$w' (select-only, tpcb-like)"; done
for p in $PROTOCOLS; do [[ $p == simple || $p == extended || $p == prepared ]] || die "unknown protocol '$p' (simple, extended, prepared)"; done
for t in $TARGETS; do [[ $t == direct || $t == shardgate || $t == shardgate-primary || $t == pgbouncer ]] || die "unknown target '$t' (direct, shardgate, shardgate-primary, pgbouncer)"; done
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -gt 0 ]] || die "ROUNDS must be a positive number, got '$ROUNDS'"
for c in $CLIENTS $CONNECT_CLIENTS; do [[ $c =~ ^[0-9]+$ ]] || die "client counts must be numbers, got '$c'"; done
[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and runs servers as the postgres user)"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wants() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- topology
if [[ ! -x $SHARDGATE ]]; then
    [[ $SHARDGATE == target/release/shardgate ]] || die "SHARDGATE=$SHARDGATE is not an executable"
    log "== $SHARDGATE missing: cargo build --release"
    cargo build --release
fi
# A different topology on our ports would make `up` fail obscurely.
if port_open "$BASE_PORT" && [[ ! -e $SHARDGATE_HOME/s0-primary/postmaster.pid ]]; then
    die "something already listens on 127.0.0.1:$BASE_PORT but $SHARDGATE_HOME/s0-primary is not running: if that is a topology started with another --home, set SHARDGATE_HOME to it (or stop it)"
fi
if port_open "$SG_PORT" && ! { [[ -r $SHARDGATE_HOME/shardgate.pid ]] && kill -0 "$(cat "$SHARDGATE_HOME/shardgate.pid")" 2>/dev/null; }; then
    die "something already listens on 127.0.0.1:$SG_PORT but no proxy of $SHARDGATE_HOME is running: set SHARDGATE_HOME to the topology it belongs to (or stop it)"
fi
# A proxy started here inherits this; raise it like any production setup.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "== $SHARDGATE up --home $SHARDGATE_HOME"
"$SHARDGATE" up --home "$SHARDGATE_HOME" --base-port "$BASE_PORT" \
    --listen "127.0.0.1:$SG_PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" >&2

# pgbench and psql of the newest installed server (`up` installed it).
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
PGBENCH=$PGBIN/pgbench
PSQL=$PGBIN/psql
if [[ ! -x $PGBENCH ]]; then PGBENCH=$(command -v pgbench || true); fi
if [[ ! -x $PSQL ]]; then PSQL=$(command -v psql || true); fi
[[ -n $PGBENCH && -n $PSQL ]] || die "pgbench/psql not found (apt-get install postgresql)"

sql() { "$PSQL" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$BASE_PORT" -U "$DB_USER" -d "$DB" "$@"; }

# The pool size to give PgBouncer: shardgate's [pool] max_size.
POOL_SIZE=$(awk -F= '/^\[/{p=($0=="[pool]")} p && $1~/^ *max_size *$/{gsub(/[ "]/,"",$2); print $2; exit}' \
    "$SHARDGATE_HOME/shardgate.toml" 2>/dev/null || true)
POOL_SIZE=${POOL_SIZE:-20}
# ... and its checkout_timeout, as PgBouncer's query_wait_timeout: a client
# that cannot get a server connection fails after the same wait on both
# (PgBouncer's default, 120 s, turns a stuck run into a two-minute hang).
WAIT_TIMEOUT=$(awk -F= '/^\[/{p=($0=="[pool]")} p && $1~/^ *checkout_timeout *$/{gsub(/[ "]/,"",$2); print $2; exit}' \
    "$SHARDGATE_HOME/shardgate.toml" 2>/dev/null || true)
case $WAIT_TIMEOUT in
    *ms) WAIT_TIMEOUT=$(( (${WAIT_TIMEOUT%ms} + 999) / 1000 )) ;;
    *s) WAIT_TIMEOUT=${WAIT_TIMEOUT%s} ;;
esac
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || WAIT_TIMEOUT=5

# --------------------------------------------------------------- pgbouncer
PGB_DIR=
cleanup() {
    local rc=$?
    if [[ -n $PGB_DIR && -d $PGB_DIR ]]; then
        if [[ -r $PGB_DIR/pgbouncer.pid ]]; then
            local pid
            pid=$(cat "$PGB_DIR/pgbouncer.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        if [[ -d $LOGDIR && -f $PGB_DIR/pgbouncer.log ]]; then cp "$PGB_DIR/pgbouncer.log" "$LOGDIR/" || true; fi
        rm -rf "$PGB_DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if wants pgbouncer; then
    if ! command -v pgbouncer >/dev/null; then
        log "== installing pgbouncer (apt-get)"
        # Keep the package's own service from starting (on Debian it would
        # listen on 6432, shardgate's port): the usual policy-rc.d switch.
        made_policy=
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            made_policy=1
        fi
        export DEBIAN_FRONTEND=noninteractive
        installed=1
        apt-get install -y -q pgbouncer >&2 ||
            { apt-get update -q >&2 && apt-get install -y -q pgbouncer >&2; } || installed=
        if [[ -n $made_policy ]]; then rm -f /usr/sbin/policy-rc.d; fi
        [[ -n $installed ]] || die "apt-get install pgbouncer failed"
        # ... nor at the next boot.
        if command -v systemctl >/dev/null; then systemctl disable pgbouncer >/dev/null 2>&1 || true; fi
        command -v pgbouncer >/dev/null || die "pgbouncer still missing after apt-get install"
    fi
    if port_open "$PGB_PORT"; then
        die "127.0.0.1:$PGB_PORT is already in use (another pgbouncer?); set PGB_PORT"
    fi
    PGB_DIR=$(mktemp -d /tmp/sg-bench-pgbouncer.XXXXXX)
    cat >"$PGB_DIR/pgbouncer.ini" <<EOF
; written by bench/pgbench.sh
[databases]
$DB = host=127.0.0.1 port=$BASE_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $PGB_DIR/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 20000
query_wait_timeout = $WAIT_TIMEOUT
logfile = $PGB_DIR/pgbouncer.log
pidfile = $PGB_DIR/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
    printf '"%s" "%s"\n' "$DB_USER" "$PGPASSWORD" >"$PGB_DIR/userlist.txt"
    chmod 600 "$PGB_DIR/userlist.txt"
    chown -R postgres:postgres "$PGB_DIR"
    # PgBouncer refuses to run as root.
    # runuser's PAM session resets the open-file limit to 1024: raise it.
    runuser -u postgres -- bash -c 'ulimit -n "$(ulimit -Hn)"; exec pgbouncer -d -q "$1"' _ "$PGB_DIR/pgbouncer.ini"
    for _ in $(seq 100); do port_open "$PGB_PORT" && break; sleep 0.1; done
    if ! port_open "$PGB_PORT"; then
        tail -20 "$PGB_DIR/pgbouncer.log" >&2 || true
        die "pgbouncer did not start listening on 127.0.0.1:$PGB_PORT"
    fi
    log "== pgbouncer running on 127.0.0.1:$PGB_PORT (pool_mode=transaction, default_pool_size=$POOL_SIZE, query_wait_timeout=$WAIT_TIMEOUT)"
fi

# -------------------------------------------------------------- pgbench -i
branches=$(sql -c 'select count(*) from pgbench_branches' 2>/dev/null || true)
if [[ $FORCE_INIT == 1 || $branches != "$SCALE" ]]; then
    log "== pgbench -i -s $SCALE on 127.0.0.1:$BASE_PORT"
    "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$BASE_PORT" -U "$DB_USER" "$DB" >&2
else
    log "== pgbench tables already initialized at scale $SCALE (FORCE_INIT=1 to redo)"
fi

# ------------------------------------------------------------------ runner
mkdir -p "$(dirname "$OUT")" "$LOGDIR"

port_of() {
    case $1 in
        direct) echo "$BASE_PORT" ;;
        shardgate | shardgate-primary) echo "$SG_PORT" ;;
        pgbouncer) echo "$PGB_PORT" ;;
    esac
}

# shardgate-primary: the same proxy with every statement sent to the
# primary (startup option shardgate.target=primary), i.e. pooling alone.
pg_options() {
    [[ $1 == shardgate-primary ]] && echo "-c shardgate.target=primary" || echo "${PGOPTIONS:-}"
}

# Same starting state for every run, done on the server, not through the
# target (what pgbench's own pre-run vacuum does; pgbench runs with -n).
reset_tables() {
    sql -c 'vacuum pgbench_branches' -c 'vacuum pgbench_tellers' -c 'truncate pgbench_history' >/dev/null
}

# The proxy process of a target (empty for direct).
proxy_pid() {
    case $1 in
        shardgate | shardgate-primary) cat "$SHARDGATE_HOME/shardgate.pid" 2>/dev/null || true ;;
        pgbouncer) cat "$PGB_DIR/pgbouncer.pid" 2>/dev/null || true ;;
    esac
}

# CPU time a process has used so far, in clock ticks: "user system".
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat" 2>/dev/null || echo 0 0; }

# The machine's CPU time so far, all CPUs, in clock ticks: "idle total"
# (idle counts iowait too; the total is user to steal, the guest fields
# after them being counted in user already).
machine_ticks() { awk '/^cpu /{t=0; for (i=2; i<=9 && i<=NF; i++) t+=$i; print $5+$6, t; exit}' /proc/stat; }

# run_pgbench LOGFILE TARGET ARGS... -> sets TPS, LAT, ERR (ERR empty on
# success), CPU_US (the proxy's CPU microseconds per transaction) and
# CPU_USER_US (the user-space part of it; the rest is kernel time, which on
# loopback includes the TCP stack's work for the sockets' peers) and IDLE
# (the percentage of the machine's CPU time left idle during the run: with
# pgbench, Postgres and the proxy on one machine, time no process could
# use, e.g. waiting on a wake-up between them).
run_pgbench() {
    local logf=$1 target=$2
    shift 2
    local port rc=0 pid t0="0 0" t1="0 0" txns m0 m1
    port=$(port_of "$target")
    reset_tables
    pid=$(proxy_pid "$target")
    [[ -n $pid ]] && t0=$(cpu_ticks "$pid")
    m0=$(machine_ticks)
    PGOPTIONS=$(pg_options "$target") timeout --kill-after=10 $((DURATION + 120)) \
        "$PGBENCH" -h 127.0.0.1 -p "$port" -U "$DB_USER" -n -T "$DURATION" "$@" "$DB" >"$logf" 2>&1 || rc=$?
    m1=$(machine_ticks)
    [[ -n $pid ]] && t1=$(cpu_ticks "$pid")
    IDLE=$(awk -v a="$m0" -v b="$m1" 'BEGIN{split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; if (t > 0) printf "%.0f", 100 * (y[1] - x[1]) / t; else print "-"}')
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$logf" | head -1)
    CPU_US=- CPU_USER_US=-
    if [[ -n $pid && -n $txns && $txns -gt 0 ]]; then
        local u0 s0 u1 s1 hz
        read -r u0 s0 <<<"$t0"
        read -r u1 s1 <<<"$t1"
        hz=$(getconf CLK_TCK)
        CPU_US=$(awk -v t=$((u1 + s1 - u0 - s0)) -v hz="$hz" -v n="$txns" 'BEGIN{printf "%.1f", t * 1e6 / hz / n}')
        CPU_USER_US=$(awk -v t=$((u1 - u0)) -v hz="$hz" -v n="$txns" 'BEGIN{printf "%.1f", t * 1e6 / hz / n}')
    fi
    TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$logf" | head -1)
    LAT=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$logf" | head -1)
    ERR=
    if [[ $rc -ne 0 || -z $TPS ]]; then
        ERR=$(grep -m1 -E 'error|ERROR|FATAL|aborted|failed|could not' "$logf" || true)
        [[ -n $ERR ]] || ERR=$(grep -v '^$' "$logf" | tail -1 || true)
        [[ $rc -eq 124 || $rc -eq 137 ]] && ERR="timed out after $((DURATION + 120)) s; $ERR"
        [[ -n $ERR ]] || ERR="pgbench exited with $rc"
    else
        local failed
        failed=$(sed -n 's/^number of failed transactions: \([1-9][0-9]*\).*/\1/p' "$logf" | head -1)
        [[ -z $failed ]] || ERR="completed with $failed failed transactions"
        # A run with failed transactions still has a TPS; keep it.
        [[ -z $ERR ]] || ERR="(partial) $ERR"
    fi
}

md_escape() { local s=${1//|/\\|}; s=${s//$'\r'/}; printf '%s' "${s:0:200}"; }

HEADER='| workload | protocol | clients | target | TPS | avg latency ms | ratio to direct TPS (range) | proxy CPU µs/txn (user) | machine idle % | notes |'
SEP='|---|---|---:|---|---:|---:|---:|---:|---:|---|'

versions() {
    local pgv pgbv sgv rev exe
    pgv=$(sql -c 'show server_version' 2>/dev/null || echo '?')
    pgbv=$(command -v pgbouncer >/dev/null && pgbouncer --version 2>/dev/null | head -1 || echo 'not installed')
    sgv=$("$SHARDGATE" --version 2>/dev/null || echo '?')
    rev=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
    if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then rev="$rev (dirty)"; fi
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/^Mem:/{print $2}') GiB RAM"
    exe=$(readlink "/proc/$(cat "$SHARDGATE_HOME/shardgate.pid" 2>/dev/null || echo 0)/exe" 2>/dev/null || echo '?')
    echo "- PostgreSQL $pgv; $pgbv; $sgv at $rev"
    echo "- proxy process: $exe (binary modified $(date -u -r "$exe" '+%Y-%m-%d %H:%M:%S UTC' 2>/dev/null || echo '?'))"
    echo "- $ROUNDS round(s) per cell, target order rotated each round; TPS, latency, CPU and machine idle are medians over rounds, the ratio is the median of per-round ratios to direct (range in brackets)"
    echo "- pgbench scale $SCALE, $DURATION s per run, -j min($THREADS, clients); pools: $POOL_SIZE server connections (shardgate max_size, pgbouncer default_pool_size), transaction mode, ${WAIT_TIMEOUT}s wait for a server connection"
}

{
    echo "# pgbench: direct vs shardgate vs pgbouncer"
    echo
    versions
    echo
    echo "$HEADER"
    echo "$SEP"
} >"$OUT"

ROWS=()
n_runs=0
for _w in $WORKLOADS; do for _p in $PROTOCOLS; do for _c in $CLIENTS; do for _t in $TARGETS; do n_runs=$((n_runs + ROUNDS)); done; done; done; done
if [[ $CONNECT_CLIENTS -gt 0 ]]; then for _t in $TARGETS; do n_runs=$((n_runs + ROUNDS)); done; fi
i=0

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{if (NR==0) exit; if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

# cell WORKLOAD-LABEL PROTOCOL CLIENTS EXTRA-PGBENCH-ARGS...
# Runs every target ROUNDS times, round-robin with the order rotated each
# round (so slow drifts of the machine hit every target alike), and writes
# one row per target: the median TPS, latency and proxy CPU, and the median
# and range of the per-round ratios to direct.
cell() {
    local wl=$1 proto=$2 clients=$3
    shift 3
    local j=$THREADS r t k logf order=() targets=($TARGETS)
    ((clients < j)) && j=$clients
    ((j < 1)) && j=1
    declare -A tps=() lat=() cpu=() cpu_user=() idle=() err=() direct=()
    for ((r = 0; r < ROUNDS; r++)); do
        order=("${targets[@]:r % ${#targets[@]}}" "${targets[@]:0:r % ${#targets[@]}}")
        for t in "${order[@]}"; do
            i=$((i + 1))
            logf="$LOGDIR/$(echo "$wl-$proto-c$clients-$t-r$((r + 1))" | tr ' ' '_').log"
            printf '[%d/%d] %-22s %-9s %3s clients  %-9s round %d ... ' "$i" "$n_runs" "$wl" "$proto" "$clients" "$t" "$((r + 1))" >&2
            run_pgbench "$logf" "$t" -c "$clients" -j "$j" -M "$proto" "$@"
            if [[ -n $TPS && ( -z $ERR || $ERR == "(partial)"* ) ]]; then
                tps[$t]+="$TPS " lat[$t]+="$LAT "
                [[ $IDLE == - ]] || idle[$t]+="$IDLE "
                [[ $CPU_US == - ]] || cpu[$t]+="$CPU_US " cpu_user[$t]+="$CPU_USER_US "
                [[ $t == direct ]] && direct[$r]=$TPS
                log "$(printf '%.0f' "$TPS") tps, $LAT ms${ERR:+ ($ERR)}"
            else
                log "FAILED: $ERR (log: $logf)"
            fi
            [[ -z $ERR || -n ${err[$t]:-} ]] || err[$t]=$ERR
        done
    done
    for t in "${targets[@]}"; do
        local tps_s=failed lat_s=- cpu_s=- idle_s=- ratio=- ratios=() row
        if [[ -n ${tps[$t]:-} ]]; then
            tps_s=$(printf '%.0f' "$(median ${tps[$t]})")
            lat_s=$(printf '%.3f' "$(median ${lat[$t]})")
            [[ -z ${idle[$t]:-} ]] || idle_s=$(printf '%.0f' "$(median ${idle[$t]})")
            [[ -z ${cpu[$t]:-} ]] || cpu_s="$(printf '%.1f' "$(median ${cpu[$t]})") ($(printf '%.1f' "$(median ${cpu_user[$t]})"))"
            # Ratios are taken within a round (direct and target measured
            # minutes apart at most), then the median over rounds.
            if [[ $t != direct ]]; then
                local per_round=(${tps[$t]})
                # Rounds where this target failed have no TPS: pair only
                # the rounds both have, in order.
                k=0
                for ((r = 0; r < ROUNDS; r++)); do
                    [[ -n ${direct[$r]:-} && $k -lt ${#per_round[@]} ]] || continue
                    ratios+=("$(awk -v a="${per_round[$k]}" -v b="${direct[$r]}" 'BEGIN{printf "%.3f", a/b}')")
                    k=$((k + 1))
                done
                if ((${#ratios[@]})); then
                    ratio=$(printf '%.2f' "$(median "${ratios[@]}")")
                    if ((${#ratios[@]} > 1)); then
                        ratio+=" ($(printf '%s\n' "${ratios[@]}" | sort -g | head -1 | xargs printf '%.2f')–$(printf '%s\n' "${ratios[@]}" | sort -g | tail -1 | xargs printf '%.2f'))"
                    fi
                fi
            else
                ratio=1.00
            fi
        fi
        row="| $wl | $proto | $clients | $t | $tps_s | $lat_s | $ratio | $cpu_s | $idle_s | $(md_escape "${err[$t]:-}") |"
        ROWS+=("$row")
        echo "$row" >>"$OUT"
    done
}

if [[ $WARMUP -gt 0 ]]; then
    for t in $TARGETS; do
        log "== warmup $t (${WARMUP}s)"
        PGOPTIONS=$(pg_options "$t") "$PGBENCH" -h 127.0.0.1 -p "$(port_of "$t")" -U "$DB_USER" -n -S -T "$WARMUP" -c 16 -j "$THREADS" "$DB" \
            >"$LOGDIR/warmup-$t.log" 2>&1 || log "   warmup on $t failed: $(grep -m1 -E 'error|FATAL' "$LOGDIR/warmup-$t.log" || true)"
    done
fi

for w in $WORKLOADS; do
    wargs=()
    [[ $w == select-only ]] && wargs=(-S)
    for p in $PROTOCOLS; do
        for c in $CLIENTS; do
            cell "$w" "$p" "$c" ${wargs[@]+"${wargs[@]}"}
        done
    done
done
if [[ $CONNECT_CLIENTS -gt 0 ]]; then
    cell "select-only -C" simple "$CONNECT_CLIENTS" -S -C
fi

echo
echo "$HEADER"
echo "$SEP"
printf '%s\n' "${ROWS[@]}"
echo
log "results: $OUT (pgbench logs: $LOGDIR)"
