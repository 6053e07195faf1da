#!/usr/bin/env bash
# Fuzz the NBD code for a bounded time: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Runs each cargo-fuzz target in fuzz/ (default: all of them) for
# SECONDS_PER_TARGET seconds (default 30), starting from a seed corpus
# generated with nbdcp's own encoders, and prints how many executions each
# target ran and whether anything was found. Exits 1 on a finding; the
# input is saved under fuzz/artifacts/TARGET/ (reproduce it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...`).
#
# Not part of scripts/test.sh: it is slow. libFuzzer needs nightly-only
# compiler flags; on a stable toolchain they are unlocked with
# RUSTC_BOOTSTRAP=1. Installs cargo-fuzz from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
shift || true
all_targets=(wire_decoders handshake replies uri)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;; esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
rustc --version | grep -q nightly || export RUSTC_BOOTSTRAP=1

# Longest input per target: the decoders and URIs need little; the reply
# stream needs room for a few data chunks.
max_len() {
    case "$1" in
        replies) echo 65536 ;;
        handshake) echo 16384 ;;
        *) echo 4096 ;;
    esac
}

echo "scripts/fuzz.sh: building fuzz targets" >&2
cargo fuzz build >&2
(cd fuzz && cargo run -q --example gen_seeds -- corpus) >&2

logs=fuzz/artifacts/logs
mkdir -p "$logs"
found=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="$logs/$t.log"
    echo "scripts/fuzz.sh: fuzzing $t for ${secs}s" >&2
    # -malloc_limit_mb makes any single large allocation a finding: the
    # decoders bound every length before allocating, so nothing here
    # should ever ask for more than a few MiB. -timeout makes a hang one.
    status=0
    cargo fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=30 \
        -rss_limit_mb=2048 -malloc_limit_mb=64 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -n "$runs" ] || runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)
    [ -n "$runs" ] || runs="?"
    if [ "$status" = 0 ]; then
        result="no finding"
    else
        found=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)/\1/p' "$log" | tail -1)
        result="FINDING (exit $status) ${artifact:-see $log}"
        grep -m5 -E "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer|out-of-memory|timeout" "$log" >&2 || true
    fi
    summary+=("$(printf '%-14s %12s  %s' "$t" "$runs" "$result")")
done

printf '\n%-14s %12s  %s\n' target executions result
printf '%s\n' "${summary[@]}"
exit "$found"
