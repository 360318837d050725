#!/usr/bin/env bash
# mesh_baseline.sh -- weft's data plane against its loopback peer baseline.
#
# The methodology of shared/bench/peer_baseline.sh (same tools, same
# upstream, same table), with two weft scenarios in the same interleaved run,
# all on 127.0.0.1:
#   direct     : load generator -> upstream nginx (static body)
#   nginx2     : load generator -> nginx proxy A -> nginx proxy B -> upstream
#   haproxy2   : load generator -> haproxy A     -> haproxy B     -> upstream
#   weft-local : load generator -> weft n2 proxy -> upstream (registered on n2)
#   weft-2node : load generator -> weft n1 proxy -> QUIC (mTLS) -> weft n2
#                -> upstream (registered on n2)
#   nginx2-mtls: load generator -> nginx A -> TLS 1.3 with client
#                certificates (kept-alive, sessions reused) -> nginx B ->
#                upstream: the honest peer of an encrypted mesh
# The weft scenarios send `Host: up` to the node's proxy port. One 2-node
# cluster serves both: the service `up` has one instance, on n2, so n2's proxy
# is the "local" path and n1's proxy the "2-node" path (no re-registration
# between runs). weft's proxyCPU/RSS_MB are BOTH node processes in both weft
# scenarios (in weft-local n1 only gossips, a few ms of CPU per second).
#
# For each: max RPS (wrk, CONNS keep-alive connections, DUR s) and open-loop
# latency at a fixed RATE (oha -q RATE --latency-correction; h2load --rps if
# oha is unavailable), REPS repetitions, interleaved. Also CPU (vCPU) and RSS
# of the proxy processes during the fixed-rate run. Prints one table, the
# means, and two ratios (medians over REPS): weft-2node/nginx2 max RPS and
# weft-2node/nginx2 fixed-rate p99.
#
# H2C=1 (default) then runs h2load (h2c prior knowledge, CONNS connections,
# 10 streams each) through nginx (an h2c front before the same two hops) and
# through weft-2node (h2 end to end: weft calls the instance in h2, at the
# upstream nginx's h2c port), interleaved, REPS times.
#
# TCP=1 (default) then runs redis-benchmark (GET and SET, CONNS clients)
# against redis-server directly, through an nginx `stream` two-hop chain and
# through a weft TCP upstream across the two nodes, interleaved, REPS times.
#
# WEFT_BIN_BEFORE=path adds `before-2node`: weft-2node with that (older)
# binary, on a cluster of its own, interleaved with the rest.
#
# STREAM_1G=1 (default) then starts a fresh 2-node cluster, streams a 1 GiB
# body (nginx, sparse file) from n2 through n1's proxy with curl, and prints
# both nodes' VmRSS before/after and VmHWM (peak).
#
# Installs what it needs (apt: wrk nghttp2-client nginx-light
# libnginx-mod-stream haproxy curl jq openssl redis-server redis-tools;
# cargo: oha) and builds weft (`cargo build --release --locked -p weft`;
# WEFT_BIN=path skips the build). Installs and the build happen BEFORE the
# measured window, which a watchdog bounds (MAX_WALL s). Only processes this
# script started are killed, by PID.
set -uo pipefail

DUR=${DUR:-10}            # s per run
CONNS=${CONNS:-32}        # connections for both tests
WRK_THREADS=${WRK_THREADS:-1} # wrk threads (1 leaves the most CPU to the servers on 2 cores)
RATE=${RATE:-2000}        # fixed request rate (req/s)
REPS=${REPS:-2}           # repetitions (interleaved) to show noise
WORKERS=${WORKERS:-1}     # nginx worker_processes / haproxy nbthread, per process
WEFT_THREADS=${WEFT_THREADS:-$WORKERS} # weft --worker-threads, per node (the same threads as the others)
BODY=${BODY:-1024}        # upstream response body bytes (Istio's perf tests use 1 kB)
PORT0=${PORT0:-18080}     # upstream; peers use PORT0+1.., weft PORT0+20..+39
BUILD_OHA=${BUILD_OHA:-1} # 1: cargo install oha if missing
OHA_VERSION=${OHA_VERSION:-1.16.0}
STREAM_1G=${STREAM_1G:-1} # 1: also the 1 GiB streaming memory check
H2C=${H2C:-1}             # 1: also the h2c rows (h2load)
TCP=${TCP:-1}             # 1: also the TCP request/response rows (redis-benchmark)
TCP_REQS=${TCP_REQS:-200000} # redis-benchmark requests per test
MAX_WALL=${MAX_WALL:-720} # hard bound on the measured window (seconds)
KEEP=${KEEP:-0}           # 1: keep the temp dir (configs, raw outputs, node logs)
WEFT_LOG=${WEFT_LOG:-warn} # RUST_LOG of the weft nodes
SCEN_LIST=${SCEN_LIST:-"direct nginx2 nginx2-mtls haproxy2 weft-local weft-2node"}

