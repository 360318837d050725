#!/usr/bin/env bash
# instructions.sh -- instructions per request through two proxies, counted
# by valgrind's callgrind: a figure the noise of a shared machine cannot
# move, to keep beside mesh_baseline.sh's timed table.
#
# Three chains, each to the same upstream nginx (a static 1 KiB body, not
# counted), all on 127.0.0.1:
#   nginx2      : oha -> nginx A -> nginx B -> upstream
#   nginx2-mtls : oha -> nginx A -> TLS 1.3 with client certificates -> nginx B -> upstream
#   weft-2node  : oha -> weft n1 proxy -> QUIC (mTLS) -> weft n2 -> upstream
# Every proxy process runs under callgrind (nginx with one process and no
# master; weft with --worker-threads 1). For each chain: WARMUP requests,
# the counters zeroed, N requests at C at a time (oha), the counters
# dumped; instructions per request = the process's instructions / N.
# weft's are then split by stage from callgrind's inclusive costs of the
# functions that do each stage; what no stage claims (the runtime's
# scheduling, tracing, statistics, gossip and timers during the window,
# the allocator outside the stages) is "everything else". Allocations per
# request are the calls to malloc, calloc and realloc (glibc's, or in
# weft jemalloc's) in the same dumps
# (nginx allocates most of a request from its per-request pools, which
# these do not count).
#
# Counts are user space only: the kernel's TCP and UDP work is in neither
# side's figure. What a process runs with no request at all (weft's gossip
# and timers; nginx has next to nothing) is measured for IDLE s before the
# run and taken off in proportion to the run's time: under valgrind a
# request is ~50x slower, so background per request would otherwise be ~50x
# too big. Packet coalescing depends on timing, so weft's QUIC stages move
# by a few percent between runs; nginx's totals by well under 1%.
#
# Installs what it needs (apt: valgrind nginx-light openssl jq; cargo: oha)
# and builds weft (`cargo build --release --locked -p weft`; WEFT_BIN=path
# skips the build). Only processes this script started are killed.
set -uo pipefail

N=${N:-2000}              # requests counted per chain
C=${C:-4}                 # at a time
WARMUP=${WARMUP:-200}     # requests before the counters are zeroed
IDLE=${IDLE:-5}           # s of no requests, to measure what runs anyway
PORT0=${PORT0:-39400}     # upstream; the proxies use PORT0+1..
KEEP=${KEEP:-0}           # 1: keep the temp dir (callgrind files, logs)

