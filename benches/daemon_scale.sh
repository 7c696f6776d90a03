#!/bin/sh
# One daemon, 1,000 TCP + 1,000 UDP mappings: time until every port listens, and the daemon's
# RSS/PSS/threads once idle. Medians of N runs.   usage: benches/daemon_scale.sh [N] [PORTS]
set -eu
cd "$(dirname "$0")/.."
N=${1:-5}
PORTS=${2:-1000}
cargo build --release -q
RPROXY=$PWD/target/release/rproxy
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
FIRST=21000
LAST=$((FIRST + PORTS - 1))
TFIRST=41000
TLAST=$((TFIRST + PORTS - 1))

listening() { # count our ports in ss output
    ss -Hltnu "sport >= :$FIRST and sport <= :$LAST" 2>/dev/null | wc -l
}

run_once() {
    start=$(date +%s%N)
    "$RPROXY" daemon --control-socket "$DIR/ctl.sock" \
        -p "127.0.0.1:$FIRST-$LAST:127.0.0.1:$TFIRST-$TLAST" \
        -p "127.0.0.1:$FIRST-$LAST:127.0.0.1:$TFIRST-$TLAST/udp" </dev/null >/dev/null 2>&1 &
    pid=$!
    while [ "$(listening)" -lt $((2 * PORTS)) ]; do
        kill -0 $pid 2>/dev/null || { echo "daemon died" >&2; exit 1; }
    done
    ready=$(( ($(date +%s%N) - start) / 1000000 ))
    sleep 1
    rss=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status)
    thr=$(awk '/^Threads:/ {print $2}' /proc/$pid/status)
    pss=$(awk '/^Pss:/ {print $2}' /proc/$pid/smaps_rollup)
    kill -TERM $pid; wait $pid 2>/dev/null || true
    echo "$ready $rss $pss $thr"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
out=$(i=0; while [ $i -lt "$N" ]; do run_once; i=$((i + 1)); done)
col() { echo "$out" | awk -v c="$1" '{print $c}' | median; }
echo "| mappings | all listening after | RSS | PSS | threads |"
echo "|---|---|---|---|---|"
awk -v p="$PORTS" -v r="$(col 1)" -v m="$(col 2)" -v s="$(col 3)" -v t="$(col 4)" \
    'BEGIN { printf "| %d TCP + %d UDP | %d ms | %.1f MB | %.1f MB | %d |\n", p, p, r, m / 1024, s / 1024, t }'
