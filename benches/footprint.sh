#!/bin/sh
# Idle footprint of one proxy process in docker-proxy mode: rproxy next to docker-proxy, same
# run, same mapping (loopback TCP and UDP). Prints a Markdown table of medians over N starts.
#   usage: benches/footprint.sh [N]      (builds target/release/rproxy first)
set -eu
cd "$(dirname "$0")/.."
N=${1:-5}
cargo build --release -q
RPROXY=$PWD/target/release/rproxy
DOCKER_PROXY=${DOCKER_PROXY:-/usr/sbin/docker-proxy}

measure() { # proxy proto port -> "rss_kb pss_kb threads"
    "$1" -proto "$2" -host-ip 127.0.0.1 -host-port "$3" -container-ip 127.0.0.1 -container-port 9 \
        </dev/null >/dev/null 2>&1 3>/dev/null &
    pid=$!
    sleep 1
    rss=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status)
    thr=$(awk '/^Threads:/ {print $2}' /proc/$pid/status)
    pss=$(awk '/^Pss:/ {print $2}' /proc/$pid/smaps_rollup)
    kill -INT $pid; wait $pid 2>/dev/null || true
    echo "$rss $pss $thr"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

row() { # name binary proto
    out=$(i=0; while [ $i -lt "$N" ]; do measure "$2" "$3" $((21000 + i)); i=$((i + 1)); done)
    rss=$(echo "$out" | awk '{print $1}' | median)
    pss=$(echo "$out" | awk '{print $2}' | median)
    thr=$(echo "$out" | awk '{print $3}' | median)
    awk -v n="$1" -v p="$3" -v r="$rss" -v s="$pss" -v t="$thr" \
        'BEGIN { printf "| %s | %s | %.1f MB | %.1f MB | %s |\n", n, p, r / 1024, s / 1024, t }'
}

echo "| proxy | proto | RSS | PSS | threads |"
echo "|---|---|---|---|---|"
for proto in tcp udp; do
    row rproxy "$RPROXY" $proto
    if [ -x "$DOCKER_PROXY" ]; then row docker-proxy "$DOCKER_PROXY" $proto; fi
done
