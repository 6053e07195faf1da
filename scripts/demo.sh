#!/usr/bin/env bash
# Build nbdcp and copy a sparse test image with it: data, written zero
# blocks and holes, a size that is a multiple of nothing. Verifies the copy
# byte for byte and prints size, time and throughput. Needs only cargo and
# coreutils. Usage: scripts/demo.sh [SIZE_MIB] (default 1024).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}

cargo build --release --quiet
bin=target/release/nbdcp
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/disk.img
dst=$work/copy.img

# Every 8 MiB: 2 MiB of random data, 1 MiB of written zeroes, 5 MiB hole.
truncate -s "$((size_mib * 1024 * 1024 + 12345))" "$src"
for ((mib = 0; mib < size_mib; mib += 8)); do
    dd if=/dev/urandom of="$src" bs=1M count=2 seek=$mib conv=notrunc status=none
    dd if=/dev/zero of="$src" bs=1M count=1 seek=$((mib + 2)) conv=notrunc status=none
done
printf 'tail' | dd of="$src" bs=1 seek=$((size_mib * 1024 * 1024 + 12000)) conv=notrunc status=none
sync

start=$(date +%s.%N)
"$bin" "$src" "$dst"
end=$(date +%s.%N)

cmp "$src" "$dst"
bytes=$(stat -c %s "$src")
awk -v b="$bytes" -v s="$start" -v e="$end" \
    -v as="$(du -k "$src" | cut -f1)" -v ad="$(du -k "$dst" | cut -f1)" 'BEGIN {
    t = e - s
    printf "copied %.1f MiB in %.3f s (%.0f MiB/s); verified byte for byte\n", b / 1048576, t, b / 1048576 / t
    printf "allocated: source %.1f MiB, copy %.1f MiB (holes and zero blocks left unallocated)\n", as / 1024, ad / 1024
}'
