#!/bin/bash
# A real dockerd publishing a TCP port range (IPv6 on, so two proxies per port), with each
# userland proxy in the same run: docker-proxy, rproxy alone, rproxy with its daemon.
# Reports container start and removal time, proxy processes, threads and summed PSS (from
# /proc/PID/smaps_rollup, which shares pages fairly) of every proxy process incl. the daemon.
#
#   usage (root): benches/dockerd_ports.sh [PORTS=500] [FIRST=20000]
#   IPTABLES=false runs dockerd with --iptables=false, to see the proxies' own share of the
#   start and removal times (dockerd's iptables calls otherwise dominate them).
# Needs docker.io (dockerd, containerd, docker-proxy) and busybox-static: .ci/install-deps.
# Runs its own containerd and dockerd (own data/exec roots and socket); stop any other dockerd
# first, since two dockerds fight over docker0.
set -euo pipefail
cd "$(dirname "$0")/.."
PORTS=${1:-500}
FIRST=${2:-20000}
LAST=$((FIRST + PORTS - 1))
[ "$(id -u)" = 0 ] || { echo "needs root (runs dockerd)" >&2; exit 1; }
if pgrep -x dockerd >/dev/null; then echo "another dockerd runs; stop it first" >&2; exit 1; fi
cargo build --release -q
RPROXY=$PWD/target/release/rproxy
DOCKER_PROXY=${DOCKER_PROXY:-/usr/sbin/docker-proxy}
DOCKER=/usr/bin/docker; [ -x $DOCKER ] || DOCKER=docker
TMP=$(mktemp -d /tmp/rproxy-bench.XXXXXX)
SOCK=$TMP/docker.sock
CTL=$TMP/rproxy.sock
FWD=$(cat /proc/sys/net/ipv4/ip_forward)
POLICY=$(iptables -S FORWARD 2>/dev/null | awk '/^-P FORWARD/ {print $3}')
CTD_PID= DOCKERD_PID= DAEMON_PID=

cleanup() {
    set +e
    [ -S "$SOCK" ] && $DOCKER -H unix://$SOCK rm -f bench >/dev/null 2>&1
    for pid in $DOCKERD_PID $DAEMON_PID $CTD_PID; do
        kill -TERM "$pid" 2>/dev/null; timeout 30 tail --pid="$pid" -f /dev/null; kill -KILL "$pid" 2>/dev/null
    done
    grep " $TMP" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$TMP"
    echo "$FWD" > /proc/sys/net/ipv4/ip_forward
    [ -n "$POLICY" ] && iptables -P FORWARD "$POLICY"
}
trap cleanup EXIT

containerd --root "$TMP/ctd-root" --state "$TMP/ctd-state" --address "$TMP/ctd.sock" >"$TMP/containerd.log" 2>&1 &
CTD_PID=$!
for _ in $(seq 100); do [ -S "$TMP/ctd.sock" ] && break; sleep 0.1; done

start_dockerd() { # proxy-path [env...]
    local proxy=$1; shift
    # dockerd 20.10 would write its identity key to /etc/docker/key.json: keep it in $TMP.
    echo "{ \"deprecated-key-path\": \"$TMP/key.json\" }" > "$TMP/daemon.json"
    env "$@" dockerd --config-file "$TMP/daemon.json" --data-root "$TMP/data" --exec-root "$TMP/exec" \
        --pidfile "$TMP/dockerd.pid" -H "unix://$SOCK" --containerd "$TMP/ctd.sock" \
        --userland-proxy-path "$proxy" --ipv6 --fixed-cidr-v6 fd00:bec:1::/64 \
        ${IPTABLES:+--iptables=$IPTABLES --ip6tables=$IPTABLES} \
        >"$TMP/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 300); do $DOCKER -H unix://$SOCK info >/dev/null 2>&1 && return; sleep 0.2; done
    echo "dockerd did not start:" >&2; tail "$TMP/dockerd.log" >&2; exit 1
}

stop_dockerd() {
    kill -TERM $DOCKERD_PID; timeout 60 tail --pid=$DOCKERD_PID -f /dev/null || kill -KILL $DOCKERD_PID
    DOCKERD_PID=
}

image() {
    $DOCKER -H unix://$SOCK image inspect bench-busybox >/dev/null 2>&1 && return
    mkdir -p "$TMP/img/bin"
    cp /bin/busybox "$TMP/img/bin/"
    ln -sf busybox "$TMP/img/bin/sleep"; ln -sf busybox "$TMP/img/bin/sh"
    tar -C "$TMP/img" -c . | $DOCKER -H unix://$SOCK import - bench-busybox >/dev/null
}

now() { date +%s.%N; }

# Proxy processes: every process whose argv is a proxy invocation for our range, plus the daemon.
measure() { # label
    local procs=0 threads=0 pss=0 pid
    for pid in $(pgrep -f -- "-host-port ($(seq -s'|' $FIRST $LAST))( |$)") $DAEMON_PID; do
        [ -r /proc/$pid/smaps_rollup ] || continue
        procs=$((procs + 1))
        threads=$((threads + $(awk '/^Threads:/ {print $2}' /proc/$pid/status)))
        pss=$((pss + $(awk '/^Pss:/ {print $2}' /proc/$pid/smaps_rollup)))
    done
    echo "$procs $threads $pss"
}

run() { # label proxy-path [env...]
    local label=$1; shift
    start_dockerd "$@"
    image
    local t0 t1 t2 t3
    t0=$(now)
    $DOCKER -H unix://$SOCK run -d --name bench -p "$FIRST-$LAST:$FIRST-$LAST" bench-busybox sleep 1d >/dev/null
    t1=$(now)
    sleep 2
    read -r procs threads pss < <(measure)
    t2=$(now)
    $DOCKER -H unix://$SOCK rm -f bench >/dev/null
    t3=$(now)
    stop_dockerd
    awk -v l="$label" -v s="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
        -v r="$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')" \
        -v p="$procs" -v t="$threads" -v m="$pss" \
        'BEGIN { printf "| %s | %.1f s | %.1f s | %d | %d | %.0f MB |\n", l, s, r, p, t, m / 1024 }'
}

echo "| proxy ($PORTS-port TCP range, IPv4+IPv6) | docker run | docker rm -f | processes | threads | summed PSS |"
echo "|---|---|---|---|---|---|"
[ -x "$DOCKER_PROXY" ] && run docker-proxy "$DOCKER_PROXY"
run "rproxy (drop-in)" "$RPROXY" RPROXY_SOCKET="$CTL"
"$RPROXY" daemon --control-socket "$CTL" >"$TMP/rproxy-daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do [ -S "$CTL" ] && break; sleep 0.1; done
run "rproxy + daemon" "$RPROXY" RPROXY_SOCKET="$CTL"
