# shellcheck shell=bash disable=SC2034
# Shared helpers for scripts/bench.sh and scripts/upgrade-under-load.sh (sourced, not run).
#
# Everything started here is recorded by pid in STARTED_PIDS and stopped by `stop_all` (the
# callers install it as an EXIT trap). Traffic stays on 127.0.0.1. Config files and logs live
# in $WORK, a temporary folder removed at the end unless BENCH_KEEP=1.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/../.." && pwd)"
BATON="$ROOT/target/release/baton"
STARTED_PIDS=()
CLK_TCK="$(getconf CLK_TCK)"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs what the benchmarks need from Debian packages, only if something is missing.
ensure_tools() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v nginx >/dev/null || missing+=(nginx)
    [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
    command -v python3 >/dev/null || missing+=(python3)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v curl >/dev/null || missing+=(curl)
    command -v ss >/dev/null || missing+=(iproute2)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
            die "apt-get install ${missing[*]} failed"
        # The Debian packages may start their system services; we never use them, but leave
        # them alone (they are not ours to stop).
    fi
}

build_baton() {
    log "building baton (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    [[ -x "$BATON" ]] || die "$BATON missing after build"
}

# Raises the open-file limit to the hard limit (10,000 client connections need it).
raise_nofile() { ulimit -n "$(ulimit -Hn)" 2>/dev/null || true; }

# bench_start: what every benchmark script does first: tools present, baton built (unless
# BENCH_NO_BUILD=1), open-file limit raised, a work folder, and every started process stopped
# on exit or interrupt.
bench_start() {
    ensure_tools
    [[ "${BENCH_NO_BUILD:-0}" == 1 ]] || build_baton
    raise_nofile
    make_workdir
    trap stop_all EXIT
    trap 'exit 130' INT TERM
}

make_workdir() {
    WORK="$(mktemp -d /tmp/baton-bench.XXXXXX)"
    mkdir -p "$WORK/tmp"
    chmod 755 "$WORK"
}

# Records a pid we started so stop_all can end it.
track() { STARTED_PIDS+=("$1"); }

# Every pid in the tree rooted at $1 (the process and its descendants).
proc_tree() {
    local p=$1 c
    [[ -d /proc/$p ]] || return 0
    echo "$p"
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do proc_tree "$c"; done
}

