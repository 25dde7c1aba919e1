#!/usr/bin/env bash
# Many addresses on a 3-node `--cluster-mode groups` cluster (issue 12: "10,000 addresses
# on a 3-node cluster: RSS per node and idle CPU reported; idle CPU below 5 % of a core").
#
# Starts three release-build nodes on 127.0.0.1, declares COUNT queues the way clients do
# (`entrepot-bench declare`: a sender attached to each, redirects followed to the queue's
# leader, one persistent 1 KiB message sent to each and accepted), waits until every node
# has opened every group and each group has a leader, lets the cluster settle, then
# measures over IDLE seconds of idleness per node: RSS (VmRSS of /proc/PID/status) and
# CPU (utime+stime delta of /proc/PID/stat ÷ wall time, in % of one core), plus memory per
# group replica ((RSS after − RSS of the same node with no address) ÷ groups; every node
# holds a replica of every group at 3 nodes). Then checks a sample of the queues still
# serves: a consumer takes each sample queue's message (waking it when hibernated).
#
# Usage: benches/many_groups.sh
# Env: COUNT (addresses, default 10000), IDLE (s of idle measurement, default 30, at least
#      30 for the issue's figure), SETTLE (s before it, default 15), CONNECTIONS (declaring
#      connections, default 16), HIBERNATE (1: `--hibernate-groups`, default 1), SAMPLE
#      (queues read back at the end, default 20), TIMEOUT (s for each declaration batch,
#      3600), BATCH (addresses declared per `entrepot-bench declare` run, one after the
#      other; default COUNT: one run), NO_BUILD (1: use the release binaries as they are),
#      BROKER_BIN (the broker binary to measure, default the release build's: to compare
#      two builds with the same load generator), BENCH_BIN (likewise, `entrepot-bench`).
#      PERF_SECS (with `perf` installed: `perf record -g` on node 0 for that many seconds
#      after the idle measurement, report in $CARGO_TARGET_DIR/many-groups/perf.txt).
# Output: the table on stdout, the last line `many groups: COUNT=N hibernate=H
# rss_mib=a/b/c idle_cpu_pct=x/y/z kib_per_group_replica=k/l/m`; logs under
# $CARGO_TARGET_DIR/many-groups/. Every process started here is stopped on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/many-groups"
count="${COUNT:-10000}"
idle="${IDLE:-30}"
settle="${SETTLE:-15}"
connections="${CONNECTIONS:-16}"
hibernate="${HIBERNATE:-1}"
sample="${SAMPLE:-20}"
declare_timeout="${TIMEOUT:-3600}"
bin="${BROKER_BIN:-$target/release/entrepot}"
batch="${BATCH:-$count}"
bench_bin="${BENCH_BIN:-$target/release/entrepot-bench}"
work="$(mktemp -d)"
pids=()
hz="$(getconf CLK_TCK)"

step() { echo "==> $(date -u +%H:%M:%S) $*" >&2; }
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # Gone before the next run binds the same ports.
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

if [ "${NO_BUILD:-0}" != 1 ]; then
    step "building the release binaries (the broker, entrepot-bench)"
    cargo build --release --quiet --bin entrepot
    cargo build --release --quiet -p entrepot-bench
