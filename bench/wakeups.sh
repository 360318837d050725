#!/usr/bin/env bash
# wakeups.sh -- where a lone request waits: latency at one request at a
# time, and what each proxy process does for it in the kernel's terms
# (times it slept and was woken, system calls), through the same chains as
# instructions.sh (bench/lib.sh's start_chains), plus `direct` (the
# upstream alone) and `weft-local` (n2's proxy to its own instance).
#
# For each chain, after WARMUP requests:
#   1. latency: N requests one at a time (oha -c 1), p50 and p99;
#   2. context switches: the same N again, each proxy process's voluntary
#      and involuntary switches summed over its threads (/proc), less what
#      the process does with no request for IDLE s, in proportion;
#   3. the same at RATE requests a second (oha -q, open loop, 5 s):
#      p50 and sleeps per request, as mesh_baseline.sh's fixed-rate run;
#   4. system calls: the same N under `strace -c -f` attached to every
#      thread of each proxy process (counts only: strace slows the calls
#      it counts, so its run is never the one timed).
# A voluntary context switch is a thread that went to sleep (epoll_wait,
# futex) and was woken again: on a lone request each one is a wake-up on
# the request's path, which is what latency at low load is made of.
#
# Installs what it needs (apt: nginx-light openssl jq strace; cargo: oha)
# and builds weft (`cargo build --release --locked -p weft`; WEFT_BIN=path
# skips the build). Only processes this script started are killed.
set -uo pipefail

N=${N:-2000}              # requests per pass
WARMUP=${WARMUP:-200}     # requests before anything is counted
IDLE=${IDLE:-5}           # s of no requests, to measure what runs anyway
PORT0=${PORT0:-39500}     # upstream; the proxies use PORT0+1..
RATE=${RATE:-2000}        # the fixed-rate pass, requests per second
KEEP=${KEEP:-0}           # 1: keep the temp dir (strace summaries, logs)