# utime+stime in clock ticks of every process in the tree rooted at $1.
cpu_ticks() {
    local total=0 p s
    for p in $(proc_tree "$1"); do
        s=$(cat /proc/"$p"/stat 2>/dev/null) || continue
        s=${s##*) }                     # drop "pid (comm) ", comm may contain spaces
        # shellcheck disable=SC2086
        set -- $s                       # $1 = state (field 3), so utime (14) is $12
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

# Resident set size in KiB of every process in the tree rooted at $1, summed.
rss_kib() {
    local total=0 p v
    for p in $(proc_tree "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' /proc/"$p"/status 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# Stops one pid (and waits for it) with TERM, then KILL after a bounded wait.
stop_pid() {
    local p=$1 i
    [[ -n "$p" && -d /proc/$p ]] || return 0
    kill -TERM "$p" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        [[ -d /proc/$p ]] || return 0
        # A zombie child of ours counts as gone once reaped.
        if grep -q '^State:.*Z' /proc/"$p"/status 2>/dev/null; then
            wait "$p" 2>/dev/null
            return 0
        fi
        sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
    return 0
}

stop_all() {
    local p
    # A baton that upgraded itself has a new pid: the pid files name the live ones.
    for f in "$WORK"/*.pid; do
        [[ -f "$f" ]] || continue
        p=$(cat "$f" 2>/dev/null)
        # Only a process still running with a file of this run ($WORK in its command line):
        # the pid of one that exited may belong to another program by now.
        [[ "$p" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$WORK" &&
            STARTED_PIDS+=("$p")
    done
    for p in "${STARTED_PIDS[@]}"; do stop_pid "$p"; done
    STARTED_PIDS=()
    if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
        log "kept $WORK"
    elif [[ -n "${WORK:-}" && -d "$WORK" ]]; then
        rm -rf "$WORK"
    fi
}

port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

# Waits (bounded) until 127.0.0.1:$1 answers an HTTP GET with 200 (through whatever listens).
wait_http() {
    local port=$1 what=$2 i
    for ((i = 0; i < 300; i++)); do
        if curl -fs -o /dev/null --max-time 1 "http://127.0.0.1:$port/"; then return 0; fi
        sleep 0.1
    done
    die "$what on port $port did not answer within 30 s (logs in $WORK)"
}

# --- the backend: nginx answering 200 "ok\n" with keep-alive, pinned with the load generator ---
# It also serves /big, a 256 MiB download (a sparse file: no disk space, zeros from the page
# cache), for the stalled-reader memory figure.

# start_backend PORT CPU
start_backend() {
    local port=$1 cpu=$2 d="$WORK/backend"
    mkdir -p "$d/logs"
    truncate -s 256M "$WORK/big.bin" || die "cannot create $WORK/big.bin"
    cat >"$d/nginx.conf" <<EOF
user root;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 19000; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $WORK/tmp/b_body;
    proxy_temp_path $WORK/tmp/b_proxy;
    fastcgi_temp_path $WORK/tmp/b_fcgi;
    uwsgi_temp_path $WORK/tmp/b_uwsgi;
    scgi_temp_path $WORK/tmp/b_scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
        location = /big { default_type application/octet-stream; alias $WORK/big.bin; }
    }
}
EOF
    taskset -c "$cpu" nginx -p "$d" -c "$d/nginx.conf" >"$d/logs/stderr" 2>&1 &
    BACKEND_PID=$!
    track "$BACKEND_PID"
    wait_http "$port" "backend nginx"
}

# --- the proxies under test. Each: start_X CPU TCP_PORT HTTP_PORT BACKEND_PORT MAXCONN ---
# Set X_PID. Each serves an L4 listener and an HTTP listener to the same backend.
# PROXY_WRAP, if set, prefixes the proxy's command (scripts/bench/instructions.sh: valgrind);
# NGINX_MASTER=off runs nginx as a single process (so the wrapper sees the worker).

start_baton() {
    local cpu=$1 tport=$2 hport=$3 bport=$4 maxconn=$5 d="$WORK/baton"
    mkdir -p "$d"
    cat >"$d/baton.yaml" <<EOF
runtime:
  pid_file: $WORK/baton.pid
  control_socket: $d/baton.sock
  drain_timeout: ${BATON_DRAIN:-10s}
  upgrade_timeout: 10s
  worker_threads: ${BATON_THREADS:-1}
log:
  level: "${BATON_LOG_LEVEL:-warn}"
  file: $d/baton.log
listeners:
  l4:
    listen: 127.0.0.1:$tport
    protocol: tcp
    upstream: backend
    max_connections: $maxconn
    backlog: 4096
  web:
    listen: 127.0.0.1:$hport
    protocol: http
    upstream: backend
    max_connections: $maxconn
    backlog: 4096
    http:
      keepalive_timeout: 600s
$(tls_listener_baton)
upstreams:
  backend:
    servers: [127.0.0.1:$bport]
    retries: 0
    http:
      pool_idle_per_server: 128
EOF
    "$BATON" check -c "$d/baton.yaml" >&2 || die "baton check failed"
    # shellcheck disable=SC2086 # PROXY_WRAP is a command prefix (e.g. valgrind), split on purpose
    if [[ -n "$cpu" ]]; then
        taskset -c "$cpu" ${PROXY_WRAP:-} "$BATON" run -c "$d/baton.yaml" >"$d/stderr" 2>&1 &
    else
        ${PROXY_WRAP:-} "$BATON" run -c "$d/baton.yaml" >"$d/stderr" 2>&1 &
    fi
    BATON_PID=$!
    track "$BATON_PID"
    wait_http "$hport" "baton http"
    wait_http "$tport" "baton tcp"
    [[ -z "${TLS_PORT_BATON:-}" ]] || wait_https "$TLS_PORT_BATON" "baton https"
}

start_haproxy() {
    local cpu=$1 tport=$2 hport=$3 bport=$4 maxconn=$5 d="$WORK/haproxy"
    mkdir -p "$d"
    # HAProxy refuses to start when 2 × maxconn (+ a few) exceeds the hard fd limit (20,000 here).
    local fdmax
    fdmax=$((($(ulimit -Hn) - 220) / 2))
    ((maxconn > fdmax)) && maxconn=$fdmax
    cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $maxconn
    log stderr format short local0 warning
defaults
    log global
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
frontend ft_tcp
    mode tcp
    bind 127.0.0.1:$tport
    default_backend bk_tcp
backend bk_tcp
    mode tcp
    server s1 127.0.0.1:$bport
frontend ft_http
    mode http
    bind 127.0.0.1:$hport
    option forwardfor
    default_backend bk_http
backend bk_http
    mode http
    http-reuse always
    server s1 127.0.0.1:$bport
$(tls_frontend_haproxy)
EOF
    haproxy -c -q -f "$d/haproxy.cfg" >&2 || die "haproxy config check failed"
    # shellcheck disable=SC2086
    taskset -c "$cpu" ${PROXY_WRAP:-} haproxy -db -f "$d/haproxy.cfg" >"$d/stderr" 2>&1 &
    HAPROXY_PID=$!
    track "$HAPROXY_PID"
    wait_http "$hport" "haproxy http"
    wait_http "$tport" "haproxy tcp"
    [[ -z "${TLS_PORT_HAPROXY:-}" ]] || wait_https "$TLS_PORT_HAPROXY" "haproxy https"
}

start_nginx() {
    local cpu=$1 tport=$2 hport=$3 bport=$4 maxconn=$5 d="$WORK/nginx"
    mkdir -p "$d/logs"
    cat >"$d/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
user root;
daemon off;
master_process ${NGINX_MASTER:-on};
worker_processes 1;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections $((maxconn * 2 + 64 < 19500 ? maxconn * 2 + 64 : 19500)); }
stream {
    upstream bs { server 127.0.0.1:$bport; }
    server { listen 127.0.0.1:$tport backlog=4096; proxy_pass bs; }
}
http {
    access_log off;
    client_body_temp_path $WORK/tmp/n_body;
    proxy_temp_path $WORK/tmp/n_proxy;
    fastcgi_temp_path $WORK/tmp/n_fcgi;
    uwsgi_temp_path $WORK/tmp/n_uwsgi;
    scgi_temp_path $WORK/tmp/n_scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    upstream bh {
        server 127.0.0.1:$bport;
        keepalive 128;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }
    server {
        listen 127.0.0.1:$hport backlog=4096;
        location / {
            proxy_pass http://bh;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            # A slow client's response is buffered in memory only (its default would spool up
            # to 1 GiB per request to temp files): no effect on the small benchmark responses.
            proxy_max_temp_file_size 0;
        }
    }
$(tls_server_nginx)
}
EOF
    nginx -t -q -p "$d" -c "$d/nginx.conf" >&2 || die "nginx config test failed"
    # shellcheck disable=SC2086
    taskset -c "$cpu" ${PROXY_WRAP:-} nginx -p "$d" -c "$d/nginx.conf" >"$d/logs/stderr" 2>&1 &
    NGINX_PID=$!
    track "$NGINX_PID"
    wait_http "$hport" "nginx http"
    wait_http "$tport" "nginx stream"
    [[ -z "${TLS_PORT_NGINX:-}" ]] || wait_https "$TLS_PORT_NGINX" "nginx https"
}

# --- TLS (scripts/bench.sh tls): one ECDSA P-256 certificate for every proxy, TLS 1.3 only,
# AES-128-GCM. Each proxy gets an extra HTTPS listener when TLS_PORT_<PROXY> is set; with
# BENCH_H2=1 it offers ALPN h2 as well as http/1.1 (scripts/bench/h2tls.sh). ---

# make_cert: $WORK/tls/cert.pem + key.pem (localhost, 127.0.0.1), and $WORK/tls/client.cnf, an
# OpenSSL config that makes wrk (system OpenSSL) offer TLS 1.3 with AES-128-GCM only.
make_cert() {
    mkdir -p "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" 2>/dev/null || die "openssl req failed"
    cat >"$WORK/tls/client.cnf" <<EOF
openssl_conf = conf
[conf]
ssl_conf = ssl
[ssl]
system_default = sys
[sys]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
EOF
}

tls_listener_baton() {
    [[ -n "${TLS_PORT_BATON:-}" ]] || return 0
    cat <<EOF
  web_tls:
    listen: 127.0.0.1:$TLS_PORT_BATON
    protocol: http
    upstream: backend
    max_connections: 4096
    backlog: 4096
    http:
      keepalive_timeout: 600s
    tls:
      certificates:
        - { cert: $WORK/tls/cert.pem, key: $WORK/tls/key.pem }
      min_version: "1.3"
$([[ "${BENCH_H2:-0}" == 1 ]] && echo '      alpn: [h2, http/1.1]')
EOF
}

tls_frontend_haproxy() {
    [[ -n "${TLS_PORT_HAPROXY:-}" ]] || return 0
    cat "$WORK/tls/cert.pem" "$WORK/tls/key.pem" >"$WORK/tls/haproxy.pem"
    cat <<EOF
frontend ft_https
    mode http
    bind 127.0.0.1:$TLS_PORT_HAPROXY ssl crt $WORK/tls/haproxy.pem ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256$([[ "${BENCH_H2:-0}" == 1 ]] && echo ' alpn h2,http/1.1')
    option forwardfor
    default_backend bk_http
EOF
}

tls_server_nginx() {
    [[ -n "${TLS_PORT_NGINX:-}" ]] || return 0
    cat <<EOF
    server {
        listen 127.0.0.1:$TLS_PORT_NGINX ssl$([[ "${BENCH_H2:-0}" == 1 ]] && echo ' http2') backlog=4096;
        ssl_certificate $WORK/tls/cert.pem;
        ssl_certificate_key $WORK/tls/key.pem;
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
        location / {
            proxy_pass http://bh;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
        }
    }
EOF
}

# Waits (bounded) until https://127.0.0.1:$1 answers 200 (certificate not verified).
wait_https() {
    local port=$1 what=$2 i
    for ((i = 0; i < 300; i++)); do
        if curl -kfs -o /dev/null --max-time 1 "https://127.0.0.1:$port/"; then return 0; fi
        sleep 0.1
    done
    die "$what on port $port did not answer over TLS within 30 s (logs in $WORK)"
}

# Checks that every port named is free, so we never talk to someone else's server.
require_free_ports() {
    local p
    for p in "$@"; do port_free "$p" || die "port $p is in use; set BENCH_PORT_BASE to another base"; done
}

load_avg() { cut -d' ' -f1-3 /proc/loadavg; }
