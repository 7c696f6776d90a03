#!/bin/bash
# A real dockerd publishing a TCP port range (IPv6 on, so two entries per port), with each way
# of serving it in the same run:
#   docker-proxy                 dockerd's userland proxy, a process per entry
#   rproxy (drop-in)             rproxy as dockerd's userland-proxy-path, a process per entry
#   rproxy + daemon (shims)      the same with an `rproxy daemon` the shims hand their ports to
#   none, --userland-proxy=false dockerd alone (DNAT only): the baseline, no process at all
#   rproxy daemon --docker-ports dockerd --userland-proxy=false and the daemon following its API
#                                (socket hooks for host clients), no process per port
# The last two run dockerd with `--userland-proxy=false --experimental --ip6tables` (20.10
# needs both for IPv6 DNAT).
# Reports per row: `docker run` and `docker rm -f` times, and what serving the range added:
# processes, threads and summed PSS (/proc/PID/smaps_rollup, which shares pages fairly). For
# the userland-proxy rows that is every per-port process; for a row with a daemon, also the
# daemon's own growth: its PSS and threads with the range minus the same before `docker run`
# (the `--docker-ports` row is measured once the daemon lists all entries, `rproxy ls`); and
# that sum divided by the processes added (for the shims, their daemon's growth included).
# The floor beside them: as many `sleep` processes as the range has entries, measured the
# same way (a process that only waits, linked against the same libc).
#
#   usage (root): benches/dockerd_ports.sh [PORTS=500] [FIRST=20000]
#   IPTABLES=false runs dockerd with --iptables=false, to see the proxies' own share of the
#   start and removal times (dockerd's iptables calls otherwise dominate them); the two
#   `--userland-proxy=false` rows need dockerd's DNAT and are left out then.
# Needs docker.io (dockerd, containerd, docker-proxy) and busybox-static: .ci/install-deps.
# Runs its own containerd and dockerd (own data/exec roots and socket), holding the lock the
# dockerd tests hold (/run/lock/rproxy-dockerd-test.lock, waiting for it), so it never runs
# beside one of them; any other dockerd must be stopped first (two fight over docker0). Puts
# back what dockerd changes on the host: IPv4/IPv6 forwarding and iptables'/ip6tables' FORWARD
# policy.
set -euo pipefail
cd "$(dirname "$0")/.."
PORTS=${1:-500}
FIRST=${2:-20000}
LAST=$((FIRST + PORTS - 1))
[ "$(id -u)" = 0 ] || { echo "needs root (runs dockerd)" >&2; exit 1; }
cargo build --release -q
RPROXY=$PWD/target/release/rproxy
DOCKER_PROXY=${DOCKER_PROXY:-/usr/sbin/docker-proxy}
DOCKER=/usr/bin/docker; [ -x $DOCKER ] || DOCKER=docker

# Held until the script exits; its children do not inherit it (9>&- on each).
LOCK=/run/lock/rproxy-dockerd-test.lock
exec 9>>"$LOCK"
if ! flock -n -x 9; then
    echo "waiting for $LOCK (a dockerd test or another run holds it)" >&2
    flock -x 9
fi
if pgrep -x dockerd >/dev/null; then echo "another dockerd runs; stop it first" >&2; exit 1; fi

TMP=$(mktemp -d /tmp/rproxy-bench.XXXXXX)
SOCK=$TMP/docker.sock
CTL=$TMP/rproxy.sock
SYSCTLS="/proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding /proc/sys/net/ipv6/conf/default/forwarding"
SAVED=$(for f in $SYSCTLS; do [ -r "$f" ] && echo "$f $(cat "$f")"; done)
policy() { "$1" -S FORWARD 2>/dev/null | awk '/^-P FORWARD/ {print $3}'; }
POLICY4=$(policy iptables)
POLICY6=$(policy ip6tables)
CTD_PID='' DOCKERD_PID='' DAEMON_PID='' SLEEP_PIDS=()

