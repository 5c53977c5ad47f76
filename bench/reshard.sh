#!/usr/bin/env bash
# Online bucket moves, measured on a local topology of their own. Run as
# root from the repository:
#
#   bench/reshard.sh                       # ROWS=1000000, MOVES=10 (~3 min)
#   ROWS=200000 MOVES=4 bench/reshard.sh
#
# What it does:
#   1. `shardgate up` in RESHARD_HOME (default /tmp/shardgate-reshard) on
#      BASE_PORT (default 18000: s0, s1, s2 primaries on BASE_PORT,
#      BASE_PORT+10, BASE_PORT+20; 1024 buckets, s0 0-341, s1 342-682,
#      s2 683-1023), proxy on 127.0.0.1:8432, admin API on 127.0.0.1:8433;
#      declares `items (id bigint primary key, v bigint, pad text)` sharded
#      by id, `[reshard] cleanup_after = "0s"`, and loads ROWS rows
#      (~100 bytes each) straight into their owners.
#   2. Copy: the raw pipe `COPY (SELECT * FROM items WHERE <bucket in
#      0-170>) TO STDOUT | COPY items_raw FROM STDIN` from s0 to s2, then
#      `shardgate admin reshard move --buckets 0-170 --to s2` of the same
#      rows while pgbench updates random rows through shardgate at RATE
#      (default 200) tps. Prints both rates, the move's largest replication
#      lag seen by `reshard status`, and its cutover pause.
#   3. Pause: MOVES moves of 8 buckets (~ROWS/128 rows) back and forth
#      between s1 and s2 under the same pgbench load; p50 / p99 / max of
#      the cutover pause each move reports, and pgbench's failed
#      transactions and worst latency.
#   4. `shardgate down` and removes RESHARD_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
MOVES=${MOVES:-10}
RATE=${RATE:-200}
RESHARD_HOME=${RESHARD_HOME:-/tmp/shardgate-reshard}
BASE_PORT=${BASE_PORT:-18000}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cargo build --release --quiet
BIN=$PWD/target/release/shardgate
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
rm -rf "$RESHARD_HOME"
"$BIN" up --home "$RESHARD_HOME" --base-port "$BASE_PORT" \
  --listen 127.0.0.1:8432 --metrics-listen 127.0.0.1:8930 --admin-listen 127.0.0.1:8433 >/dev/null
trap 'cp "$RESHARD_HOME/shardgate.log" "$OUT/" 2>/dev/null; "$BIN" down --home "$RESHARD_HOME" >/dev/null 2>&1 || true; rm -rf "$RESHARD_HOME"; echo "raw results and the proxy log: $OUT" >&2' EXIT
CONFIG="$RESHARD_HOME/shardgate.toml"
cat >>"$CONFIG" <<'EOF'

[[sharding.tables]]
name = "items"
column = "id"
type = "int8"

[reshard]
cleanup_after = "0s"
EOF
kill -HUP "$(cat "$RESHARD_HOME/shardgate.pid")"
sleep 1

