#!/usr/bin/env bash
# How close does Entrepot's group-commit append get to what the disk can do?
#
# Runs fio on the disk that holds target/ with the same sync granularity as the log
# (sequential writes, fdatasync after each 64 KiB or 4 KiB block, and plain buffered
# writes), then the storage bench `append_sync_always/64` (64 concurrent appenders of
# 1 KiB records, each awaiting its fsync), and prints a table: fio MB/s, Entrepot MB/s and
# their ratio. Bounded: each fio job stops after 10 s or its size limit.
#
# Like with like: fio preallocates its file with fallocate (its default, `--fallocate=
# native`), as the log preallocates segments, so both write into unwritten extents; one
# flush of the log covers at most 64 records (~66 KiB of frames), fio's 64 KiB. The
# `overwrite` row (fio rewriting a file whose blocks are already written) shows what a
# sync costs without extent conversion. Since session 21 the log recycles freed segment
# files (`LogConfig::recycle_segments`; the bench's `append_in_flight` frees segments
# behind the durable offset as the broker's reclaim does), so in steady state it writes
# into written blocks too: both rows are the reference, the `overwrite` one the stricter.
# The last row compares with the mean of that fio job run before and after the bench (the
# disk's latency drifts on a shared machine). After the table: fio's fdatasync latency, the bench's own group-commit figures (bytes
# and records per flush, flushes/s, mean sync, the hand-off outside the sync per flush,
# bytes dirtied, appender page faults and CPU per flush) and the load average.
#
# Usage: benches/disk-limit.sh            (from anywhere in the workspace)
# Env:   FIO_SIZE (default 256m), FIO_RUNTIME (default 10), BENCH_FILTER (default
#        append_sync_always/64), BENCH_ARGS (extra criterion args, default short run),
#        FIO_BS (fio's block, i.e. its bytes per fdatasync, default 64k: set it to the
#        bench's bytes per flush for the in-flight shape, e.g. BENCH_FILTER=
#        append_in_flight/8x64 FIO_BS=256k — the sync granularity must match).
#        FIO_BS=auto runs the bench twice: once to measure its bytes per flush, then fio
#        at that block (rounded to 4 KiB) before and after the measured run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
work="$target/disk-limit"
fio_size="${FIO_SIZE:-256m}"
fio_runtime="${FIO_RUNTIME:-10}"
filter="${BENCH_FILTER:-append_sync_always/64}"
bench_args="${BENCH_ARGS:---warm-up-time 1 --measurement-time 5}"
fio_bs="${FIO_BS:-64k}"

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

# fio_sync_us NAME PERCENTILE → fdatasync latency percentile of job NAME, in µs
fio_sync_us() {
    jq --arg p "$2" '.jobs[0].sync.lat_ns.percentile[$p] // 0 | . / 1000 | floor' "$work/fio-$1.json"
}

report="$work/group-commit.txt"
if [ "$fio_bs" = auto ]; then
    step "calibration: cargo bench -p entrepot-storage --bench storage -- $filter (bytes per flush)"
    rm -f "$report"
    ENTREPOT_BENCH_REPORT="$report" cargo bench -p entrepot-storage --bench storage -- "$filter" \
        --warm-up-time 1 --measurement-time 3 >&2
    per_flush=$(grep "bench=$filter " "$report" | tail -1 | tr ' ' '\n' | sed -n 's/^bytes_per_flush=//p')
    fio_bs=$(awk -v b="${per_flush:-65536}" 'BEGIN { k = int(b / 4096 + 0.5); if (k < 1) k = 1; printf "%dk", k * 4 }')
    step "the bench syncs ${per_flush:-?} bytes per flush: fio runs with --bs=$fio_bs"
fi

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
fio_64k=$(run_fio sync64k --rw=write --bs="$fio_bs" --fdatasync=1)
fio_4k=$(run_fio sync4k --rw=write --bs=4k --fdatasync=1)
fio_buffered=$(run_fio buffered --rw=write --bs="$fio_bs")
fio_overwrite=$(run_fio overwrite64k --rw=write --bs="$fio_bs" --fdatasync=1 --overwrite=1)