log() { printf '%s\n' "$*" >&2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

install_missing valgrind:valgrind nginx:nginx-light openssl:openssl jq:jq
need_oha || exit 1
need_weft || exit 1

T=$(mktemp -d /tmp/instructions.XXXXXX); chmod 755 "$T"
PIDS=()
trap stop_all EXIT
callgrind() { # name cmd...: cmd under callgrind, dumps in $T/cg.<name>.*
  local name=$1; shift
  start "$name" valgrind --tool=callgrind --callgrind-out-file="$T/cg.$name" "$@"
}
start_chains callgrind || exit 1

zero() { # procs...: zeroes their counters (callgrind_control waits for each)
  local p
  for p in "$@"; do
    callgrind_control -z "$(pid_of "$p")" 2>&1 | grep -q OK || { log "# could not zero $p"; exit 1; }
  done
}
counted() { # proc: the instructions it ran since its counters were zeroed
  local p=$1
  rm -f "$T/cg.$p".*
  callgrind_control -d "$(pid_of "$p")" 2>&1 | grep -q OK || return 1
  wait_until 60 "$p's dump" grep -qs '^totals:' "$T"/cg."$p".* || return 1
  awk '/^totals:/ {print $2}' "$T"/cg."$p".*
}
count() { # var proc: sets var to counted proc, or stops the script
  local counted_ir
  counted_ir=$(counted "$2") && [ "${counted_ir:-0}" -gt 0 ] || { log "# no count from $2"; exit 1; }
  printf -v "$1" '%s' "$counted_ir"
}
# allocations proc: calls to malloc, calloc and realloc in its last dump,
# glibc's or jemalloc's (weft's allocator: _rjem_malloc, _rjem_mallocx...)
# (the dump names a function once as "(id) name", then as "(id)"; each
# "calls=N" line counts the calls to the "cfn" line before it)
allocations() {
  awk '
    /^c?fn=\(/ { id = $0; sub(/^c?fn=/, "", id); name = id; sub(/\) .*/, ")", id)
                  if (name != id) { sub(/^\([0-9]+\) /, "", name); names[id] = name } }
    /^cfn=/     { callee = names[id] }
    /^calls=/   { if (callee ~ /^(_rjem_)?(malloc|mallocx|calloc|realloc|rallocx)('"'"'[0-9]+)?$/) { split($0, c, /[= ]/); n += c[2] } }
    END { print n + 0 }' "$T"/cg."$1".*
}
now() { date +%s.%N; }
# measure chain port host procs...: instructions per request of each
# process, less what it runs with no request at all (gossip, timers:
# measured for IDLE s first, and taken off in proportion to the run's time).
measure() {
  local chain=$1 port=$2 host=$3; shift 3
  local url="http://127.0.0.1:$port/" p
  declare -A idle
  "$OHA" -n "$WARMUP" -c "$C" --no-tui -H "Host: $host" "$url" >/dev/null 2>&1
  zero "$@"
  sleep "$IDLE"   # the idle window itself, not a wait for readiness
  local ir
  declare -A idle_allocs
  for p in "$@"; do count ir "$p"; idle[$p]=$ir; idle_allocs[$p]=$(allocations "$p"); done
  zero "$@"
  local began; began=$(now)
  "$OHA" -n "$N" -c "$C" --no-tui -H "Host: $host" "$url" > "$T/$chain.oha" 2>&1
  local took; took=$(awk -v a="$began" -v b="$(now)" 'BEGIN {print b - a}')
  grep -q 'Success rate:.*100.00%' "$T/$chain.oha" || { log "# $chain: not every request succeeded"; cat "$T/$chain.oha" >&2; exit 1; }
  for p in "$@"; do
    local all; count all "$p"
    BG[$p]=$(awk -v i="${idle[$p]}" -v s="$IDLE" -v d="$took" -v n="$N" 'BEGIN {printf "%d", i / s * d / n}')
    IR[$p]=$(( all / N - BG[$p] ))
    ALLOCS[$p]=$(awk -v i="${idle_allocs[$p]}" -v a="$(allocations "$p")" -v s="$IDLE" -v d="$took" -v n="$N" \
      'BEGIN {printf "%.1f", (a - i / s * d) / n}')
  done
}
declare -A IR BG ALLOCS
measure nginx2 "$((PORT0+1))" localhost na nb
measure nginx2-mtls "$((PORT0+3))" localhost ta tb
measure weft-2node "$((PORT0+31))" up n1 n2

echo "# instructions per request (callgrind, user space), N=$N at C=$C after $WARMUP, 1 KiB body"
echo "# weft: $("$WEFT_BIN" --version | head -n 1) (WEFT_BIN=$WEFT_BIN); $(nginx -v 2>&1)"
printf '%-12s | %9s %9s | %9s | %s\n' chain "proxy A" "proxy B" both "vs nginx2"
row() { # chain a b
  local both=$((IR[$2] + IR[$3])) base=$((IR[na] + IR[nb]))
  printf '%-12s | %9d %9d | %9d | %sx\n' "$1" "${IR[$2]}" "${IR[$3]}" "$both" "$(awk "BEGIN {printf \"%.2f\", $both / $base}")"
}
row nginx2 na nb; row nginx2-mtls ta tb; row weft-2node n1 n2
echo "# allocations per request (calls to malloc, calloc, realloc, less the idle rate; nginx also allocates from per-request pools): nginx2 ${ALLOCS[na]} + ${ALLOCS[nb]}, nginx2-mtls ${ALLOCS[ta]} + ${ALLOCS[tb]}, weft-2node ${ALLOCS[n1]} + ${ALLOCS[n2]}"
echo "# taken off as background (idle rate x run time, per request): nginx2 $((BG[na] + BG[nb])), nginx2-mtls $((BG[ta] + BG[tb])), weft-2node $((BG[n1] + BG[n2]))"

# weft-2node by stage: the largest inclusive cost of each function named
# (inlined copies appear more than once), summed over a stage's functions.
for n in n1 n2; do
  callgrind_annotate --inclusive=yes --threshold=99.99 "$T"/cg.$n.* > "$T/annotate.$n" 2>/dev/null
done
python3 - "$T/annotate.n1" "$T/annotate.n2" "$N" "${IR[n1]}" "${IR[n2]}" <<'PY'
import re, sys

def inclusive(path):
    best = {}
    for line in open(path):
        m = re.match(r'^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)$', line)
        if not m:
            continue
        where = re.sub(r' \[[^\]]*\]$', '', m.group(2))
        name = re.sub(r' \(\d[\d,]*x\)$', '', where.split(':', 1)[-1])
        best[name] = max(best.get(name, 0), int(m.group(1).replace(',', '')))
    return best

n1, n2 = inclusive(sys.argv[1]), inclusive(sys.argv[2])
n = int(sys.argv[3])
totals = int(sys.argv[4]), int(sys.argv[5])
QUIC_SEND = ["quinn_proto::connection::Connection::poll_transmit",
             "<quinn::runtime::tokio::UdpSocket as quinn::runtime::AsyncUdpSocket>::try_send"]
QUIC_RECV = ["quinn::endpoint::RecvState::poll_socket",
             "quinn_proto::connection::Connection::handle_event"]
STAGES = [  # stage, n1's functions, n2's
    ("accept and parse", ["hyper::proto::h1::conn::Conn<I,B,T>::poll_read_head",
                          "weft_runtime::dataplane::request::Forward::parse"], []),
    ("pick", ["weft_runtime::dataplane::outbound::pick_http"], []),
    ("wire encode", ["weft_runtime::wire::encode"], ["weft_runtime::wire::encode"]),
    ("QUIC send", QUIC_SEND, QUIC_SEND),
    ("QUIC receive", QUIC_RECV, QUIC_RECV),
    ("wire decode", ["weft_runtime::wire::decode"], ["weft_runtime::wire::decode"]),
    ("instance call", [], ["weft_runtime::dataplane::pool::Http1Pool::connect::{{closure}}::{{closure}}",
                           "weft_runtime::dataplane::local::LocalClients::call::{{closure}}"]),
    ("response back", ["weft_runtime::dataplane::outbound::response",
                       "hyper::proto::h1::conn::Conn<I,B,T>::write_head"], []),
]
print("# weft-2node by stage, instructions per request (n1 = proxy side, n2 = serving side)")
print(f"{'stage':<18} | {'n1':>7} {'n2':>7} | {'both':>7}")
claimed = [0, 0]
for stage, f1, f2 in STAGES:
    per = [sum(side.get(f, 0) for f in fs) // n for side, fs in ((n1, f1), (n2, f2))]
    missing = [f for side, fs in ((n1, f1), (n2, f2)) for f in fs if f not in side]
    claimed = [c + p for c, p in zip(claimed, per)]
    note = f"  (not found: {', '.join(missing)})" if missing else ""
    print(f"{stage:<18} | {per[0]:>7} {per[1]:>7} | {sum(per):>7}{note}")
rest = [t - c for t, c in zip(totals, claimed)]
print(f"{'everything else':<18} | {rest[0]:>7} {rest[1]:>7} | {sum(rest):>7}")
print(f"{'total':<18} | {totals[0]:>7} {totals[1]:>7} | {sum(totals):>7}")
PY
