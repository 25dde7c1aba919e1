#!/usr/bin/env bash
# How close does Entrepot's group-commit append get to what the disk can do?
#
# Runs fio on the disk that holds target/ with the same sync granularity as the log
# (sequential writes, fdatasync after each 64 KiB or 4 KiB block, and plain buffered
# writes), then the storage bench `append_sync_always/64` (64 concurrent appenders of
# 1 KiB records, each awaiting its fsync), and prints a table: fio MB/s, Entrepot MB/s and
# their ratio. Bounded: each fio job stops after 10 s or its size limit.
#
# Usage: benches/disk-limit.sh            (from anywhere in the workspace)
# Env:   FIO_SIZE (default 256m), FIO_RUNTIME (default 10), BENCH_FILTER (default
#        append_sync_always/64), BENCH_ARGS (extra criterion args, default short run).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
work="$target/disk-limit"
fio_size="${FIO_SIZE:-256m}"
fio_runtime="${FIO_RUNTIME:-10}"
filter="${BENCH_FILTER:-append_sync_always/64}"
bench_args="${BENCH_ARGS:---warm-up-time 1 --measurement-time 5}"

step() { echo "==> $*" >&2; }

if ! command -v fio >/dev/null; then
    step "fio not found, installing it with apt-get"
    if ! apt-get install -y fio >/dev/null 2>&1; then
        step "apt-get install failed, running apt-get update first"
        apt-get update >/dev/null
        apt-get install -y fio >/dev/null
    fi
fi
command -v jq >/dev/null || { step "jq not found, installing it"; apt-get install -y jq >/dev/null 2>&1 || { apt-get update >/dev/null; apt-get install -y jq >/dev/null; }; }

mkdir -p "$work"
step "fio and the bench write under $work ($(df -h --output=source,fstype "$work" | tail -1 | tr -s ' '))"

# run_fio NAME ARGS... → prints MB/s (10^6 bytes per second)
run_fio() {
    local name="$1"; shift
    step "fio $name: $* (size $fio_size, at most ${fio_runtime}s)"
    local out="$work/fio-$name.json"
    fio --name="$name" --directory="$work" --filename="fio-$name.dat" --ioengine=psync \
        --size="$fio_size" --runtime="$fio_runtime" \
        --output-format=json --output="$out" "$@" >/dev/null
    rm -f "$work/fio-$name.dat"
    jq '.jobs[0].write.bw_bytes / 1e6' "$out"
}

fio_64k=$(run_fio sync64k --rw=write --bs=64k --fdatasync=1)
fio_4k=$(run_fio sync4k --rw=write --bs=4k --fdatasync=1)
fio_buffered=$(run_fio buffered --rw=write --bs=64k)

step "cargo bench -p entrepot-storage --bench storage -- $filter $bench_args"
# shellcheck disable=SC2086
cargo bench -p entrepot-storage --bench storage -- "$filter" $bench_args >&2

estimates="$target/criterion/${filter}/new/estimates.json"
[ -f "$estimates" ] || { echo "no criterion estimates at $estimates" >&2; exit 1; }
mean_ns=$(jq '.mean.point_estimate' "$estimates")
record_bytes=1024 # Throughput::Bytes per iteration in storage/benches/storage.rs
entrepot=$(awk -v ns="$mean_ns" -v b="$record_bytes" 'BEGIN { printf "%.2f", b / ns * 1e3 }')
records=$(awk -v ns="$mean_ns" 'BEGIN { printf "%.0f", 1e9 / ns }')

echo
printf '%-34s %12s %14s %8s\n' "fio job (same disk)" "fio MB/s" "Entrepot MB/s" "ratio"
for row in "write bs=64k fdatasync=1:$fio_64k" "write bs=4k fdatasync=1:$fio_4k" "write bs=64k buffered:$fio_buffered"; do
    name="${row%%:*}"; mbs="${row##*:}"
    ratio=$(awk -v e="$entrepot" -v f="$mbs" 'BEGIN { if (f > 0) printf "%.2f", e / f; else print "n/a" }')
    printf '%-34s %12.2f %14s %8s\n' "$name" "$mbs" "$entrepot" "$ratio"
done
echo
echo "Entrepot: $filter, 1 KiB records, mean $(awk -v ns="$mean_ns" 'BEGIN { printf "%.0f", ns }') ns per record = $records records/s"