step "cargo bench -p entrepot-storage --bench storage -- $filter $bench_args"
rm -f "$report"
# shellcheck disable=SC2086
ENTREPOT_BENCH_REPORT="$report" cargo bench -p entrepot-storage --bench storage -- "$filter" $bench_args >&2
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
# The same fio job again right after the bench: on a shared disk the fdatasync latency
# drifts from minute to minute, so the ratio that counts is against the mean of the two
# runs that bracket the bench.
fio_64k_after=$(run_fio sync64k-after --rw=write --bs="$fio_bs" --fdatasync=1)

estimates="$target/criterion/${filter}/new/estimates.json"
[ -f "$estimates" ] || { echo "no criterion estimates at $estimates" >&2; exit 1; }
mean_ns=$(jq '.mean.point_estimate' "$estimates")
record_bytes=1024 # Throughput::Bytes per iteration in storage/benches/storage.rs
entrepot=$(awk -v ns="$mean_ns" -v b="$record_bytes" 'BEGIN { printf "%.2f", b / ns * 1e3 }')
records=$(awk -v ns="$mean_ns" 'BEGIN { printf "%.0f", 1e9 / ns }')

echo
printf '%-34s %12s %14s %8s\n' "fio job (same disk)" "fio MB/s" "Entrepot MB/s" "ratio"
for row in "write bs=$fio_bs fdatasync=1:$fio_64k" "write bs=4k fdatasync=1:$fio_4k" "write bs=$fio_bs buffered:$fio_buffered" \
    "write bs=$fio_bs fdatasync=1 overwrite:$fio_overwrite"; do
    name="${row%%:*}"; mbs="${row##*:}"
    ratio=$(awk -v e="$entrepot" -v f="$mbs" 'BEGIN { if (f > 0) printf "%.2f", e / f; else print "n/a" }')
    printf '%-34s %12.2f %14s %8s\n' "$name" "$mbs" "$entrepot" "$ratio"
done
bracket=$(awk -v a="$fio_64k" -v b="$fio_64k_after" 'BEGIN { printf "%.2f", (a + b) / 2 }')
bracket_ratio=$(awk -v e="$entrepot" -v f="$bracket" 'BEGIN { if (f > 0) printf "%.2f", e / f; else print "n/a" }')
printf '%-34s %12.2f %14s %8s\n' "bs=$fio_bs fdatasync=1, before+after /2" "$bracket" "$entrepot" "$bracket_ratio"
echo
echo "fio bs=$fio_bs fdatasync=1 before the bench $fio_64k MB/s, after it $fio_64k_after MB/s"
echo "Entrepot: $filter, 1 KiB records, mean $(awk -v ns="$mean_ns" 'BEGIN { printf "%.0f", ns }') ns per record = $records records/s"
echo "fio fdatasync p50/p99 us: bs=$fio_bs $(fio_sync_us sync64k 50.000000)/$(fio_sync_us sync64k 99.000000)," \
    "bs=4k $(fio_sync_us sync4k 50.000000)/$(fio_sync_us sync4k 99.000000)," \
    "bs=$fio_bs overwrite $(fio_sync_us overwrite64k 50.000000)/$(fio_sync_us overwrite64k 99.000000)"
# The bench's last report line for $filter: key=value words (storage/benches/storage.rs).
line=$(grep "bench=$filter " "$report" 2>/dev/null | tail -1 || true)
if [ -n "$line" ]; then
    echo "$line" | awk '{
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        handoff = (v["flushes_per_s"] > 0) ? (1 - v["sync_share"]) / v["flushes_per_s"] * 1e6 : 0
        printf "Entrepot group commit: %.0f bytes (%.1f records) per flush, %.0f flushes/s, mean sync %.0f us, hand-off outside the sync %.0f us per flush\n",
            v["bytes_per_flush"], v["records_per_flush"], v["flushes_per_s"], v["sync_us_mean"], handoff
        printf "  per flush: %.0f bytes dirtied for the disk, %.1f page faults by appenders, %.0f us CPU (whole process)\n",
            v["dirtied_per_flush"], v["faults_per_flush"], v["cpu_us_per_flush"]
    }'
fi
echo "load average: $load_before before fio, $load_after after the bench ($(nproc) cores)"
