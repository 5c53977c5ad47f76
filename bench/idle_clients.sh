#!/usr/bin/env bash
# Memory of idle clients: opens N authenticated, idle client connections to
# shardgate and reports the proxy's resident memory (VmRSS) before, while
# they are held, and after they are closed.
#
#   bench/idle_clients.sh            # 10,000 connections
#   N=500 bench/idle_clients.sh      # a quick check
#
# The connections are opened by bench/idle_clients.py (Python 3 standard
# library only: startup packet and SCRAM-SHA-256 by hand, no pip install),
# at most CONCURRENCY attempts in flight so the listen backlog is not
# overrun. Each one authenticates as app/app, reaches ReadyForQuery and then
# sits idle.
#
# Environment (defaults in brackets):
#   N               connections [10000]
#   SHARDGATE       proxy binary, used for `up` when the proxy is not
#                   running [target/release/shardgate]
#   SHARDGATE_HOME  topology home; the proxy pid is in $SHARDGATE_HOME/shardgate.pid [/tmp/shardgate]
#   BASE_PORT, SG_PORT, METRICS_PORT  as for `shardgate up` [16000, 6432, 9930]
#   CONCURRENCY     connection attempts in flight [100]
#   SETTLE          seconds to wait before each RSS reading [2]
#
# Open files: this script raises its own limit (ulimit -n 65536, or the hard
# limit when that is lower). The proxy needs N + its server connections; if
# its soft limit is lower, it is raised with prlimit up to its hard limit,
# and the script says so (and warns if even the hard limit is too low).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

N=${N:-10000}
SHARDGATE=${SHARDGATE:-target/release/shardgate}
SHARDGATE_HOME=${SHARDGATE_HOME:-/tmp/shardgate}
BASE_PORT=${BASE_PORT:-16000}
SG_PORT=${SG_PORT:-6432}
METRICS_PORT=${METRICS_PORT:-9930}
CONCURRENCY=${CONCURRENCY:-100}
SETTLE=${SETTLE:-2}

log() { printf '%s\n' "$*" >&2; }
die() { log "idle_clients.sh: $*"; exit 1; }

[[ $N =~ ^[0-9]+$ && $N -gt 0 ]] || die "N must be a positive number, got '$N'"
command -v python3 >/dev/null || die "python3 is required"

proxy_pid() {
    local pid
    pid=$(cat "$SHARDGATE_HOME/shardgate.pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

if ! PID=$(proxy_pid); then
    if [[ ! -x $SHARDGATE ]]; then
        [[ $SHARDGATE == target/release/shardgate ]] || die "SHARDGATE=$SHARDGATE is not an executable"
        log "== $SHARDGATE missing: cargo build --release"
        cargo build --release
    fi
    log "== no proxy running for $SHARDGATE_HOME: $SHARDGATE up"
    "$SHARDGATE" up --home "$SHARDGATE_HOME" --base-port "$BASE_PORT" \
        --listen "127.0.0.1:$SG_PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" >&2
    PID=$(proxy_pid) || die "no live pid in $SHARDGATE_HOME/shardgate.pid after up"
fi

# ---- open-file limits: ours, then the proxy's.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < N + 50)); then
    log "warning: this shell may open only $(ulimit -n) files (hard limit $(ulimit -Hn)); some of the $N connections will fail"
fi
limits() { awk '/^Max open files/{print $4, $5}' "/proc/$PID/limits"; }
read -r p_soft p_hard < <(limits)
need=$((N + 200))
log "proxy pid $PID: open files soft $p_soft, hard $p_hard (needs about $need)"
if [[ $p_soft != unlimited ]] && ((p_soft < need)); then
    want=$need
    [[ $p_hard != unlimited ]] && ((p_hard < want)) && want=$p_hard
    if ((want > p_soft)) && prlimit --pid "$PID" --nofile="$want:$p_hard" 2>/dev/null; then
        log "raised the proxy's soft open-file limit with prlimit: $p_soft -> $want"
    fi
    read -r p_soft p_hard < <(limits)
    if ((p_soft < need)); then
        log "WARNING: the proxy may open only $p_soft files (hard $p_hard) < $need: raise its limit (e.g. ulimit -n before \`shardgate up\`, or LimitNOFILE= under systemd)"
    fi
fi

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$PID/status"; }
clients_gauge() {
    command -v curl >/dev/null || return 0
    curl -fs --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null |
        awk '$1=="shardgate_clients_active"{printf " (shardgate_clients_active %s)", $2}' || true
}
mib() { awk -v k="$1" 'BEGIN{printf "%.1f MiB", k/1024}'; }

sleep "$SETTLE"
before=$(rss_kib)
log "== RSS before: $(mib "$before")$(clients_gauge)"

# ---- open and hold the connections.
coproc OPENER { exec python3 "$ROOT/bench/idle_clients.py" -n "$N" --host 127.0.0.1 --port "$SG_PORT" \
    --user app --password app --database app --concurrency "$CONCURRENCY"; }
OPENER_PID=$OPENER_PID
trap 'kill "$OPENER_PID" 2>/dev/null || true' EXIT
exec {to_opener}>&"${OPENER[1]}" {from_opener}<&"${OPENER[0]}"

log "== opening $N connections to 127.0.0.1:$SG_PORT"
read -r ready <&"$from_opener" || die "the connection opener died before reporting"
log "   $ready"
[[ $ready =~ ok=([0-9]+) ]] && ok=${BASH_REMATCH[1]} || die "unexpected line from the opener: $ready"

sleep "$SETTLE"
held=$(rss_kib)
echo check >&"$to_opener"
read -r open_line <&"$from_opener"
still_open=${open_line#OPEN }
log "== RSS with $ok idle clients: $(mib "$held")$(clients_gauge); $still_open of them still open"

echo close >&"$to_opener"
read -r closed <&"$from_opener" || true
wait "$OPENER_PID" 2>/dev/null || true
trap - EXIT
sleep "$SETTLE"
after=$(rss_kib)
log "== RSS after closing: $(mib "$after")$(clients_gauge)"

per_conn=$(awk -v a="$held" -v b="$before" -v n="$ok" 'BEGIN{ if (n>0) printf "%.1f", (a-b)/n; else print "n/a" }')
cat <<EOF

| proxy pid | connections requested | opened | still open when measured | RSS before | RSS with clients | RSS after close | KiB per idle client |
|---|---:|---:|---:|---:|---:|---:|---:|
| $PID | $N | $ok | $still_open | $(mib "$before") | $(mib "$held") | $(mib "$after") | $per_conn |
EOF
if [[ $ready == *failed=0* ]]; then :; else
    log "note: some connections failed: $ready"
fi
