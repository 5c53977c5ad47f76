#!/usr/bin/env bash
# Failover drills, N per mode, on a local topology of their own, with the
# results as a markdown table. Run as root from the repository:
#
#   bench/failover-drill.sh                 # 10 kill, 10 stop, 10 switchover (~5 min)
#   N=3 MODES="kill" bench/failover-drill.sh
#
# What it does:
#   1. `shardgate up` in DRILL_HOME (default /tmp/shardgate-drill) on
#      BASE_PORT (default 17000): shard s0 = primary BASE_PORT and streaming
#      replicas BASE_PORT+1, BASE_PORT+2 (asynchronous replication); the proxy
#      on 127.0.0.1:7432, admin API on 127.0.0.1:7433.
#   2. For each mode and run: `shardgate admin drill failover --shard s0
#      --mode MODE --json` (4 writer clients through the proxy; fault 2 s in;
#      load stops 3 s after the new primary appears), then
#      `shardgate admin rejoin` of the old primary (pg_rewind) — and of any
#      replica the report says does not follow the new primary — so the
#      shard has two replicas again for the next run.
#   3. Prints per mode: detection and promotion time, the clients' write gap
#      (per-run median and worst client), client errors and acknowledged
#      writes missing afterwards — p50 and max over the runs. Raw JSON per
#      run goes to $OUT/drill-<mode>-<n>.json (a temp dir unless OUT is set).
#   4. `shardgate down` and removes DRILL_HOME (unless KEEP=1: then the
#      topology keeps running for a look at the servers' logs).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10}
MODES=${MODES:-"kill stop switchover"}
DRILL_HOME=${DRILL_HOME:-/tmp/shardgate-drill}
BASE_PORT=${BASE_PORT:-17000}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cargo build --release --quiet
BIN=target/release/shardgate
rm -rf "$DRILL_HOME"
"$BIN" up --home "$DRILL_HOME" --base-port "$BASE_PORT" \
  --listen 127.0.0.1:7432 --metrics-listen 127.0.0.1:7930 --admin-listen 127.0.0.1:7433 >/dev/null
trap 'cp "$DRILL_HOME/shardgate.log" "$OUT/" 2>/dev/null; [ -n "${KEEP:-}" ] || { "$BIN" down --home "$DRILL_HOME" >/dev/null 2>&1 || true; rm -rf "$DRILL_HOME"; }; echo "raw results and the proxy log: $OUT" >&2' EXIT
CONFIG="$DRILL_HOME/shardgate.toml"
export PGPASSWORD=postgres

data_dir() {
  case "${1##*:}" in
    "$BASE_PORT") echo "$DRILL_HOME/s0-primary" ;;
    $((BASE_PORT + 1))) echo "$DRILL_HOME/s0-replica1" ;;
    $((BASE_PORT + 2))) echo "$DRILL_HOME/s0-replica2" ;;
  esac
}

sleep 2
for mode in $MODES; do
  for i in $(seq 1 "$N"); do
    f="$OUT/drill-$mode-$i.json"
    "$BIN" admin --config "$CONFIG" --json drill failover --shard s0 --mode "$mode" \
      --i-understand-this-fails-the-primary >"$f"
    old=$(jq -r .old_primary "$f")
    echo "$mode $i: $(jq -c '{detect_ms, promote_ms, pause_ms, write_gap_p50_ms, write_gap_max_ms, errors, missing_acknowledged}' "$f")" >&2
    for server in "$old" $(jq -r '.not_repointed[]' "$f"); do
      "$BIN" admin --config "$CONFIG" rejoin --server "$server" --data-dir "$(data_dir "$server")" >/dev/null
    done
    sleep 1
  done
done

echo
echo "| mode | runs | detect p50 / max (ms) | promote p50 / max (ms) | write pause p50 / max (ms) | client write gap p50 / max (ms) | client errors (total) | acked writes missing (total) |"
echo "|---|---|---|---|---|---|---|---|"
for mode in $MODES; do
  jq -s -r --arg mode "$mode" '
    def p50: sort | .[(length / 2 | floor)];
    def mx: max;
    "| \($mode) | \(length) | \(map(.detect_ms) | p50) / \(map(.detect_ms) | mx) | \(map(.promote_ms) | p50) / \(map(.promote_ms) | mx) | \(map(.pause_ms) | p50) / \(map(.pause_ms) | mx) | \(map(.write_gap_p50_ms) | p50) / \(map(.write_gap_max_ms) | mx) | \(map(.errors | to_entries | map(.value) | add // 0) | add) | \(map(.missing_acknowledged) | add) |"
  ' "$OUT"/drill-"$mode"-*.json
done