fi
mkdir -p "$out"
rm -f "$out"/*.log

peers="0=127.0.0.1:7420/5760,1=127.0.0.1:7421/5761,2=127.0.0.1:7422/5762"
urls="amqp://127.0.0.1:5760,amqp://127.0.0.1:5761,amqp://127.0.0.1:5762"
flags=(--cluster-mode groups)
[ "$hibernate" = 1 ] && flags+=(--hibernate-groups)
declare -A node_pid
for i in 0 1 2; do
    RUST_LOG="${RUST_LOG:-error}" "$bin" serve --node-id "$i" --peers "$peers" \
        --cluster-listen "127.0.0.1:742$i" --listen "127.0.0.1:576$i" --http "127.0.0.1:186$i" \
        --data-dir "$work/n$i" "${flags[@]}" >>"$out/n$i.log" 2>&1 &
    pids+=($!)
    node_pid[$i]=$!
done

status_field() { # status_field NODE FIELD → the value of `  FIELD:` in /status (groups:), or 0
    local v
    v=$(curl -s --max-time 10 "http://127.0.0.1:186$1/status" | awk -v f="  $2:" 'index($0, f) == 1 {print $2; exit}') || true
    echo "${v:-0}"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

step "waiting for the three nodes to be ready"
for i in 0 1 2; do
    for _ in $(seq 1 600); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:186$i/readyz")" = 200 ] && continue 2
        sleep 0.1
    done
    step "node $i not ready: $(tail -n 3 "$out/n$i.log")"
    exit 1
done
sleep 2
declare -A rss0
for i in 0 1 2; do rss0[$i]=$(rss_kib "${node_pid[$i]}"); done
step "ready; RSS with no address: ${rss0[0]} / ${rss0[1]} / ${rss0[2]} KiB"

step "declaring $count queues over $connections connections, one message each, $batch per batch"
t0=$(date +%s)
declare_ok=1
: >"$out/declare.txt"
: >"$out/declare.log"
from=0
while [ "$from" -lt "$count" ]; do
    to=$(( from + batch > count ? count : from + batch ))
    step "declaring many-$from .. many-$(( to - 1 ))"
    range=(--count "$to")
    [ "$from" = 0 ] || range+=(--from "$from")
    "$bench_bin" declare --url "$urls" --prefix many "${range[@]}" \
        --connections "$connections" --send --timeout "$declare_timeout" \
        2> >(tee -a "$out/declare.log" >&2) | tee -a "$out/declare.txt" || declare_ok=0
    from=$to
done
declared_s=$(( $(date +%s) - t0 ))
# The figures are still measured when some addresses failed (reported, and the script
# fails at the end): the groups the cluster did place are what it holds.
failed=$(awk '/^declared/ {f += $4 - $2} END {print f + 0}' "$out/declare.txt")
[ "$declare_ok" = 1 ] || step "declaration incomplete: ${failed:-?} of $count addresses not declared"

step "waiting until every node has opened every group placed and each has a leader"
deadline=$(( $(date +%s) + 600 ))
while :; do
    open=(); led=0
    for i in 0 1 2; do
        o=$(status_field "$i" open); l=$(status_field "$i" led)
        open+=("${o:-0}"); led=$(( led + ${l:-0} ))
    done
    # Placed groups (group 0 excluded) every node opened, each led by one node.
    if [ "${open[0]}" = "${open[1]}" ] && [ "${open[1]}" = "${open[2]}" ] && [ "$led" -ge "${open[0]}" ] &&
        { [ "${open[0]}" -ge "$count" ] || [ "$declare_ok" = 0 ]; }; then
        count_held="${open[0]}"
        break
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then
        step "not converged: open ${open[*]}, led $led"
        exit 1
    fi
    step "open ${open[*]}, led $led"
    sleep 5
done
leads=""
for i in 0 1 2; do leads="$leads$(status_field "$i" led)/"; done
step "converged (leaders per node ${leads%/}); settling ${settle}s"
sleep "$settle"

step "measuring ${idle}s of idleness"
declare -A c0 c1 r1
for i in 0 1 2; do c0[$i]=$(cpu_ticks "${node_pid[$i]}"); done
w0=$(date +%s.%N)
sleep "$idle"
w1=$(date +%s.%N)
for i in 0 1 2; do c1[$i]=$(cpu_ticks "${node_pid[$i]}"); r1[$i]=$(rss_kib "${node_pid[$i]}"); done

rss_list=""; cpu_list=""; per_list=""
rows=""
for i in 0 1 2; do
    cpu=$(echo "(${c1[$i]} - ${c0[$i]}) / $hz / ($w1 - $w0) * 100" | bc -l)
    per=$(echo "(${r1[$i]} - ${rss0[$i]}) / $count_held" | bc -l)
    rows="$rows$(printf '| %s | %.1f | %.1f | %.1f | %.2f | %s |' "$i" "$(echo "${rss0[$i]}/1024" | bc -l)" \
        "$(echo "${r1[$i]}/1024" | bc -l)" "$per" "$cpu" "$(status_field "$i" led)")"$'\n'
    rss_list="$rss_list$(printf '%.0f' "$(echo "${r1[$i]}/1024" | bc -l)")/"
    cpu_list="$cpu_list$(printf '%.2f' "$cpu")/"
    per_list="$per_list$(printf '%.1f' "$per")/"
done
{
    echo "| node | RSS no address (MiB) | RSS with $count_held groups (MiB) | KiB per group replica | idle CPU (% of a core) | groups led |"
    echo "|---|---|---|---|---|---|"
    printf '%s' "$rows"
} | tee "$out/table.md"

if [ -n "${PERF_SECS:-}" ] && command -v perf >/dev/null; then
    step "perf record -g on node 0 for ${PERF_SECS}s of idleness"
    perf record -F 499 -g -o "$out/perf.data" -p "${node_pid[0]}" -- sleep "$PERF_SECS" >/dev/null 2>&1 || true
    perf report -i "$out/perf.data" --no-children --percent-limit 1 --stdio 2>/dev/null |
        head -n 200 >"$out/perf.txt" || true
    step "profile in $out/perf.txt"
fi

running=""
for i in 0 1 2; do
    r=$(curl -s --max-time 10 "http://127.0.0.1:186$i/metrics" | awk '$1 == "entrepot_groups_running" {print $2; exit}') || true
    running="$running${r:-?}/"
done
step "groups running (not hibernated) per node: ${running%/} of $count_held"

step "reading back $sample sample queues (a consumer takes each one's message)"
"$bench_bin" declare --url "$urls" --prefix many --count "$count" --every $(( (count + sample - 1) / sample )) \
    --connections 4 --receive --timeout 600 >"$out/sample.log" 2>&1 ||
    { step "sample queues not read back: $(tail -n 3 "$out/sample.log")"; exit 1; }
step "every sample queue gave back its message"
[ "$declare_ok" = 1 ] || { step "FAILED: ${failed:-?} addresses not declared (see $out/declare.log)"; exit_code=1; }

echo "declared in ${declared_s}s; command: COUNT=$count BATCH=$batch IDLE=$idle HIBERNATE=$hibernate benches/many_groups.sh"
echo "many groups: COUNT=$count groups_held=$count_held hibernate=$hibernate rss_mib=${rss_list%/} idle_cpu_pct=${cpu_list%/} kib_per_group_replica=${per_list%/} running=${running%/}"
exit "${exit_code:-0}"
