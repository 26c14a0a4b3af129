#!/usr/bin/env bash
# Gateway benchmark: wrk through skiff's gateway, directly to the same
# server, and through nginx as a reverse proxy to it, all in one run.
#
#   bench/gateway.sh            (as root; needs wrk and nginx on the host:
#                                apt-get install wrk nginx-light)
#
# With SKIFF_BASELINE=/path/to/another/skiff (e.g. a release build of the
# commit before a change), that build's gateway serves the same service
# from a daemon of its own, measured in turn with this one.
#
# The server is nginx itself (a small keep-alive answer) running as a skiff
# service. "Direct" and the nginx reverse proxy run inside the service's
# network namespace (nsenter), as the gateway reaches it from there too.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in wrk nginx nsenter; do
    command -v "$tool" >/dev/null || { echo "bench/gateway.sh needs $tool: apt-get install wrk nginx-light" >&2; exit 1; }
done
DURATION=${DURATION:-10s}
cargo build --release -q
SKIFF=$PWD/target/release/skiff

work=$(mktemp -d)
skiff_pid=""
base_pid=""
proxy_pid=""
cleanup() {
    [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null || true
    [ -n "$skiff_pid" ] && kill -TERM "$skiff_pid" 2>/dev/null && wait "$skiff_pid" 2>/dev/null || true
    [ -n "$base_pid" ] && kill -TERM "$base_pid" 2>/dev/null && wait "$base_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/app"
cat > "$work/app/nginx.conf.in" <<'CONF'
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    keepalive_requests 10000000;
    server {
        listen PORT;
        location / { return 200 "ok\n"; }
    }
}
CONF
cat > "$work/app/skiff.toml" <<'TOML'
name = "bench-nginx"
build = "apt-get update && apt-get install -y --no-install-recommends nginx-light"
start = "sed s/PORT/$PORT/ /app/nginx.conf.in > /tmp/nginx.conf && exec nginx -c /tmp/nginx.conf"
[limits]
concurrency = 10000
max_instances = 1
idle_suspend = "1h"
idle_stop = "1h"
TOML

# Runs `skiff up` of the app with the binary $1, its files under $work/$2;
# its pid goes into the variable named $3 (at once, for the cleanup), its
# gateway's port into the one named $4, once it serves.
start_up() {
    "$1" up "$work/app" --listen 127.0.0.1:0 --api 127.0.0.1:0 --state "$work/$2-state" > "$work/$2.out" 2> "$work/$2.err" &
    printf -v "$3" %s $!
    for _ in $(seq 1 600); do
        grep -q '^http://' "$work/$2.out" 2>/dev/null && break
        kill -0 "${!3}" 2>/dev/null || { cat "$work/$2.err" >&2; exit 1; }
        sleep 0.5
    done
    local url
    url=$(grep -m1 '^http://' "$work/$2.out")
    url=${url##*:}
    printf -v "$4" %s "${url%/}"
}
start_up "$SKIFF" up skiff_pid gw_port
cg=$(ls -d /sys/fs/cgroup/unified/skiff/bench-nginx-* | head -1)
base_port=""
if [ -n "${SKIFF_BASELINE:-}" ]; then
    start_up "$SKIFF_BASELINE" base base_pid base_port
fi
inst_pid=$(head -1 "$cg/cgroup.procs")
netns=/proc/$inst_pid/ns/net

# nginx as a reverse proxy to the same server, inside the same namespace.
cat > "$work/proxy.conf" <<CONF
worker_processes 2;
daemon off;
pid $work/proxy.pid;
error_log $work/proxy.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    # Like the service (and skiff): one connection serves every request.
    # With nginx's default of 1000, wrk reconnects every 1000 requests,
    # and each new connection lets the kernel place the processes anew,
    # which at one connection moves the p50 more than the proxy does.
    keepalive_requests 10000000;
    upstream app { server 127.0.0.1:8080; keepalive 128; }
    server {
        listen 127.0.0.1:18080;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
nsenter --net="$netns" nginx -c "$work/proxy.conf" &
proxy_pid=$!
sleep 1

# Each measurement is repeated ROUNDS times, the three setups taking turns
# so that drifts of this shared machine hit all of them alike; the median
# of each is reported.
ROUNDS=${ROUNDS:-3}
run() { # label, then the command
    local label=$1; shift
    "$@" > "$work/wrk.txt" 2>&1
    awk '/Requests\/sec/ {print $2}' "$work/wrk.txt" >> "$work/$label.rps"
    awk '$1=="50%" {print $2}' "$work/wrk.txt" >> "$work/$label.p50"
    awk '$1=="99%" {print $2}' "$work/wrk.txt" >> "$work/$label.p99"
}
median() { # file; values sorted numerically by their number part (us/ms aware)
    [ -s "$1" ] || { echo "-"; return; }
    awk '{ v=$1; n=v+0; if (v ~ /ms$/) n*=1000; else if (v ~ /[0-9]s$/ && v !~ /us$/) n*=1000000; print n, v }' "$1" \
        | sort -n | awk '{ a[NR]=$2 } END { print a[int((NR+1)/2)] }'
}
report() {
    printf '%-28s %12s req/s   p50 %-9s p99 %-9s runs: %s\n' "$1" "$(median "$work/$1.rps")" "$(median "$work/$1.p50")" "$(median "$work/$1.p99")" \
        "$(awk '{ printf "%s%.0f", (NR > 1 ? " " : ""), $1 }' "$work/$1.rps")"
}
wrk_in_ns() { nsenter --net="$netns" wrk "$@"; }
H="Host: bench-nginx.localhost"

for _ in $(seq 1 "$ROUNDS"); do
    run direct-64 wrk_in_ns -t2 -c64 -d"$DURATION" http://127.0.0.1:8080/
    run nginx-proxy-64 wrk_in_ns -t2 -c64 -d"$DURATION" http://127.0.0.1:18080/
    run skiff-64 wrk -t2 -c64 -d"$DURATION" -H "$H" "http://127.0.0.1:$gw_port/"
    if [ -n "$base_port" ]; then run baseline-64 wrk -t2 -c64 -d"$DURATION" -H "$H" "http://127.0.0.1:$base_port/"; fi
    run direct-1 wrk_in_ns -t1 -c1 -d"$DURATION" --latency http://127.0.0.1:8080/
    run nginx-proxy-1 wrk_in_ns -t1 -c1 -d"$DURATION" --latency http://127.0.0.1:18080/
    run skiff-1 wrk -t1 -c1 -d"$DURATION" --latency -H "$H" "http://127.0.0.1:$gw_port/"
    if [ -n "$base_port" ]; then run baseline-1 wrk -t1 -c1 -d"$DURATION" --latency -H "$H" "http://127.0.0.1:$base_port/"; fi
done

echo "64 connections, 2 threads, median of $ROUNDS runs of $DURATION:"
report direct-64; report nginx-proxy-64; report skiff-64
echo "1 connection, latency, median of $ROUNDS runs:"
report direct-1; report nginx-proxy-1; report skiff-1
ratio() { awk -v a="$(median "$work/$1.rps")" -v b="$(median "$work/$2.rps")" 'BEGIN { printf "%.2f", a / b }'; }
echo "ratios at 64 connections: skiff/direct $(ratio skiff-64 direct-64), nginx/direct $(ratio nginx-proxy-64 direct-64), skiff/nginx $(ratio skiff-64 nginx-proxy-64)"
if [ -n "$base_port" ]; then
    echo "baseline build ($SKIFF_BASELINE), in turn with this one:"
    report baseline-64; report baseline-1
    echo "this build / baseline: 64 connections $(ratio skiff-64 baseline-64), 1 connection $(ratio skiff-1 baseline-1)"
fi