log() { printf '%s\n' "$*" >&2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

install_missing nginx:nginx-light openssl:openssl jq:jq strace:strace
need_oha || exit 1
need_weft || exit 1

T=$(mktemp -d /tmp/wakeups.XXXXXX); chmod 755 "$T"
PIDS=()
trap stop_all EXIT
start_chains start || exit 1

switches() { # proc: voluntary and involuntary context switches of all its threads
  cat /proc/"$(pid_of "$1")"/task/*/status 2>/dev/null |
    awk '/^voluntary_ctxt_switches/ {v += $2} /^nonvoluntary_ctxt_switches/ {n += $2} END {print v + 0, n + 0}'
}
load() { # chain url host c [oha args]: N requests, c at a time; fails unless all succeed
  local chain=$1 url=$2 host=$3 c=$4; shift 4
  "$OHA" -n "$N" -c "$c" "$@" --no-tui --output-format json -H "Host: $host" "$url" > "$T/$chain.json" 2>"$T/$chain.err" &&
    jq -e '.summary.successRate == 1' "$T/$chain.json" >/dev/null ||
    { log "# $chain: not every request succeeded"; cat "$T/$chain.err" >&2; exit 1; }
}
now() { date +%s.%N; }
traced() { # proc: every thread of it has a tracer
  ! grep -qs '^TracerPid:[[:space:]]*0$' /proc/"$(pid_of "$1")"/task/*/status
}

# sleeps key url host c procs...: context switches per request of each
# proc over N requests c at a time (at RATE when the key ends in @rate),
# less its idle rate
sleeps() {
  local key=$1 url=$2 host=$3 c=$4; shift 4
  local p rate=()
  [[ $key == *@rate ]] && rate=(-q "$RATE" --latency-correction)
  declare -A idle before
  for p in "$@"; do before[$p]=$(switches "$p"); done
  sleep "$IDLE"   # the idle window itself, not a wait for readiness
  for p in "$@"; do idle[$p]=$(switches "$p"); done
  local began; began=$(now)
  load "$key" "$url" "$host" "$c" "${rate[@]}"
  local took; took=$(awk -v a="$began" -v b="$(now)" 'BEGIN {print b - a}')
  for p in "$@"; do
    read -r v0 n0 <<<"${before[$p]}"; read -r v1 n1 <<<"${idle[$p]}"; read -r v2 n2 <<<"$(switches "$p")"
    CS[$key.$p]=$(awk -v a="$v0" -v b="$v1" -v c="$v2" -v s="$IDLE" -v d="$took" -v n="$N" \
      'BEGIN {printf "%.2f", ((c - b) - (b - a) / s * d) / n}')
    INV[$key.$p]=$(awk -v a="$n1" -v c="$n2" -v n="$N" 'BEGIN {printf "%.2f", (c - a) / n}')
  done
}

# measure chain port host procs...
measure() {
  local chain=$1 url="http://127.0.0.1:$2/" host=$3; shift 3
  local p
  "$OHA" -n "$WARMUP" -c 1 --no-tui -H "Host: $host" "$url" >/dev/null 2>&1
  load "$chain" "$url" "$host" 1
  P50[$chain]=$(jq '.latencyPercentiles.p50 * 1000' "$T/$chain.json")
  P99[$chain]=$(jq '.latencyPercentiles.p99 * 1000' "$T/$chain.json")
  ((${#@})) || return 0
  sleeps "$chain" "$url" "$host" 1 "$@"
  local n=$N; N=$((RATE * 5))
  sleeps "$chain@rate" "$url" "$host" 16 "$@"
  N=$n
  RP50[$chain]=$(jq '.latencyPercentiles.p50 * 1000' "$T/$chain@rate.json")
  for p in "$@"; do
    # -p attaches every thread of the process
    strace -c -f -qq -o "$T/strace.$chain.$p" -p "$(pid_of "$p")" &
    STRACES+=($!)
  done
  for p in "$@"; do wait_until 30 "strace attached to $p" traced "$p" || exit 1; done
  load "$chain" "$url" "$host" 1
  local s; for s in "${STRACES[@]}"; do kill -INT "$s" 2>/dev/null; done
  for s in "${STRACES[@]}"; do wait "$s" 2>/dev/null; done
  STRACES=()
  for p in "$@"; do
    # strace -c: "% time, seconds, usecs/call, calls, [errors,] syscall"
    SYS[$chain.$p]=$(awk -v n="$N" '$NF == "total" {printf "%.1f", $4 / n}' "$T/strace.$chain.$p")
    TOP[$chain.$p]=$(awk -v n="$N" '$1 ~ /^[0-9.]+$/ && $NF != "total" && $4 / n >= 0.5 {
        printf "%s %.1f, ", $NF, $4 / n}' "$T/strace.$chain.$p" | sed 's/, $//')
  done
}
declare -A P50 P99 RP50 CS INV SYS TOP
STRACES=()
measure direct "$PORT0" localhost
measure nginx2 "$((PORT0+1))" localhost na nb
measure nginx2-mtls "$((PORT0+3))" localhost ta tb
measure weft-local "$((PORT0+32))" up n2
measure weft-2node "$((PORT0+31))" up n1 n2

echo "# N=$N one at a time after $WARMUP, and $((RATE * 5)) at $RATE/s (oha -q, 16 connections); 1 KiB body"
echo "# weft: $("$WEFT_BIN" --version | head -n 1) (WEFT_BIN=$WEFT_BIN, --worker-threads 1); $(nginx -v 2>&1)"
echo "# per request and proxy process: sleeps = voluntary context switches less the idle rate (each a"
echo "# wake-up), one at a time and at $RATE/s; preempted = involuntary; system calls one at a time"
printf '%-12s | %6s %6s %7s | %-4s %6s %6s %5s %5s | %s\n' chain p50 p99 "p50@$RATE" proc sleeps "@$RATE" prmpt calls "system calls per request (>= 0.5)"
row() { # chain procs...
  local chain=$1 p lead; shift
  lead=$(printf '%-12s | %6.3f %6.3f %7s' "$chain" "${P50[$chain]}" "${P99[$chain]}" "$( [ -n "${RP50[$chain]:-}" ] && printf '%.3f' "${RP50[$chain]}" || echo -)")
  ((${#@})) || { echo "$lead |"; return; }
  for p in "$@"; do
    printf '%s | %-4s %6s %6s %5s %5s | %s\n' "$lead" "$p" "${CS[$chain.$p]}" "${CS[$chain@rate.$p]}" \
      "${INV[$chain.$p]}" "${SYS[$chain.$p]}" "${TOP[$chain.$p]}"
    lead=$(printf '%-12s | %6s %6s %7s' "" "" "" "")
  done
}
row direct; row nginx2 na nb; row nginx2-mtls ta tb; row weft-local n2; row weft-2node n1 n2
echo "# p50 and p99 in ms; direct is oha -> the upstream nginx, with no proxy"
