#!/usr/bin/env bash
# Sharding benchmark: the same queries through a sharded shardgate (3 shards)
# and through an unsharded shardgate (1 server holding every row), side by
# side, on one machine. Run as root from anywhere in the repository:
#
#   bench/sharding.sh                      # 3 workloads x 2 protocols x 2 rounds, 10 s each (~5 min)
#   DURATION=5 ROUNDS=1 WORKLOADS=point bench/sharding.sh
#
# What it does:
#   1. Starts three throwaway Postgres primaries (initdb/pg_ctl as the
#      postgres OS user, in a temporary directory, on BASE_PORT,
#      BASE_PORT+10, BASE_PORT+20) with role app/app and database app; the
#      first also gets database app_flat.
#   2. Starts two proxies from a private copy of the release binary
#      (`shardgate serve --config`), both transaction pooling, [pool]
#      max_size = POOL_SIZE, routing.read_write_split = false (primaries
#      only, so replica routing plays no part):
#        sharded   (A_PORT): the three primaries as s0, s1, s2,
#                  [sharding] buckets = 1024 (even split: 0-341, 342-682,
#                  683-1023), bench_accounts sharded by id (int8);
#        unsharded (B_PORT): one shard, the first primary, no [sharding];
#                  clients use database app_flat there.
#      Parallel query and index-only scans are off
#      (max_parallel_workers_per_gather = 0, enable_indexonlyscan = off) so
#      the full table and the shards' thirds get the same plans (see the
#      comments in the server settings below).
#   3. Loads ROWS rows: bench_accounts (id int8 primary key, balance int8,
#      filler text) with INSERT ... SELECT generate_series directly into
#      app_flat; then CREATE TABLE / CREATE INDEX through the sharded proxy
#      (run on every shard) and the very same rows copied through it:
#      `COPY bench_accounts TO STDOUT` (app_flat) piped into
#      `COPY bench_accounts FROM STDIN` (sharded proxy, split by key, one
#      two-phase commit). Checks on each shard, directly, that it holds
#      exactly the rows whose bucket it owns, and that both proxies give the
#      same answers to the three queries.
#   4. pgbench -n -c CLIENTS -j THREADS -T DURATION -M PROTOCOL with the
#      custom scripts bench/scripts/sharding-{point,count,order}.sql
#      against both proxies; for every (workload, protocol) ROUNDS rounds,
#      the two targets back to back, the order swapped every round.
#   5. Prints per-round and median tables (TPS, mean latency, proxy CPU per
#      transaction, sharded/unsharded ratios) and writes them to OUT, raw
#      pgbench output, proxy logs and server logs to <OUT without .md>.logs/.
#   Everything it started (servers, proxies, the temporary directory) is
#   stopped and removed on exit, also on failure or Ctrl-C.
#
# Environment (defaults in brackets):
#   SHARDGATE   proxy binary, copied before use so a rebuild during the run
#               does not change it [target/release/shardgate; built with
#               `cargo build --release` if missing]
#   PGBIN       PostgreSQL binaries [/usr/lib/postgresql/15/bin]
#   BASE_PORT   first primary's port (+10, +20 for the others) [17200]
#   A_PORT / B_PORT             sharded / unsharded proxy [17240 / 17241]
#   A_METRICS / B_METRICS       their metrics ports [17250 / 17251]
#   ROWS        rows in bench_accounts [100000]
#   ORDER_INDEX 1 = index on balance (ORDER BY ... LIMIT 10 is then an index
#               scan on every shard, so the run measures the scatter/merge
#               path rather than a sort); 0 = none [1]
#   WORKLOADS   subset of: point count order [point count order]
#   PROTOCOLS   subset of: simple extended prepared [extended simple]
#   CLIENTS     pgbench -c [8]
#   THREADS     pgbench -j [2]
#   DURATION    seconds per run [10]
#   ROUNDS      rounds per (workload, protocol) [2]
#   POOL_SIZE   [pool] max_size of both proxies [20]
#   WARMUP      seconds of unreported point queries per proxy first [2]
#   OUT         results file [bench/results/<date>-sharding.md]
#   BUILD_NOTE  free text added to the version line of the results (e.g.
#               what the binary was built from) []
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SHARDGATE=${SHARDGATE:-target/release/shardgate}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BASE_PORT=${BASE_PORT:-17200}
A_PORT=${A_PORT:-17240}
B_PORT=${B_PORT:-17241}
A_METRICS=${A_METRICS:-17250}
B_METRICS=${B_METRICS:-17251}
ROWS=${ROWS:-100000}
ORDER_INDEX=${ORDER_INDEX:-1}
WORKLOADS=${WORKLOADS:-point count order}
PROTOCOLS=${PROTOCOLS:-extended simple}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
DURATION=${DURATION:-10}
DURATION=${DURATION%s}
ROUNDS=${ROUNDS:-2}
POOL_SIZE=${POOL_SIZE:-20}
WARMUP=${WARMUP:-2}
OUT=${OUT:-bench/results/$(date -u +%F)-sharding.md}
LOGDIR=${OUT%.md}.logs