cleanup() {
    set +e
    [ ${#SLEEP_PIDS[@]} -gt 0 ] && kill "${SLEEP_PIDS[@]}" 2>/dev/null
    [ -S "$SOCK" ] && $DOCKER -H "unix://$SOCK" rm -f bench >/dev/null 2>&1
    for pid in $DOCKERD_PID $DAEMON_PID $CTD_PID; do
        kill -TERM "$pid" 2>/dev/null; timeout 30 tail --pid="$pid" -f /dev/null; kill -KILL "$pid" 2>/dev/null
    done
    grep " $TMP" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$TMP"
    echo "$SAVED" | while read -r f v; do [ -n "$f" ] && echo "$v" > "$f"; done
    [ -n "$POLICY4" ] && iptables -P FORWARD "$POLICY4"
    # dockerd --ip6tables sets it to DROP too.
    [ -n "$POLICY6" ] && ip6tables -P FORWARD "$POLICY6"
}
trap cleanup EXIT

containerd --root "$TMP/ctd-root" --state "$TMP/ctd-state" --address "$TMP/ctd.sock" \
    >"$TMP/containerd.log" 2>&1 9>&- &
CTD_PID=$!
for _ in $(seq 100); do [ -S "$TMP/ctd.sock" ] && break; sleep 0.1; done

start_dockerd() { # on|off [proxy-path [env...]]: with a userland proxy (that one), or without
    local mode=$1 flags; shift
    if [ "$mode" = off ]; then
        flags=(--userland-proxy=false --experimental --ip6tables)
    else
        flags=(--userland-proxy-path "$1"); shift
    fi
    # dockerd 20.10 would write its identity key to /etc/docker/key.json: keep it in $TMP.
    echo "{ \"deprecated-key-path\": \"$TMP/key.json\" }" > "$TMP/daemon.json"
    env "$@" dockerd --config-file "$TMP/daemon.json" --data-root "$TMP/data" --exec-root "$TMP/exec" \
        --pidfile "$TMP/dockerd.pid" -H "unix://$SOCK" --containerd "$TMP/ctd.sock" \
        "${flags[@]}" --ipv6 --fixed-cidr-v6 fd00:bec:1::/64 \
        ${IPTABLES:+--iptables=$IPTABLES --ip6tables=$IPTABLES} \
        >"$TMP/dockerd.log" 2>&1 9>&- &
    DOCKERD_PID=$!
    for _ in $(seq 300); do $DOCKER -H "unix://$SOCK" info >/dev/null 2>&1 && return; sleep 0.2; done
    echo "dockerd did not start:" >&2; tail "$TMP/dockerd.log" >&2; exit 1
}

stop_dockerd() {
    kill -TERM "$DOCKERD_PID"; timeout 60 tail --pid="$DOCKERD_PID" -f /dev/null || kill -KILL "$DOCKERD_PID"
    DOCKERD_PID=
}

start_daemon() { # [flags...]: an rproxy daemon on $CTL, its own empty config
    echo 'publish = []' > "$TMP/rproxy.toml"
    env -u NOTIFY_SOCKET -u RPROXY_LOG_FILE -u RPROXY_METRICS_ADDR -u RPROXY_SOCKET \
        "$RPROXY" daemon --config "$TMP/rproxy.toml" --control-socket "$CTL" "$@" \
        >"$TMP/rproxy-daemon.log" 2>&1 9>&- &
    DAEMON_PID=$!
    for _ in $(seq 100); do
        "$RPROXY" ls --control-socket "$CTL" >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "rproxy daemon did not start:" >&2; tail "$TMP/rproxy-daemon.log" >&2; exit 1
}

stop_daemon() {
    kill -TERM "$DAEMON_PID"; timeout 30 tail --pid="$DAEMON_PID" -f /dev/null || kill -KILL "$DAEMON_PID"
    DAEMON_PID=
}

image() {
    $DOCKER -H "unix://$SOCK" image inspect bench-busybox >/dev/null 2>&1 && return
    mkdir -p "$TMP/img/bin"
    cp /bin/busybox "$TMP/img/bin/"
    ln -sf busybox "$TMP/img/bin/sleep"; ln -sf busybox "$TMP/img/bin/sh"
    tar -C "$TMP/img" -c . | $DOCKER -H "unix://$SOCK" import - bench-busybox >/dev/null
}

now() { date +%s.%N; }

# "processes threads pss_kb" summed over the given PIDs.
usage() {
    local procs=0 threads=0 pss=0 pid
    for pid in "$@"; do
        [ -r "/proc/$pid/smaps_rollup" ] || continue
        procs=$((procs + 1))
        threads=$((threads + $(awk '/^Threads:/ {print $2}' "/proc/$pid/status")))
        pss=$((pss + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")))
    done
    echo "$procs $threads $pss"
}

# Every process whose argv is a proxy invocation for our range (docker-proxy, rproxy, shims).
per_port() { pgrep -f -- "-host-port ($(seq -s'|' "$FIRST" "$LAST"))( |$)" || true; }

# How many entries of the container the daemon lists (its CONTAINER column, wherever it is).
served() {
    "$RPROXY" ls --control-socket "$CTL" 2>/dev/null | awk '
        NR == 1 { for (i = 1; i <= NF; i++) if ($i == "CONTAINER") c = i; next }
        c && $c == "bench" { n++ }
        END { print n + 0 }' || true
}

row() { # label daemon on|off [proxy-path [env...]]; daemon: "-", "shims" or "docker-ports"
    local label=$1 daemon=$2; shift 2
    start_dockerd "$@"
    image
    case $daemon in
        shims) start_daemon ;;
        docker-ports) start_daemon --docker-ports --docker-host "unix://$SOCK" ;;
    esac
    local t0 t1 t2 t3 t_served='' d_threads=0 d_pss=0 a_threads a_pss procs threads pss
    if [ -n "$DAEMON_PID" ]; then read -r _ d_threads d_pss < <(usage "$DAEMON_PID"); fi
    t0=$(now)
    $DOCKER -H "unix://$SOCK" run -d --name bench -p "$FIRST-$LAST:$FIRST-$LAST" bench-busybox sleep 1d >/dev/null
    t1=$(now)
    if [ "$daemon" = docker-ports ]; then
        for _ in $(seq 1200); do [ "$(served)" -ge $((2 * PORTS)) ] && break; sleep 0.1; done
        t_served=$(now)
        [ "$(served)" -ge $((2 * PORTS)) ] || echo "$label: only $(served) of $((2 * PORTS)) entries served" >&2
    fi
    sleep 2
    # shellcheck disable=SC2046 # one PID per word
    read -r procs threads pss < <(usage $(per_port))
    if [ -n "$DAEMON_PID" ]; then
        read -r _ a_threads a_pss < <(usage "$DAEMON_PID")
        threads=$((threads + a_threads - d_threads))
        pss=$((pss + a_pss - d_pss))
    fi
    t2=$(now)
    $DOCKER -H "unix://$SOCK" rm -f bench >/dev/null
    t3=$(now)
    if [ -n "$DAEMON_PID" ]; then stop_daemon; fi
    stop_dockerd
    if [ -n "$t_served" ]; then
        awk -v l="$label" -v a="$t0" -v b="$t1" -v c="$t_served" -v n=$((2 * PORTS)) \
            'BEGIN { printf "%s: all %d entries served %.1f s after docker run started (%.1f s after it returned)\n", l, n, c - a, c - b }' >&2
    fi
    awk -v l="$label" -v s="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
        -v r="$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')" \
        -v p="$procs" -v t="$threads" -v m="$pss" \
        'BEGIN { per = "–"; if (p > 0) per = sprintf("%.0f KiB", m / p)
                 printf "| %s | %.1f s | %.1f s | %d | %d | %.1f MiB | %s |\n", l, s, r, p, t, m / 1024, per }'
}

floor() { # n: the table's columns for n `sleep` processes, the least a waiting process costs
    local n=$1 procs threads pss
    for _ in $(seq "$n"); do sleep 1d 9>&- & SLEEP_PIDS+=($!); done
    sleep 2
    read -r procs threads pss < <(usage "${SLEEP_PIDS[@]}")
    kill "${SLEEP_PIDS[@]}"; wait "${SLEEP_PIDS[@]}" 2>/dev/null || true
    SLEEP_PIDS=()
    awk -v n="$n" -v p="$procs" -v t="$threads" -v m="$pss" \
        'BEGIN { printf "| floor: %d `sleep` processes | – | – | %d | %d | %.1f MiB | %.0f KiB |\n", n, p, t, m / 1024, m / p }'
}

echo "| serving dockerd's $PORTS-port TCP range (IPv4+IPv6) | docker run | docker rm -f | processes added | threads added | summed PSS added | PSS per process |"
echo "|---|---|---|---|---|---|---|"
if [ -x "$DOCKER_PROXY" ]; then row docker-proxy - on "$DOCKER_PROXY"; fi
row "rproxy (drop-in)" - on "$RPROXY" RPROXY_SOCKET="$CTL"
row "rproxy + daemon (shims)" shims on "$RPROXY" RPROXY_SOCKET="$CTL"
floor $((2 * PORTS))
if [ "${IPTABLES:-true}" = false ]; then
    echo "(dockerd --iptables=false: no DNAT, so no --userland-proxy=false rows)" >&2
    exit 0
fi
row "none: dockerd \`--userland-proxy=false\`" - off
row "rproxy daemon \`--docker-ports\`, dockerd \`--userland-proxy=false\`" docker-ports off