log() { printf '%s\n' "$*" >&2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# ---------------------------------------------------------------- install
install_pkgs() {
  local need=()
  command -v wrk     >/dev/null || need+=(wrk)
  command -v h2load  >/dev/null || need+=(nghttp2-client)
  command -v nginx   >/dev/null || need+=(nginx-light)
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v curl    >/dev/null || need+=(curl)
  command -v jq      >/dev/null || need+=(jq)
  command -v openssl >/dev/null || need+=(openssl)
  [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
  if [ "$TCP" = 1 ]; then
    command -v redis-server    >/dev/null || need+=(redis-server)
    command -v redis-benchmark >/dev/null || need+=(redis-tools)
  fi
  ((${#need[@]})) || return 0
  log "# installing: ${need[*]}"
  local made_policy=0
  # keep Debian's postinst from starting system nginx/haproxy on :80
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  local rc=$?
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  return $rc
}
install_pkgs || { log "apt install failed"; exit 1; }

OHA=$(command -v oha || true)
[ -z "$OHA" ] && [ -x "$HOME/.cargo/bin/oha" ] && OHA=$HOME/.cargo/bin/oha
if [ -z "$OHA" ] && [ "$BUILD_OHA" = 1 ] && command -v cargo >/dev/null; then
  log "# building oha $OHA_VERSION with cargo (one-off, before the measured window)"
  timeout 1500 cargo install oha --locked --version "$OHA_VERSION" >/dev/null 2>&1 || true
  [ -x "$HOME/.cargo/bin/oha" ] && OHA=$HOME/.cargo/bin/oha
fi
FIXED_TOOL=oha; [ -n "$OHA" ] || FIXED_TOOL=h2load

if [ -z "${WEFT_BIN:-}" ]; then
  log "# building weft: cargo build --release --locked -p weft (before the measured window)"
  (cd "$ROOT" && cargo build --release --locked -p weft) >&2 || { log "weft build failed"; exit 1; }
  WEFT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/weft
  WEFT_REV="built from $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?')"
fi
WEFT_REV=${WEFT_REV:-"WEFT_BIN=$WEFT_BIN"}
[ -x "$WEFT_BIN" ] || { log "no weft binary at $WEFT_BIN"; exit 1; }

# ---------------------------------------------------------------- set-up
T=$(mktemp -d /tmp/mesh_baseline.XXXXXX); chmod 755 "$T"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  [ -n "${WD:-}" ] && kill "$WD" 2>/dev/null
  [ "$KEEP" = 1 ] && log "# kept $T" || rm -rf "$T"
}
trap cleanup EXIT
trap 'log "# interrupted / watchdog fired"; exit 124' INT TERM

UP=$PORT0; NA=$((PORT0+1)); NB=$((PORT0+2)); HA=$((PORT0+11)); HB=$((PORT0+12))
TA=$((PORT0+3)); TB=$((PORT0+4)); H2F=$((PORT0+5))             # nginx2-mtls, h2c front
RD=$((PORT0+6)); SA=$((PORT0+7)); SB=$((PORT0+8)); WUP=$((PORT0+9)) # redis, nginx stream, weft upstream
UPH2=$((PORT0+10)) # the upstream's h2c port: weft calls an instance in h2 when its caller spoke h2
# weft node n<i> of cluster c<k>: gossip/tunnel (UDP), proxy, admin (TCP)
wport() { echo $((PORT0 + 20 + 10*($1-1) + 4*($2-1) + $3)); } # cluster node kind(0..3)
mkdir -p "$T/www" "$T/tmp"; head -c "$BODY" /dev/zero | tr '\0' 'x' > "$T/www/body"
[ "$STREAM_1G" = 1 ] && truncate -s 1G "$T/www/big"   # sparse: no disk, nginx sendfile
chmod -R a+rX "$T"

nginx_head() { # name: the lines every proxy config starts with
  cat <<EOF
worker_processes $WORKERS;
pid $T/$1.pid;
error_log $T/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  client_body_temp_path $T/tmp/$1.cb; proxy_temp_path $T/tmp/$1.px;
  fastcgi_temp_path $T/tmp/$1.fc; uwsgi_temp_path $T/tmp/$1.uw; scgi_temp_path $T/tmp/$1.sc;
EOF
}
nginx_mtls_conf() { # nginx2-mtls: A (plain in, TLS with a client cert out) and B (TLS in, verifies it)
  local d=$T/pki
  { nginx_head ta; cat <<EOF
  upstream b { server 127.0.0.1:$TB; keepalive 64; keepalive_requests 100000000; }
  server { listen 127.0.0.1:$TA;
    location / { proxy_pass https://b; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; proxy_ssl_name bench-b;
      proxy_ssl_certificate $d/client.pem; proxy_ssl_certificate_key $d/client.key;
      proxy_ssl_trusted_certificate $d/ca.pem; proxy_ssl_verify on; } }
}
EOF
  } > "$T/ta.conf"
  { nginx_head tb; cat <<EOF
  upstream up { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 100000000; }
  server { listen 127.0.0.1:$TB ssl;
    ssl_protocols TLSv1.3; ssl_certificate $d/server.pem; ssl_certificate_key $d/server.key;
    ssl_client_certificate $d/ca.pem; ssl_verify_client on;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOF
  } > "$T/tb.conf"
  # the h2c front: h2c prior knowledge in, then nginx2's two hops
  { nginx_head h2f; cat <<EOF
  upstream a { server 127.0.0.1:$NA; keepalive 64; keepalive_requests 100000000; }
  server { listen 127.0.0.1:$H2F http2;
    location / { proxy_pass http://a; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOF
  } > "$T/h2f.conf"
}
nginx_stream_conf() { # name listen_port upstream_port: an L4 hop
  cat > "$T/$1.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $WORKERS;
pid $T/$1.pid;
error_log $T/$1.err warn;
events { worker_connections 4096; }
stream { server { listen 127.0.0.1:$2; proxy_pass 127.0.0.1:$3; } }
EOF
}
nginx_conf() { # name listen_port [upstream_port]  (no upstream = static server)
  local name=$1 port=$2 upp=${3:-}
  {
    cat <<EOF
worker_processes $WORKERS;
pid $T/$name.pid;
error_log $T/$name.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  client_body_temp_path $T/tmp/$name.cb; proxy_temp_path $T/tmp/$name.px;
  fastcgi_temp_path $T/tmp/$name.fc; uwsgi_temp_path $T/tmp/$name.uw; scgi_temp_path $T/tmp/$name.sc;
EOF
    if [ -z "$upp" ]; then
      cat <<EOF
  sendfile on; tcp_nopush on; open_file_cache max=16;
  server { listen 127.0.0.1:$port;$( [ "$name" = up ] && echo " listen 127.0.0.1:$UPH2 http2;")
    location = /big { root $T/www; default_type application/octet-stream; }
    location / { root $T/www; try_files /body =404; default_type text/plain; } }
}
EOF
    else
      cat <<EOF
  upstream up { server 127.0.0.1:$upp; keepalive 64; keepalive_requests 100000000; }
  server { listen 127.0.0.1:$port;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOF
    fi
  } > "$T/$name.conf"
}
haproxy_conf() { # name listen_port upstream_port mode
  cat > "$T/$1.cfg" <<EOF
global
  nbthread $WORKERS
  maxconn 4096
defaults
  mode $4
  timeout connect 5s
  timeout client 60s
  timeout server 60s
$( [ "$4" = http ] && printf '  option http-keep-alive\n  http-reuse always\n' )
frontend f
  bind 127.0.0.1:$2
  default_backend b
backend b
  server s1 127.0.0.1:$3
EOF
}
start() { # name cmd...
  local name=$1; shift
  "$@" >"$T/$name.out" 2>&1 &
  PIDS+=($!); eval "PID_$name=$!"
}
forget() { local p keep=(); for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; PIDS=("${keep[@]}"); }
# poll until `cmd` succeeds, at most $1 s; readiness is never a bare sleep
wait_until() { # timeout_s description cmd...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  while ! "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || { log "# timed out after ${limit}s waiting for: $what"; return 1; }
    sleep 0.1
  done
}
dump_logs() { local f; for f in "$T"/*.err "$T"/*.out; do [ -s "$f" ] && { log "---- $f"; tail -n 40 "$f" >&2; }; done; }

# weft cluster: start_cluster k [bin] -> nodes c<k>n1 (proxy for 2-node), c<k>n2 (holds `up`)
start_cluster() { # k [weft binary]
  local k=$1 i WEFT_BIN=${2:-$WEFT_BIN}
  "$WEFT_BIN" init --dir "$T/cluster$k" >"$T/init$k.out" 2>&1 || { log "weft init failed"; cat "$T/init$k.out" >&2; return 1; }
  for i in 1 2; do
    mkdir -p "$T/c${k}n$i"
    start "c${k}n$i" env RUST_LOG="$WEFT_LOG" "$WEFT_BIN" node --name "n$i" --cluster "$T/cluster$k" \
      --gossip "127.0.0.1:$(wport "$k" "$i" 0)" --tunnel "127.0.0.1:$(wport "$k" "$i" 1)" \
      --proxy "127.0.0.1:$(wport "$k" "$i" 2)" --admin "127.0.0.1:$(wport "$k" "$i" 3)" \
      --data-dir "$T/c${k}n$i" --socket "$T/c${k}n$i/weft.sock" --seeds "127.0.0.1:$(wport "$k" 1 0)" \
      --worker-threads "$WEFT_THREADS"
  done
  local s1="$T/c${k}n1/weft.sock" s2="$T/c${k}n2/weft.sock"
  two_alive() { [ "$("$WEFT_BIN" --socket "$1" members --json | jq '[.members[] | select(.state=="alive")] | length')" = 2 ]; }
  wait_until 30 "cluster $k: n1 sees 2 alive members" two_alive "$s1" || return 1
  wait_until 30 "cluster $k: n2 sees 2 alive members" two_alive "$s2" || return 1
  "$WEFT_BIN" --socket "$s2" register up --port "$UP" >"$T/register$k.out" 2>&1 \
    || { log "weft register failed"; cat "$T/register$k.out" >&2; return 1; }
  "$WEFT_BIN" --socket "$s2" register uph2 --port "$UPH2" >>"$T/register$k.out" 2>&1 \
    || { log "weft register uph2 failed"; cat "$T/register$k.out" >&2; return 1; }
  up_listed() { "$WEFT_BIN" --socket "$1" services --json | jq -e '.services.up // [] | any(.node=="n2")'; }
  wait_until 30 "cluster $k: n1 lists up@n2" up_listed "$s1" || return 1
  wait_until 30 "cluster $k: n2 lists up@n2" up_listed "$s2" || return 1
}

make_certs "$T/pki" || { log "openssl could not make the nginx2-mtls certificates"; exit 1; }
nginx_conf up "$UP"; nginx_conf na "$NA" "$NB"; nginx_conf nb "$NB" "$UP"; nginx_mtls_conf
haproxy_conf ha "$HA" "$HB" http; haproxy_conf hb "$HB" "$UP" http
for n in up na nb ta tb h2f; do start "$n" nginx -p "$T" -e "$T/$n.err" -c "$T/$n.conf" -g 'daemon off;'; done
for n in ha hb; do start "$n" haproxy -db -f "$T/$n.cfg"; done
start_cluster 1 || { dump_logs; exit 1; }
if [ -n "${WEFT_BIN_BEFORE:-}" ]; then # an older build, side by side in the same run
  start_cluster 3 "$WEFT_BIN_BEFORE" || { dump_logs; exit 1; }
  [[ " $SCEN_LIST " == *" before-2node "* ]] || SCEN_LIST+=" before-2node"
fi

read -r -a SCEN <<<"$SCEN_LIST"
declare -A PORT=([direct]=$UP [nginx2]=$NA [nginx2-mtls]=$TA [haproxy2]=$HA [weft-local]=$(wport 1 2 2) [weft-2node]=$(wport 1 1 2) [before-2node]=$(wport 3 1 2))
declare -A PROX=([direct]="" [nginx2]="na nb" [nginx2-mtls]="ta tb" [haproxy2]="ha hb" [weft-local]="c1n1 c1n2" [weft-2node]="c1n1 c1n2" [before-2node]="c3n1 c3n2")
declare -A HOPS=([direct]=0 [nginx2]=2 [nginx2-mtls]=2 [haproxy2]=2 [weft-local]=1 [weft-2node]=2 [before-2node]=2)
declare -A HOST=([direct]="" [nginx2]="" [nginx2-mtls]="" [haproxy2]="" [weft-local]=up [weft-2node]=up [before-2node]=up)
hdr() { [ -n "${HOST[$1]}" ] && printf '%s\n' -H "Host: ${HOST[$1]}"; }
for s in "${SCEN[@]}"; do
  [ -n "${PORT[$s]:-}" ] || { log "unknown scenario $s"; exit 64; }
  mapfile -t H < <(hdr "$s")
  ok=0
  for _ in $(seq 100); do
    if [ "$(curl -s "${H[@]}" -o /dev/null -w '%{http_code}:%{size_download}' "http://127.0.0.1:${PORT[$s]}/")" = "200:$BODY" ]; then ok=1; break; fi
    sleep 0.1
  done
  ((ok)) || { log "scenario $s not answering 200 with $BODY bytes:"
    curl -s -i "${H[@]}" "http://127.0.0.1:${PORT[$s]}/" 2>&1 | head -c 600 >&2; echo >&2; dump_logs; exit 1; }
done

# watchdog: bounds the measured window
( trap 'kill $sp 2>/dev/null; exit 0' TERM; sleep "$MAX_WALL" & sp=$!; wait $sp
  echo "# watchdog: ${MAX_WALL}s exceeded" >&2; kill -TERM $$ ) 2>/dev/null &
WD=$!
T_START=$SECONDS

# ---------------------------------------------------------------- helpers
HZ=$(getconf CLK_TCK)
tree() { local p; for p in "$@"; do echo "$p"; ps -o pid= --ppid "$p" 2>/dev/null; done; }
proc_pids() { local n; for n in $1; do eval "tree \$PID_$n"; done; }
cpu_ticks() { local t=0 p; for p in $(proc_pids "$1"); do
  [ -r /proc/$p/stat ] && t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
rss_mb() { local k=0 p v; for p in $(proc_pids "$1"); do
  v=$(awk '/^VmRSS/{print $2}' /proc/$p/status 2>/dev/null); k=$((k + ${v:-0})); done
  awk -v k=$k 'BEGIN{printf "%.1f", k/1024}'; }
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.2f", v}'; }

run_max() { # url [-H hdr] -> "rps p50 p99"
  local url=$1; shift
  local out; out=$(timeout $((DUR+10)) wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DUR}s" --latency "$@" "$url" 2>&1)
  echo "$out" >> "$T/raw.txt"
  local rps p50 p99 bad
  rps=$(awk '/^Requests\/sec/{printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out" | to_ms)
  p99=$(awk '$1=="99%"{print $2}' <<<"$out" | to_ms)
  bad=$(awk '/Non-2xx or 3xx responses:/{print} /Socket errors:/{print}' <<<"$out")
  # a run with failed requests is flagged with * (its numbers are not the proxy's)
  [ -n "$bad" ] && { log "# wrk $url $*: $bad"; rps="${rps:-NA}*"; }
  echo "${rps:-NA} ${p50:-NA} ${p99:-NA}"
}
run_fixed() { # url [-H hdr] -> "achieved_rps p50 p99 p999"
  local url=$1; shift
  local out
  if [ "$FIXED_TOOL" = oha ]; then
    out=$(timeout $((DUR+15)) "$OHA" --no-tui --output-format json --latency-correction --no-color \
          -z "${DUR}s" -c "$CONNS" -q "$RATE" "$@" "$url" 2>&1)
    echo "$out" >> "$T/raw.txt"
    local codes errs flag=""
    codes=$(jq -c '.statusCodeDistribution // {} | with_entries(select(.key != "200"))' <<<"$out" 2>/dev/null)
    [ -n "$codes" ] && [ "$codes" != "{}" ] && { log "# oha $url $*: non-200 $codes"; flag="*"; }
    # "aborted due to deadline" = requests in flight when -z ran out: not failures
    errs=$(jq -c '.errorDistribution // {} | with_entries(select(.key != "aborted due to deadline"))' <<<"$out" 2>/dev/null)
    [ -n "$errs" ] && [ "$errs" != "{}" ] && { log "# oha $url $*: errors $errs"; flag="*"; }
    jq -r '"\(.summary.requestsPerSec|floor) \(.latencyPercentiles.p50*1e5|round/100) \(.latencyPercentiles.p99*1e5|round/100) \(.latencyPercentiles["p99.9"]*1e5|round/100)"' <<<"$out" 2>/dev/null \
      | awk -v f="$flag" '{printf "%d%s %.2f %.2f %.2f\n", $1, f, $2, $3, $4}'
  else # h2load: per-connection pacing (closed loop per connection); percentiles from the log
    local per=$(( (RATE + CONNS - 1) / CONNS ))
    # h2load adds -H 'Host: x' as a SECOND Host header; :authority replaces its own
    local a=() flag=""; while (($#)); do
      if [ "$1" = -H ] && [[ "$2" == Host:* ]]; then a+=(-H ":authority:${2#Host:}"); shift 2; else a+=("$1"); shift; fi; done
    out=$(timeout $((DUR+15)) h2load --h1 -c "$CONNS" --rps "$per" -D "$DUR" --log-file "$T/h2.log" "${a[@]}" "$url" 2>&1)
    echo "$out" >> "$T/raw.txt"
    grep -q '^status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx' <<<"$out" && grep -q ' 0 failed, 0 errored' <<<"$out" \
      || { log "# h2load $url ${a[*]}: $(grep -E '^(requests|status codes):' <<<"$out" | tr '\n' ' ')"; flag="*"; }
    local n; n=$(wc -l < "$T/h2.log")
    sort -n -k3 "$T/h2.log" | awk -v n="$n" -v d="$DUR" -v f="$flag" '{a[NR]=$3} END{
      i50=int(n*0.50); i99=int(n*0.99); i999=int(n*0.999); if(i999<1)i999=1
      printf "%.0f%s %.2f %.2f %.2f\n", n/d, f, a[i50]/1000, a[i99]/1000, a[i999]/1000}'
    rm -f "$T/h2.log"
  fi
}

# ---------------------------------------------------------------- measure
NCPU=$(nproc)
busy_pct() { # % of all CPUs busy over $1 seconds (our servers are idle now)
  local a b; a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat); sleep "$1"
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," "); split(b,y," "); d=(y[1]-x[1])+(y[2]-x[2]); printf "%.0f", (d>0 ? 100*(y[1]-x[1])/d : 0)}'; }
BG=$(busy_pct 1)
[ "$BG" -gt 10 ] && log "# WARNING: machine is ${BG}% busy before the run (other processes); numbers will be noisy"
{
  echo "# mesh_baseline $(date -u +%FT%TZ)  host: ${NCPU} cpu, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "# background CPU busy before start: ${BG}% (idle machine ~0-2%)"
  echo "# wrk: $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}') | fixed-rate: $FIXED_TOOL $( [ "$FIXED_TOOL" = oha ] && "$OHA" --version | awk '{print $2}' || h2load --version | awk '{print $2}') | $(nginx -v 2>&1 | awk '{print $3}') | haproxy $(haproxy -v | awk 'NR==1{print $3}') | $("$WEFT_BIN" --version) ($WEFT_REV)"
  echo "# conns=$CONNS dur=${DUR}s rate=${RATE}/s body=${BODY}B workers/proc=$WORKERS weft --worker-threads $WEFT_THREADS reps=$REPS (interleaved) weft RUST_LOG=$WEFT_LOG"
  if [ "$FIXED_TOOL" = oha ]; then fx="oha -q $RATE --latency-correction (open loop, coordinated-omission corrected)"
  else fx="h2load --rps (bursty per-connection pacing, NOT CO-corrected; not comparable with oha rows)"; fi
  echo "# max: wrk -t$WRK_THREADS closed loop (p50/p99 at saturation) | fixed: $fx"
  echo "# proxyCPU = vCPU used by the proxy processes during the fixed-rate run; RSS_MB = the same processes, after it"
  echo "# a * after maxRPS/fixRPS: that run had non-2xx responses or socket errors (see stderr)"
  echo "# weft rows: both node processes (weft-local: n2 proxies to its own instance, n1 only gossips)"
  printf "%-12s %3s | %8s %7s %7s | %7s %7s %7s %7s | %8s %7s\n" scenario rep maxRPS p50ms p99ms fixRPS p50ms p99ms p999ms proxyCPU RSS_MB
} | tee "$T/table.txt"

for rep in $(seq "$REPS"); do
  for s in "${SCEN[@]}"; do
    url="http://127.0.0.1:${PORT[$s]}/"
    mapfile -t H < <(hdr "$s")
    [ "$rep" = 1 ] && timeout 5 wrk -t"$WRK_THREADS" -c"$CONNS" -d1s "${H[@]}" "$url" >/dev/null 2>&1   # warm pools
    read -r mrps mp50 mp99 < <(run_max "$url" "${H[@]}")
    sleep 0.5
    c0=$(cpu_ticks "${PROX[$s]}"); t0=$(date +%s.%N)
    read -r frps fp50 fp99 fp999 < <(run_fixed "$url" "${H[@]}")
    c1=$(cpu_ticks "${PROX[$s]}"); t1=$(date +%s.%N)
    if [ -n "${PROX[$s]}" ]; then
      vcpu=$(awk -v a=$c0 -v b=$c1 -v hz=$HZ -v t0=$t0 -v t1=$t1 'BEGIN{printf "%.3f", (b-a)/hz/(t1-t0)}')
      rss=$(rss_mb "${PROX[$s]}")
    else vcpu=-; rss=-; fi
    printf "%-12s %3s | %8s %7s %7s | %7s %7s %7s %7s | %8s %7s\n" \
      "$s" "$rep" "${mrps:-NA}" "${mp50:-NA}" "${mp99:-NA}" "${frps:-NA}" "${fp50:-NA}" "${fp99:-NA}" "${fp999:-NA}" "$vcpu" "$rss" | tee -a "$T/table.txt"
    for n in ${PROX[$s]}; do eval "kill -0 \$PID_$n" 2>/dev/null || { log "# $n (pid $(eval echo \$PID_$n)) died"; dump_logs; exit 1; }; done
    sleep 0.5
  done
done

# summary: mean over reps, added latency vs direct at the fixed rate
hops=""; for s in "${SCEN[@]}"; do hops+="$s=${HOPS[$s]} "; done
awk -v scen="${SCEN[*]}" -v hops="$hops" -v rate="$RATE" '
  /^#/ || $1=="scenario" {next}
  { n[$1]++; m[$1]+=$4; p50[$1]+=$9; p99[$1]+=$10; cpu[$1]+=($13=="-"?0:$13) }
  END { split(scen, S, " "); split(hops, HP, " "); for (i in HP) { split(HP[i], kv, "="); h[kv[1]]=kv[2] }
    print "# mean over reps; added = scenario - direct at the fixed rate; vCPU per hop: weft-local counts 1 hop (n2), its n1 gossip CPU included"
    printf "%-12s | %8s | %9s %9s | %4s | %14s\n", "scenario", "maxRPS", "+p50ms", "+p99ms", "hops", "vCPU/1k rps/hop"
    for (i=1; i in S; i++) { s=S[i]; if (!n[s]) continue
      printf "%-12s | %8.0f | %9.3f %9.3f | %4d | %14s\n", s, m[s]/n[s], p50[s]/n[s]-p50["direct"]/n["direct"],
        p99[s]/n[s]-p99["direct"]/n["direct"], h[s], (h[s]==0 ? "-" : sprintf("%.3f", cpu[s]/n[s]/h[s]/(rate/1000))) } }
' "$T/table.txt" | tee -a "$T/table.txt"
# ratios: medians over reps
awk '
  function med(arr, k,   c, i, j, t, v) { c=cnt[k]; for (i=1;i<=c;i++) v[i]=arr[k,i]
    for (i=1;i<=c;i++) for (j=i+1;j<=c;j++) if (v[j]<v[i]) {t=v[i]; v[i]=v[j]; v[j]=t}
    return (c%2 ? v[(c+1)/2] : (v[c/2]+v[c/2+1])/2) }
  /^#/ || $1=="scenario" || $2=="|" {next}
  { c=++cnt[$1]; mx[$1,c]=$4; p[$1,c]=$10 }
  END { if (!cnt["weft-2node"] || !cnt["nginx2"]) exit
    a=med(mx,"weft-2node"); b=med(mx,"nginx2"); printf "ratio maxRPS  weft-2node/nginx2 = %.2f  (%.0f / %.0f, medians over reps)\n", (b?a/b:0), a, b
    if (cnt["nginx2-mtls"]) { b=med(mx,"nginx2-mtls"); printf "ratio maxRPS  weft-2node/nginx2-mtls = %.2f  (%.0f / %.0f, medians over reps)\n", (b?a/b:0), a, b }
    a=med(p,"weft-2node");  b=med(p,"nginx2");  printf "ratio p99     weft-2node/nginx2 = %.2f  (%.2f / %.2f ms, fixed-rate p99, medians over reps)\n", (b?a/b:0), a, b }
' "$T/table.txt" | tee -a "$T/table.txt"
echo "# measured window (load runs): $((SECONDS - T_START)) s"

# ---------------------------------------------------------------- h2c
# h2load prints "finished in 10.00s, 51234.50 req/s, ..." and
# "time for request: min max mean sd +/- sd"
run_h2() { # url [authority] -> "rps mean sd"
  local out a=(); [ -n "${2:-}" ] && a=(-H ":authority: $2")
  out=$(timeout $((DUR+15)) h2load -c "$CONNS" -m 10 -D "$DUR" "${a[@]}" "$1" 2>&1)
  echo "$out" >> "$T/raw.txt"
  local flag=""
  grep -q ' 0 failed, 0 errored' <<<"$out" && grep -q ' 0 4xx, 0 5xx' <<<"$out" || flag="*"
  awk -v f="$flag" '/^finished in/{r=$4} /^time for request:/{m=$6; sd=$7}
    END{printf "%.0f%s %s %s\n", r, f, m, sd}' <<<"$out"
}
if [ "$H2C" = 1 ]; then
  echo "# h2c: h2load -c $CONNS -m 10 -D $DUR (prior knowledge); nginx2-h2c = an nginx h2c front before nginx2's two hops (3 nginx, HTTP/1.1 behind the front); weft-2node = h2 end to end, to the upstream's h2c port" | tee -a "$T/table.txt"
  printf "%-15s %3s | %8s %10s %10s\n" scenario rep h2RPS mean sd | tee -a "$T/table.txt"
  for rep in $(seq "$REPS"); do
    for s in nginx2-h2c weft-2node; do
      if [ "$s" = weft-2node ]; then r=$(run_h2 "http://127.0.0.1:$(wport 1 1 2)/" uph2); else r=$(run_h2 "http://127.0.0.1:$H2F/"); fi
      read -r rps mean sd <<<"$r"
      printf "%-15s %3s | %8s %10s %10s\n" "h2c:$s" "$rep" "$rps" "$mean" "$sd" | tee -a "$T/table.txt"
    done
  done
fi

# ---------------------------------------------------------------- TCP
# redis-benchmark --csv: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
run_redis() { # port -> "get_rps get_p50 get_p99 set_rps"
  local out; out=$(timeout 120 redis-benchmark -h 127.0.0.1 -p "$1" -c "$CONNS" -n "$TCP_REQS" -t get,set --csv 2>&1)
  echo "$out" >> "$T/raw.txt"
  awk -F'"' '$2=="GET"{g=$4; p50=$10; p99=$14} $2=="SET"{s=$4} END{printf "%.0f %s %s %.0f\n", g, p50, p99, s}' <<<"$out"
}
if [ "$TCP" = 1 ]; then
  start redis redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no --protected-mode no
  nginx_stream_conf sa "$SA" "$SB"; nginx_stream_conf sb "$SB" "$RD"
  for n in sa sb; do start "$n" nginx -p "$T" -e "$T/$n.err" -c "$T/$n.conf" -g 'daemon off;'; done
  "$WEFT_BIN" --socket "$T/c1n2/weft.sock" register redis --port "$RD" --protocol tcp >"$T/register-redis.out" 2>&1 \
    && "$WEFT_BIN" --socket "$T/c1n1/weft.sock" upstream redis --listen "127.0.0.1:$WUP" >>"$T/register-redis.out" 2>&1 \
    || { log "weft TCP upstream failed"; cat "$T/register-redis.out" >&2; exit 1; }
  declare -A TPORT=([direct]=$RD [nginx2-stream]=$SA [weft-2node]=$WUP)
  for s in direct nginx2-stream weft-2node; do
    wait_until 30 "TCP $s answers PING" bash -c "redis-cli -h 127.0.0.1 -p ${TPORT[$s]} ping | grep -q PONG" || { dump_logs; exit 1; }
  done
  echo "# TCP: redis-benchmark -c $CONNS -n $TCP_REQS -t get,set (one request in flight per connection)" | tee -a "$T/table.txt"
  printf "%-18s %3s | %8s %7s %7s | %8s\n" scenario rep getRPS p50ms p99ms setRPS | tee -a "$T/table.txt"
  for rep in $(seq "$REPS"); do
    for s in direct nginx2-stream weft-2node; do
      read -r g p50 p99 st < <(run_redis "${TPORT[$s]}")
      printf "%-18s %3s | %8s %7s %7s | %8s\n" "tcp:$s" "$rep" "$g" "$p50" "$p99" "$st" | tee -a "$T/table.txt"
    done
  done
  awk '$1 ~ /^tcp:/ && $2 ~ /^[0-9]+$/ {c=++n[$1]; v[$1,c]=$4}
    function med(k,  c,i,j,t,a) { c=n[k]; for(i=1;i<=c;i++)a[i]=v[k,i]
      for(i=1;i<=c;i++)for(j=i+1;j<=c;j++)if(a[j]<a[i]){t=a[i];a[i]=a[j];a[j]=t}
      return (c%2 ? a[(c+1)/2] : (a[c/2]+a[c/2+1])/2) }
    END { if (n["tcp:weft-2node"] && n["tcp:nginx2-stream"]) { a=med("tcp:weft-2node"); b=med("tcp:nginx2-stream")
      printf "ratio TCP GET RPS weft-2node/nginx2-stream = %.2f  (%.0f / %.0f, medians over reps)\n", (b?a/b:0), a, b } }
  ' "$T/table.txt"
fi

# ---------------------------------------------------------------- 1 GiB stream
if [ "$STREAM_1G" = 1 ]; then
  for n in c1n1 c1n2; do eval "kill -TERM \$PID_$n" 2>/dev/null; done   # a fresh cluster for the memory check
  for n in c1n1 c1n2; do eval "p=\$PID_$n"; wait_until 10 "bench node $n to exit" bash -c "! kill -0 $p"; forget "$p"; done
  start_cluster 2 || { dump_logs; exit 1; }
  mem() { awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{printf "%.1f %.1f", r/1024, h/1024}' "/proc/$1/status"; }
  read -r r1a h1a < <(mem "$PID_c2n1"); read -r r2a h2a < <(mem "$PID_c2n2")
  # One direct read first: the first read of the sparse file maps its pages
  # (about 1 s here), which would otherwise be charged to whichever path ran first.
  curl -s --max-time 60 "http://127.0.0.1:${PORT[direct]}/big" -o /dev/null
  k1a=$(cpu_ticks c2n1); k2a=$(cpu_ticks c2n2)
  out=$(curl -s --max-time 120 -x "http://127.0.0.1:$(wport 2 1 2)" http://up/big -o /dev/null \
        -w '%{http_code} %{size_download} %{time_total}' 2>&1)
  read -r code bytes secs <<<"$out"
  read -r r1b h1b < <(mem "$PID_c2n1"); read -r r2b h2b < <(mem "$PID_c2n2")
  k1b=$(cpu_ticks c2n1); k2b=$(cpu_ticks c2n2)
  [ "$code" = 200 ] && [ "$bytes" = 1073741824 ] || log "# 1GiB stream: HTTP $code, $bytes bytes (expected 200, 1073741824)"
  printf '1GiB streamed: bytes=%s, %.1f s (%.0f MB/s), n1 RSS before/after/peak MB = %s/%s/%s, n2 RSS before/after/peak MB = %s/%s/%s\n' \
    "${bytes:-NA}" "${secs:-0}" "$(awk -v b="${bytes:-0}" -v s="${secs:-0}" 'BEGIN{print (s>0 ? b/s/1e6 : 0)}')" \
    "$r1a" "$r1b" "$h1b" "$r2a" "$r2b" "$h2b"
  ref=""; for s in direct nginx2; do
    ref+="$s $(curl -s --max-time 60 "http://127.0.0.1:${PORT[$s]}/big" -o /dev/null -w '%{size_download} B in %{time_total} s' 2>&1); "; done
  echo "# same 1 GiB without weft, for reference: $ref"
  echo "# (n1 = proxy side, n2 = the node holding the instance; peak = VmHWM after the stream, before it: n1 $h1a, n2 $h2a MB;" \
       "CPU during the stream: n1 $(awk -v t=$((k1b-k1a)) -v hz=$HZ 'BEGIN{printf "%.1f", t/hz}') s, n2 $(awk -v t=$((k2b-k2a)) -v hz=$HZ 'BEGIN{printf "%.1f", t/hz}') s)"
fi
echo "# total measured wall time: $((SECONDS - T_START)) s"