export PGPASSWORD=app PGSSLMODE=disable PGGSSENCMODE=disable
unset PGOPTIONS PGHOST PGPORT PGDATABASE PGUSER

log() { printf '%s\n' "$*" >&2; }
die() { log "sharding.sh: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (servers run as the postgres OS user)"
[[ -x $PGBIN/initdb && -x $PGBIN/pgbench ]] || die "no initdb/pgbench in PGBIN=$PGBIN"
id postgres >/dev/null 2>&1 || die "no postgres OS user (apt-get install postgresql)"
for v in ROWS CLIENTS THREADS DURATION ROUNDS POOL_SIZE WARMUP BASE_PORT A_PORT B_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done
((ROWS > 0 && DURATION > 0 && ROUNDS > 0 && CLIENTS > 0)) || die "ROWS, DURATION, ROUNDS and CLIENTS must be positive"
for w in $WORKLOADS; do [[ $w == point || $w == count || $w == order ]] || die "unknown workload '$w' (point, count, order)"; done
for p in $PROTOCOLS; do [[ $p == simple || $p == extended || $p == prepared ]] || die "unknown protocol '$p'"; done

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORTS=("$BASE_PORT" "$((BASE_PORT + 10))" "$((BASE_PORT + 20))")
for p in "${PORTS[@]}" "$A_PORT" "$B_PORT" "$A_METRICS" "$B_METRICS"; do
    ! port_open "$p" || die "127.0.0.1:$p is in use; set BASE_PORT / A_PORT / B_PORT / A_METRICS / B_METRICS"
done

if [[ ! -x $SHARDGATE ]]; then
    [[ $SHARDGATE == target/release/shardgate ]] || die "SHARDGATE=$SHARDGATE is not an executable"
    log "== $SHARDGATE missing: cargo build --release"
    cargo build --release
fi

# ------------------------------------------------------------ cleanup
WORK=$(mktemp -d /tmp/sg-bench-sharding.XXXXXX)
chmod 755 "$WORK"
chown postgres:postgres "$WORK" # server logs are written there by pg_ctl
PROXY_PIDS=()
STARTED=()
POSTMASTERS=()
cleanup() {
    local rc=$? pid d
    trap - EXIT INT TERM
    for pid in "${PROXY_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PROXY_PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    for d in "${STARTED[@]}"; do
        runuser -u postgres -- "$PGBIN/pg_ctl" stop -D "$d" -m fast -w -t 60 >/dev/null 2>&1 || true
    done
    if [[ -d $LOGDIR ]]; then
        cp "$WORK"/*.log "$LOGDIR/" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$(dirname "$OUT")" "$LOGDIR"
rm -f "$LOGDIR"/*.log

# A private copy: `cargo build` by someone else during the run must not
# swap the binary under us (and the version noted below stays true).
cp "$SHARDGATE" "$WORK/shardgate"
SG_SHA=$(sha256sum "$WORK/shardgate" | cut -c1-12)
SG_MTIME=$(date -u -r "$SHARDGATE" '+%Y-%m-%d %H:%M:%S UTC')

# ------------------------------------------------------------ servers
as_pg() { runuser -u postgres -- "$@"; }
su_sql() { # su_sql INDEX DB SQL...: superuser over the server's own socket
    local i=$1 db=$2
    shift 2
    as_pg "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$WORK/p$i" -p "${PORTS[$i]}" -U postgres -d "$db" "$@"
}
app_sql() { # app_sql PORT DB ARGS...: as app over TCP (a server or a proxy)
    local port=$1 db=$2
    shift 2
    "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U app -d "$db" "$@"
}

for i in 0 1 2; do
    d=$WORK/p$i
    log "== initdb + start primary p$i on 127.0.0.1:${PORTS[$i]}"
    mkdir -m 700 "$d"
    chown postgres:postgres "$d"
    as_pg "$PGBIN/initdb" -D "$d" -U postgres -E UTF8 --locale=C.UTF-8 --no-instructions \
        --auth-local=trust --auth-host=scram-sha-256 >"$WORK/initdb-p$i.log" 2>&1 ||
        { cat "$WORK/initdb-p$i.log" >&2; die "initdb p$i failed"; }
    # The settings `shardgate up` uses (max_prepared_transactions: the
    # COPY through the sharded proxy commits with two-phase commit).
    cat >>"$d/postgresql.conf" <<EOF

# added by bench/sharding.sh
listen_addresses = '127.0.0.1'
port = ${PORTS[$i]}
unix_socket_directories = '$d'
max_connections = 200
shared_buffers = '128MB'
max_prepared_transactions = 64
# No parallel query: the unsharded table (about 13 MB at 100,000 rows) is
# over min_parallel_table_scan_size and would get parallel workers, the
# shards' thirds would not, and with 8 clients on few cores the workers
# only add fork and coordination cost. Same plan shape on both sides.
max_parallel_workers_per_gather = 0
# No index-only scans: for count(*) the planner picks an index-only scan of
# the balance index on the full table (about 2x slower here than the seq
# scan) but a seq scan on each shard's third, which would credit sharding
# with a plan choice. Seq scans on both sides (plans.txt in the logs shows
# them). Point queries and ORDER BY use plain index scans, unaffected.
enable_indexonlyscan = off
EOF
    as_pg "$PGBIN/pg_ctl" start -D "$d" -l "$WORK/server-p$i.log" -w -t 60 >/dev/null ||
        { tail -20 "$WORK/server-p$i.log" >&2; die "p$i did not start"; }
    STARTED+=("$d")
    POSTMASTERS+=("$(head -1 "$d/postmaster.pid")")
    su_sql "$i" postgres -c "create role app login password 'app'" -c "create database app owner app"
done
su_sql 0 postgres -c "create database app_flat owner app"

# ------------------------------------------------------------ proxies
common_toml() { # common_toml LISTEN METRICS
    cat <<EOF
# written by bench/sharding.sh
[proxy]
listen = "127.0.0.1:$1"
metrics_listen = "127.0.0.1:$2"
pool_mode = "transaction"
state_dir = "$WORK/state-$3"
node_id = $4

[pool]
max_size = $POOL_SIZE
min_size = 0
checkout_timeout = "5s"

[routing]
read_write_split = false

[[users]]
name = "app"
password = "app"
auth = "scram-sha-256"
EOF
}
{
    common_toml "$A_PORT" "$A_METRICS" a 1
    for i in 0 1 2; do printf '\n[[shards]]\nname = "s%d"\nprimary = "127.0.0.1:%d"\n' "$i" "${PORTS[$i]}"; done
    cat <<EOF

[sharding]
buckets = 1024

[[sharding.tables]]
name = "bench_accounts"
column = "id"
type = "int8"
EOF
} >"$WORK/sharded.toml"
{
    common_toml "$B_PORT" "$B_METRICS" b 2
    printf '\n[[shards]]\nname = "s0"\nprimary = "127.0.0.1:%d"\n' "${PORTS[0]}"
} >"$WORK/unsharded.toml"

start_proxy() { # start_proxy NAME CONFIG PORT -> appends to PROXY_PIDS
    "$WORK/shardgate" serve --config "$2" >"$WORK/proxy-$1.log" 2>&1 &
    PROXY_PIDS+=($!)
    for _ in $(seq 100); do port_open "$3" && return 0; kill -0 "$!" 2>/dev/null || break; sleep 0.1; done
    tail -20 "$WORK/proxy-$1.log" >&2
    die "proxy $1 did not start listening on 127.0.0.1:$3"
}
log "== proxies: sharded on 127.0.0.1:$A_PORT, unsharded on 127.0.0.1:$B_PORT"
start_proxy sharded "$WORK/sharded.toml" "$A_PORT"
A_PID=${PROXY_PIDS[0]}
start_proxy unsharded "$WORK/unsharded.toml" "$B_PORT"
B_PID=${PROXY_PIDS[1]}

# ------------------------------------------------------------ data
DDL="create table bench_accounts (id int8 primary key, balance int8 not null, filler text)"
IDX="create index bench_accounts_balance on bench_accounts (balance)"
log "== loading $ROWS rows into app_flat (p0, directly)"
app_sql "${PORTS[0]}" app_flat -c "$DDL" -c "select setseed(0.5)" \
    -c "insert into bench_accounts select g, (random() * 1000000)::int8, repeat('x', 84) from generate_series(1, $ROWS) g" >/dev/null
[[ $ORDER_INDEX != 1 ]] || app_sql "${PORTS[0]}" app_flat -c "$IDX"

log "== creating bench_accounts through the sharded proxy and copying the same rows into it"
app_sql "$A_PORT" app -c "$DDL"
[[ $ORDER_INDEX != 1 ]] || app_sql "$A_PORT" app -c "$IDX"
t0=$(date +%s.%N)
app_sql "${PORTS[0]}" app_flat -c "copy bench_accounts to stdout" |
    app_sql "$A_PORT" app -c "copy bench_accounts from stdin"
t1=$(date +%s.%N)
COPY_SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}')
log "   COPY of $ROWS rows through the sharded proxy: ${COPY_SECS} s"

# Every shard must hold exactly the rows the bucket map gives it.
BUCKET="((hashint8extended(id, 8816678312871386365)::numeric + 23752253665144318179) % 18446744073709551616 % 1024)::int8"
RANGES=("0 and 341" "342 and 682" "683 and 1023")
PER_SHARD=()
for i in 0 1 2; do
    read -r n bad < <(app_sql "${PORTS[$i]}" app -F ' ' -c \
        "select count(*), count(*) filter (where $BUCKET not between ${RANGES[$i]}) from bench_accounts")
    [[ $bad == 0 ]] || die "shard s$i holds $bad rows of other shards' buckets"
    PER_SHARD+=("$n")
done
total=$((PER_SHARD[0] + PER_SHARD[1] + PER_SHARD[2]))
[[ $total == "$ROWS" ]] || die "the shards hold $total rows together, expected $ROWS"
log "   rows per shard: s0 ${PER_SHARD[0]}, s1 ${PER_SHARD[1]}, s2 ${PER_SHARD[2]} (each in its own buckets)"
for i in 0 1 2; do su_sql "$i" app -c "vacuum analyze bench_accounts"; done
su_sql 0 app_flat -c "vacuum analyze bench_accounts"

# The plans, each with one unloaded execution (server-side time, TIMING OFF
# so per-row clock reads do not inflate it), directly on the full table and
# on shard s0's third.
{
    for q in "select count(*) from bench_accounts" \
        "select id, balance from bench_accounts order by balance desc, id limit 10" \
        "select balance from bench_accounts where id = 4242"; do
        for target in "app_flat (all $ROWS rows, unsharded)" "app (shard s0, ${PER_SHARD[0]} rows)"; do
            db=${target%% *}
            for _ in 1 2; do app_sql "${PORTS[0]}" "$db" -c "$q" >/dev/null; done # warm
            echo "== $target: $q"
            app_sql "${PORTS[0]}" "$db" -c "explain (analyze, timing off, costs off) $q"
            echo
        done
    done
} >"$LOGDIR/plans.txt"

# Same answers through both proxies (simple protocol), before timing them.
for q in "select count(*) from bench_accounts" \
    "select id, balance from bench_accounts order by balance desc, id limit 10" \
    "select balance from bench_accounts where id = 1" \
    "select balance from bench_accounts where id = $ROWS"; do
    a=$(app_sql "$A_PORT" app -c "$q") || die "sharded proxy failed: $q"
    b=$(app_sql "$B_PORT" app_flat -c "$q") || die "unsharded proxy failed: $q"
    [[ $a == "$b" ]] || die "different answers to '$q': sharded '$a', unsharded '$b'"
done
log "   both proxies give the same answers to the benchmark queries"

# ------------------------------------------------------------ runner
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
metric() { # metric PORT NAME-PREFIX: sum of the matching samples
    curl -s "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk -v m="$2" 'index($0, m) == 1 {s += $NF} END {print s + 0}'
}
# Other work on the machine (someone's cargo build or test) skews a run:
# the CPU that neither pgbench, the proxies nor our servers used, as a share
# of the machine (from /proc/stat), is noted per run.
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
our_ticks() { # proxies, postmasters and their backends (pooled: they live across runs)
    local pids=("${PROXY_PIDS[@]}") pm p sum=0
    for pm in "${POSTMASTERS[@]}"; do
        pids+=("$pm")
        for p in $(ps -o pid= --ppid "$pm"); do pids+=("$p"); done
    done
    for p in "${pids[@]}"; do sum=$((sum + $(cpu_ticks "$p"))); done
    echo "$sum"
}
child_ticks() { # child_ticks VAR: CPU of this shell's finished children (pgbench), in ticks
    times >"$WORK/times" # in this shell: a subshell would count its own children only
    printf -v "$1" '%s' "$(awk -v hz="$(getconf CLK_TCK)" 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
        printf "%d", t * hz }' "$WORK/times")"
}

target_port() { [[ $1 == sharded ]] && echo "$A_PORT" || echo "$B_PORT"; }
target_db() { [[ $1 == sharded ]] && echo app || echo app_flat; }
target_pid() { [[ $1 == sharded ]] && echo "$A_PID" || echo "$B_PID"; }

# run_pgbench LOGFILE TARGET PROTOCOL SCRIPT -> TPS LAT CPU_US ERR SCATTER
run_pgbench() {
    local logf=$1 t=$2 proto=$3 script=$4 rc=0 pid c0 c1 s0 s1 txns b0 b1 o0 o1 k0 k1 w0 w1
    pid=$(target_pid "$t")
    c0=$(cpu_ticks "$pid")
    s0=$(metric "$A_METRICS" shardgate_scatter_queries_total)
    child_ticks k0
    o0=$(our_ticks) b0=$(busy_ticks) w0=$(date +%s.%N)
    timeout --kill-after=10 $((DURATION + 60)) \
        "$PGBIN/pgbench" -h 127.0.0.1 -p "$(target_port "$t")" -U app -n -T "$DURATION" \
        -c "$CLIENTS" -j "$THREADS" -M "$proto" -D nrows="$ROWS" -f "$script" "$(target_db "$t")" \
        >"$logf" 2>&1 || rc=$?
    b1=$(busy_ticks) w1=$(date +%s.%N) o1=$(our_ticks)
    child_ticks k1
    c1=$(cpu_ticks "$pid")
    s1=$(metric "$A_METRICS" shardgate_scatter_queries_total)
    OTHER=$(awk -v b=$((b1 - b0)) -v o=$((o1 - o0 + k1 - k0)) -v w0="$w0" -v w1="$w1" -v hz="$(getconf CLK_TCK)" -v n="$(nproc)" \
        'BEGIN{ x = 100 * (b - o) / (hz * n * (w1 - w0)); if (x < 0) x = 0; printf "%.0f", x }')
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$logf" | head -1)
    TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$logf" | head -1)
    LAT=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$logf" | head -1)
    CPU_US=-
    if [[ -n $txns && $txns -gt 0 ]]; then
        CPU_US=$(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v n="$txns" 'BEGIN{printf "%.1f", t * 1e6 / hz / n}')
    fi
    SCATTER=$(awk -v a="$s0" -v b="$s1" -v n="${txns:-0}" 'BEGIN{ if (n > 0) printf "%.2f", (b - a) / n; else print "-" }')
    ERR=
    if [[ $rc -ne 0 || -z $TPS ]]; then
        ERR=$(grep -m1 -E 'error|ERROR|FATAL|aborted|failed|could not' "$logf" || true)
        [[ -n $ERR ]] || ERR="pgbench exited with $rc"
        TPS=
    else
        local failed
        failed=$(sed -n 's/^number of failed transactions: \([1-9][0-9]*\).*/\1/p' "$logf" | head -1)
        [[ -z $failed ]] || ERR="(partial) $failed failed transactions"
    fi
}

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{if (NR==0) exit; if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
fmt0() { [[ -n ${1:-} ]] && printf '%.0f' "$1" || echo failed; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f", a / b }'; }

if ((WARMUP > 0)); then
    for t in sharded unsharded; do
        log "== warmup $t (${WARMUP}s of point queries)"
        "$PGBIN/pgbench" -h 127.0.0.1 -p "$(target_port "$t")" -U app -n -T "$WARMUP" -c "$CLIENTS" -j "$THREADS" \
            -M extended -D nrows="$ROWS" -f bench/scripts/sharding-point.sql "$(target_db "$t")" \
            >"$LOGDIR/warmup-$t.log" 2>&1 || log "   warmup on $t failed: $(grep -m1 -E 'error|FATAL' "$LOGDIR/warmup-$t.log" || true)"
    done
fi

ROUND_ROWS=()
SUMMARY_ROWS=()
n_runs=0
for _w in $WORKLOADS; do for _p in $PROTOCOLS; do n_runs=$((n_runs + 2 * ROUNDS)); done; done
k=0
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for w in $WORKLOADS; do
    script=bench/scripts/sharding-$w.sql
    for p in $PROTOCOLS; do
        declare -A tps=() lat=() cpu=()
        ratios=() lratios=()
        for ((r = 1; r <= ROUNDS; r++)); do
            order=(sharded unsharded)
            ((r % 2)) || order=(unsharded sharded)
            declare -A rt=() rl=() rc=() re=() rs=() ro=()
            for t in "${order[@]}"; do
                k=$((k + 1))
                logf=$LOGDIR/$w-$p-$t-r$r.log
                printf '[%d/%d] %-5s %-8s %-9s round %d ... ' "$k" "$n_runs" "$w" "$p" "$t" "$r" >&2
                run_pgbench "$logf" "$t" "$p" "$script"
                rt[$t]=$TPS rl[$t]=$LAT rc[$t]=$CPU_US re[$t]=$ERR rs[$t]=$SCATTER ro[$t]=$OTHER
                if [[ -n $TPS ]]; then
                    tps[$t]+="$TPS " lat[$t]+="$LAT "
                    [[ $CPU_US == - ]] || cpu[$t]+="$CPU_US "
                    log "$(printf '%.0f' "$TPS") tps, $LAT ms, proxy $CPU_US µs/txn, other load $OTHER %${ERR:+ ($ERR)}"
                else
                    log "FAILED: $ERR (log: $logf)"
                fi
            done
            tr=$(ratio "${rt[sharded]}" "${rt[unsharded]}")
            lr=$(ratio "${rl[sharded]}" "${rl[unsharded]}")
            [[ $tr == - ]] || ratios+=("$tr")
            [[ $lr == - ]] || lratios+=("$lr")
            notes="${re[sharded]:+sharded: ${re[sharded]} }${re[unsharded]:+unsharded: ${re[unsharded]}}"
            ROUND_ROWS+=("| $w | $p | $r | ${order[0]} | $(fmt0 "${rt[sharded]:-}") | ${rl[sharded]:--} | ${rc[sharded]} | ${rs[sharded]} | $(fmt0 "${rt[unsharded]:-}") | ${rl[unsharded]:--} | ${rc[unsharded]} | $tr | $lr | ${ro[sharded]} / ${ro[unsharded]} | ${notes//|/\\|} |")
            unset rt rl rc re rs ro
        done
        range() { (($# > 1)) && printf ' (%s–%s)' "$(printf '%s\n' "$@" | sort -g | head -1)" "$(printf '%s\n' "$@" | sort -g | tail -1)" || true; }
        med() { [[ -n ${1:-} ]] && printf "$2" "$(median $1)" || echo -; }
        tr=-
        lr=-
        ((${#ratios[@]})) && tr="$(printf '%.2f' "$(median "${ratios[@]}")")$(range "${ratios[@]}")"
        ((${#lratios[@]})) && lr="$(printf '%.2f' "$(median "${lratios[@]}")")$(range "${lratios[@]}")"
        SUMMARY_ROWS+=("| $w | $p | $(med "${tps[sharded]:-}" '%.0f') | $(med "${lat[sharded]:-}" '%.3f') | $(med "${cpu[sharded]:-}" '%.1f') | $(med "${tps[unsharded]:-}" '%.0f') | $(med "${lat[unsharded]:-}" '%.3f') | $(med "${cpu[unsharded]:-}" '%.1f') | $tr | $lr |")
        unset tps lat cpu
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# Anything the proxies logged above info level.
PROXY_WARN=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/proxy-sharded.log" "$WORK/proxy-unsharded.log" 2>/dev/null | grep -c -E ' (WARN|ERROR) ' || true)

# ------------------------------------------------------------ report
rev=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
[[ -z $(git status --porcelain --untracked-files=no 2>/dev/null) ]] || rev="$rev (working tree has uncommitted changes)"
CMD="$(for v in ROWS DURATION ROUNDS CLIENTS PROTOCOLS WORKLOADS ORDER_INDEX; do printf '%s=%q ' "$v" "${!v}"; done)bench/sharding.sh"
{
    echo "# Sharding: sharded (3 shards) vs unsharded, both through shardgate"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); command: \`$CMD\`"
    echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/^Mem:/{print $2}') GiB RAM; load average before $LOAD_BEFORE, after $LOAD_AFTER"
    echo "- everything on this one machine: pgbench, both proxies and the three Postgres primaries share the same $(nproc) CPUs, so the three shards of a scatter query compete with each other (and with pgbench and the proxy) for CPU instead of running in parallel on their own machines"
    echo "- PostgreSQL $(app_sql "${PORTS[0]}" app -c 'show server_version'); $("$WORK/shardgate" --version) at $rev${BUILD_NOTE:+ ($BUILD_NOTE)}; binary $SHARDGATE (modified $SG_MTIME, sha256 $SG_SHA…), release build"
    echo "- sharded proxy: 3 primaries s0/s1/s2, [sharding] buckets = 1024 (even split), bench_accounts sharded by id int8; unsharded proxy: one shard (the s0 server, database app_flat), no [sharding]. Both: transaction pooling, [pool] max_size = $POOL_SIZE, routing.read_write_split = false, worker_threads 1 (default). Servers: shared_buffers 128MB, max_parallel_workers_per_gather = 0, enable_indexonlyscan = off (same plans on both sides: logs/plans.txt)"
    echo "- data: bench_accounts (id int8 primary key, balance int8 not null, filler text), $ROWS rows (the same rows in both: copied through the sharded proxy with COPY FROM STDIN in ${COPY_SECS} s), per shard: s0 ${PER_SHARD[0]}, s1 ${PER_SHARD[1]}, s2 ${PER_SHARD[2]}; index on balance: $([[ $ORDER_INDEX == 1 ]] && echo yes || echo no)"
    echo "- pgbench -n -c $CLIENTS -j $THREADS -T $DURATION -M <protocol> -D nrows=$ROWS -f bench/scripts/sharding-<workload>.sql; $ROUNDS round(s), the two targets back to back, order swapped each round"
    echo "- point: \`SELECT balance FROM bench_accounts WHERE id = :id\` (random id); count: \`SELECT count(*) FROM bench_accounts\`; order: \`SELECT id, balance FROM bench_accounts ORDER BY balance DESC, id LIMIT 10\`"
    echo "- proxy warnings/errors logged during the run: $PROXY_WARN"
    echo
    echo "## Medians over rounds"
    echo
    echo "ratio = sharded / unsharded of the same round (median, range over rounds in brackets); TPS ratio < 1 and latency ratio > 1 mean sharding costs."
    echo
    echo "| workload | protocol | sharded TPS | sharded latency ms | sharded proxy CPU µs/txn | unsharded TPS | unsharded latency ms | unsharded proxy CPU µs/txn | TPS ratio | latency ratio |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${SUMMARY_ROWS[@]}"
    echo
    echo "## Every round"
    echo
    echo "scatter/txn: shardgate_scatter_queries_total of the sharded proxy during the run, per transaction (1.00 = every query ran on all shards, 0 = single-shard). other load: CPU used during the sharded / unsharded run by processes other than pgbench, the proxies and the three servers, in % of the whole machine (from /proc/stat; 0 = the machine was ours)."
    echo
    echo "| workload | protocol | round | first | sharded TPS | sharded latency ms | sharded proxy CPU µs/txn | scatter/txn | unsharded TPS | unsharded latency ms | unsharded proxy CPU µs/txn | TPS ratio | latency ratio | other load % | notes |"
    echo "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    printf '%s\n' "${ROUND_ROWS[@]}"
} >"$OUT"
echo
cat "$OUT"
log "results: $OUT (pgbench, proxy and server logs: $LOGDIR)"