S0=$BASE_PORT
S1=$((BASE_PORT + 10))
S2=$((BASE_PORT + 20))
direct() { PGPASSWORD=postgres "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d app -v ON_ERROR_STOP=1 "${@:2}"; }
admin() { "$BIN" admin --config "$CONFIG" "$@"; }
# The bucket of an int8 key, computed by Postgres (the `postgres` hash).
bucket() { echo "((hashint8extended($1, 8816678312871386365)::numeric + 23752253665144318179) % 18446744073709551616 % 1024)::int8"; }
now() { date +%s.%N; }

PGPASSWORD=app "$PGBIN/psql" -X -q -h 127.0.0.1 -p 8432 -U app -d app \
  -c "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL, pad text NOT NULL)"
for s in "$S0:0:341" "$S1:342:682" "$S2:683:1023"; do
  IFS=: read -r port lo hi <<<"$s"
  direct "$port" -c "INSERT INTO items SELECT g, g, repeat('x', 80) FROM generate_series(1, $ROWS) g WHERE $(bucket g) BETWEEN $lo AND $hi" \
    -c "VACUUM ANALYZE items"
done

cat >"$OUT/update.sql" <<EOF
\set id random(1, $ROWS)
UPDATE items SET v = v + 1 WHERE id = :id;
EOF
load() { # seconds name -> pgbench through shardgate at RATE tps, with a per-transaction log
  PGPASSWORD=app "$PGBIN/pgbench" -n -h 127.0.0.1 -p 8432 -U app -c 4 -j 2 -R "$RATE" -T "$1" \
    -l --log-prefix="$OUT/log-$2" -f "$OUT/update.sql" app >"$OUT/pgbench-$2.txt" 2>&1
}

# 2. Copy throughput: the raw pipe, then the move, side by side.
direct "$S2" -c "CREATE TABLE items_raw (LIKE items INCLUDING ALL)"
t0=$(now)
direct "$S0" -c "COPY (SELECT * FROM items WHERE $(bucket id) BETWEEN 0 AND 170) TO STDOUT" |
  direct "$S2" -c "COPY items_raw FROM STDIN"
t1=$(now)
raw_rows=$(direct "$S2" -At -c "SELECT count(*) FROM items_raw")
raw_bytes=$(direct "$S2" -At -c "SELECT sum(pg_column_size(t.*)) FROM items_raw t")
direct "$S2" -c "DROP TABLE items_raw"
load "${COPY_LOAD:-40}" copy &
LOAD=$!
sleep 2
admin --json reshard move --buckets 0-170 --to s2 --detach >/dev/null
max_lag=0
while :; do
  admin --json reshard status >"$OUT/status.json"
  lag=$(jq '[.moves[] | select(.phase != "done") | .lag_bytes] | max // 0' "$OUT/status.json")
  [ "$lag" -gt "$max_lag" ] && max_lag=$lag
  jq -e '.moves | all(.phase == "done" or .phase == "failed" or .phase == "aborted")' "$OUT/status.json" >/dev/null && break
  sleep 0.2
done
wait $LOAD || true
jq '.moves[-1]' "$OUT/status.json" >"$OUT/copy-move.json"
jq -e '.phase == "done"' "$OUT/copy-move.json" >/dev/null || { cat "$OUT/copy-move.json"; exit 1; }
awk -v r="$raw_rows" -v b="$raw_bytes" -v t="$(echo "$t1 - $t0" | bc)" -v f="$OUT/copy-move.json" -v lag="$max_lag" '
  BEGIN {
    cmd = "jq -r \"[.rows_total, .bytes_total, (.copied_unix_ms - .copy_started_unix_ms), .pause_ms] | @tsv\" " f
    cmd | getline line; split(line, m, "\t")
    mt = m[3] / 1000
    printf "| copy of buckets 0-170 (s0 -> s2) | rows | seconds | rows/s | MB/s |\n|---|---|---|---|---|\n"
    printf "| raw COPY pipe | %d | %.2f | %.0f | %.1f |\n", r, t, r / t, b / t / 1e6
    printf "| reshard move (copy phase) | %d | %.2f | %.0f | %.1f |\n", m[1], mt, m[1] / mt, m[2] / mt / 1e6
    printf "\nmove / raw pipe: %.2f (rows/s); largest replication lag during the move: %d bytes; its cutover pause: %d ms\n\n", (m[1] / mt) / (r / t), lag, m[4]
  }'

# 3. Cutover pauses of small moves under load.
load "${PAUSE_LOAD:-60}" pause &
LOAD=$!
sleep 2
for i in $(seq 1 "$MOVES"); do
  if [ $((i % 2)) -eq 1 ]; then to=s2; else to=s1; fi
  admin --json reshard move --buckets 600-607 --to "$to" >"$OUT/move-$i.json"
  # Wait for the cleanup too: the next move starts after it.
  while ! admin --json reshard status | jq -e '.moves | all(.phase == "done" or .phase == "failed" or .phase == "aborted")' >/dev/null; do
    sleep 0.1
  done
done
wait $LOAD || true
admin --json reshard status >"$OUT/pauses.json"
jq -r --argjson n "$MOVES" '
  [.moves[-$n:][] | .pause_ms] | sort as $p
  | "| moves | pause p50 (ms) | pause p99 (ms) | pause max (ms) | every pause (ms) |\n|---|---|---|---|---|\n| \($p | length) | \($p[($p | length) / 2 | floor]) | \($p[(($p | length) * 0.99 | floor)]) | \($p | max) | \([$p[]] | map(tostring) | join(" ")) |"
' "$OUT/pauses.json"
echo
echo "| pgbench load | transactions | failed | clients aborted | latency max (ms) |"
echo "|---|---|---|---|---|"
for name in copy pause; do
  f="$OUT/pgbench-$name.txt"
  tx=$(grep -oP 'number of transactions actually processed: \K[0-9]+' "$f" || echo 0)
  failed=$(grep -oP 'number of failed transactions: \K[0-9]+' "$f" || echo 0)
  aborted=$(grep -c 'aborted in command' "$f" || true)
  max=$(cat "$OUT"/log-"$name".* | awk '$3 ~ /^[0-9]+$/ && $3 > m { m = $3 } END { printf "%.1f", m / 1000 }')
  echo "| during the $name moves | $tx | $failed | $aborted | $max |"
done
