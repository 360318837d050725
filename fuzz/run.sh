#!/usr/bin/env bash
# Fuzzes weft's decoders with cargo-fuzz (libFuzzer) on nightly.
#
#   bash fuzz/run.sh                 # every target, 10 million runs each
#   RUNS=200000 bash fuzz/run.sh     # a short run (CI)
#   bash fuzz/run.sh wire_head       # one target
#
# Installs the nightly toolchain and cargo-fuzz if they are missing. Each
# target starts from its corpus in fuzz/corpus/<target> (kept between runs,
# not committed); a crash leaves its input in fuzz/artifacts/<target>/ and
# fails the script.
set -euo pipefail
cd "$(dirname "$0")"

RUNS="${RUNS:-10000000}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(wire_head body_framing sealed_open api_registration chitchat_delta)
fi

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

printf '%-18s %12s %10s %10s\n' target runs seconds "runs/s"
for target in "${TARGETS[@]}"; do
    mkdir -p "corpus/$target"
    # Heads reach 72 KiB; a sealed input is at most 8 short plaintexts.
    case "$target" in
        sealed_open) max_len=2100 ;;
        *) max_len=73800 ;;
    esac
    log="$(mktemp)"
    start=$(date +%s)
    if ! cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -runs="$RUNS" -max_len="$max_len" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    secs=$(( $(date +%s) - start ))
    done_runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "$RUNS")
    printf '%-18s %12s %10s %10s\n' "$target" "$done_runs" "$secs" "$(( done_runs / (secs > 0 ? secs : 1) ))"
    rm -f "$log"
done
