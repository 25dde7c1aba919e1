#!/usr/bin/env bash
# Large messages (issue 15): 1 MiB and 10 MiB persistent messages through Entrepot and
# through a RabbitMQ classic durable queue, driven by the same `entrepot-bench`, with each
# broker's memory sampled from /proc while it runs.
#
# Workload per size: 1 producer keeping WINDOW unsettled, 1 consumer granting WINDOW
# credit, so at most about 2 x WINDOW messages are between the clients at any time: the
# "in-flight window" of issue 15's goal, peak RSS <= 8 x message size x WINDOW.
#
# Memory, from /proc/PID/status of the broker process (RabbitMQ: beam.smp):
#   VmHWM    peak resident set over the run (reset with `5 > clear_refs` before each run;
#            Entrepot is started fresh per size anyway)
#   RssAnon  private memory (heap, buffers): the peak of samples every SAMPLE_MS
#   RssFile  file pages mapped into the process: for Entrepot the segments it mmaps,
#            page cache that the kernel can drop and write back, not memory it allocated
# CPU: utime+stime of the broker process over the run, per message delivered.
#
# Usage: benches/large-messages.sh   (from anywhere in the workspace)
# Env:   SIZES (bytes, default "1048576 10485760"), WINDOW (default 8), DURATION (s per run,
#        default 10), WARMUP (s, default 2), BROKERS (default "entrepot rabbitmq-classic"),
#        ENTREPOT_SYNC (default always), ENTREPOT_PORT (default 5693), SAMPLE_MS (default 100),
#        ENTREPOT_ARGS (more `entrepot serve` flags, e.g. "--segment-bytes 33554432
#        --max-message-bytes 16777216": the file-backed RSS follows the segment size),
#        PEERS_DIR (default ../shared/peers), PEERS_STATE_DIR (default /var/tmp/amqp-peers).
# Output: a table on stdout; one JSON per run and the logs under target/large-messages/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
peers="${PEERS_DIR:-$root/../shared/peers}"
peers_state="${PEERS_STATE_DIR:-/var/tmp/amqp-peers}"
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/large-messages"
sizes="${SIZES:-1048576 10485760}"
window="${WINDOW:-8}"
duration="${DURATION:-10}"
warmup="${WARMUP:-2}"
brokers="${BROKERS:-entrepot rabbitmq-classic}"
entrepot_port="${ENTREPOT_PORT:-5693}"
entrepot_http="${ENTREPOT_HTTP_PORT:-18093}"
sample_ms="${SAMPLE_MS:-100}"
# Hard bound on one run: the generator's own --timeout, and this script's wait for it.
run_timeout=$(( duration + warmup + 120 ))
# The goal's factor: peak RSS <= GOAL_FACTOR x message size x WINDOW.
goal_factor=8

step() { echo "==> $*" >&2; }
command -v jq >/dev/null || { echo "jq is needed (apt-get install jq)" >&2; exit 1; }
mkdir -p "$out"
for b in $brokers; do rm -f "$out"/*-"$b".json "$out"/*-"$b".txt; done

step "cargo build --release --bin entrepot; cargo build --release -p entrepot-bench"
cargo build --release --bin entrepot >&2
cargo build --release -p entrepot-bench >&2
bin="$target/release/entrepot"
bench_bin="$target/release/entrepot-bench"

started_pid=""
started_peer=""
stop_entrepot() {
    if [ -n "$started_pid" ] && kill -0 "$started_pid" 2>/dev/null; then
        kill "$started_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$started_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$started_pid" 2>/dev/null || true
    fi
    started_pid=""
}
cleanup() {
    stop_entrepot
    if [ -n "$started_peer" ]; then "$peers/$started_peer.sh" stop >/dev/null 2>&1 || true; fi
    started_peer=""
}
trap cleanup EXIT

wait_port() { # wait_port PORT: bounded, 30 s
    for _ in $(seq 150); do
        ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
        sleep 0.2
    done
    echo "nothing listens on 127.0.0.1:$1 after 30 s" >&2
    return 1
}

start_entrepot() {
    local data="$out/entrepot-data"
    rm -rf "$data"
    "$bin" serve --listen "127.0.0.1:$entrepot_port" --http "127.0.0.1:$entrepot_http" \
        --data-dir "$data" --sync "${ENTREPOT_SYNC:-always}" ${ENTREPOT_ARGS:-} >"$out/entrepot.log" 2>&1 &
    started_pid=$!
    wait_port "$entrepot_port"
}

# start_rabbitmq: ../shared/peers/rabbitmq.sh, unless it already runs (then left running).
amqp_url="amqp://guest:guest@127.0.0.1:${RABBITMQ_AMQP_PORT:-5682}"
start_rabbitmq() {
    if "$peers/rabbitmq.sh" status >/dev/null 2>&1; then
        step "rabbitmq already running: using it, and leaving it running"
        return
    fi
    step "starting rabbitmq with $peers/rabbitmq.sh"
    started_peer=rabbitmq
    local said
    said=$("$peers/rabbitmq.sh" start 2>&1) || { echo "$said" >&2; exit 1; }
    local url
    url=$(echo "$said" | sed -n 's/^ *AMQP_URL=\([^ ]*\).*/\1/p' | tail -1)
    [ -z "$url" ] || amqp_url="$url"
}

broker_pid() { # broker_pid BROKER → the process whose memory and CPU are the broker's
    case "$1" in
        entrepot) echo "$started_pid" ;;
        rabbitmq-*) cat "$peers_state/rabbitmq/beam.pid" 2>/dev/null || pgrep -o beam.smp ;;
    esac
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
status_kib() { # status_kib PID FIELD → the field of /proc/PID/status in KiB (0 if gone)
    awk -v f="$2:" '$1 == f {print $2; found=1} END {if (!found) print 0}' "/proc/$1/status" 2>/dev/null || echo 0
}
clk_tck=$(getconf CLK_TCK)

# run BROKER SIZE → $out/SIZE-BROKER.json: the generator's figures plus memory and CPU.
run() {
    local broker="$1" size="$2" conn addr
    local name="s${size}" json="$out/s$2-$1.json"
    case "$broker" in
        entrepot) conn="amqp://127.0.0.1:$entrepot_port"; addr="bench-large-$size" ;;
        rabbitmq-classic) conn="$amqp_url"; addr=/amq/queue/bench.classic ;;
    esac
    local pid; pid=$(broker_pid "$broker")
    [ -n "$pid" ] || { step "$broker: no broker process"; return 1; }
    # Peak RSS from here on (Linux >= 4.0: writing 5 to clear_refs resets VmHWM).
    echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || step "cannot reset VmHWM of $pid"
    step "$broker $name: entrepot-bench --address $addr --size $size --window $window --credit $window"
    local cpu0; cpu0=$(cpu_ticks "$pid")
    RUST_LOG=warn NO_COLOR=1 timeout $(( run_timeout + 30 )) "$bench_bin" --url "$conn" --address "$addr" \
        --producers 1 --consumers 1 --size "$size" --persistent --window "$window" --credit "$window" \
        --duration "$duration" --warmup "$warmup" --timeout "$run_timeout" --quiet \
        --json "$json" >"$out/$name-$broker.txt" 2>&1 &
    local gen=$! anon=0 file=0 rss=0 a f r
    while kill -0 "$gen" 2>/dev/null; do
        a=$(status_kib "$pid" RssAnon); f=$(status_kib "$pid" RssFile); r=$(status_kib "$pid" VmRSS)
        [ "$a" -gt "$anon" ] && anon=$a
        [ "$f" -gt "$file" ] && file=$f
        [ "$r" -gt "$rss" ] && rss=$r
        sleep "$(awk -v ms="$sample_ms" 'BEGIN {print ms / 1000}')"
    done
    local ok=true
    wait "$gen" || ok=false
    local cpu1 hwm; cpu1=$(cpu_ticks "$pid"); hwm=$(status_kib "$pid" VmHWM)
    [ -s "$json" ] || echo '{}' >"$json"
    tail -1 "$out/$name-$broker.txt" >&2
    jq --argjson t "$(( cpu1 - cpu0 ))" --argjson hz "$clk_tck" --argjson hwm "$hwm" \
        --argjson anon "$anon" --argjson file "$file" --argjson rss "$rss" --argjson ok "$ok" \
        --argjson goal "$(( goal_factor * size * window / 1024 ))" --argjson size "$size" \
        '. + {size: $size, failed: ((.failed // false) or ($ok | not)), broker_cpu_s: ($t / $hz),
              broker_cpu_us_per_msg: (if (.delivered // 0) > 0 then $t / $hz * 1e6 / .delivered else 0 end),
              memory_kib: {vm_hwm: $hwm, rss_peak: $rss, anon_peak: $anon, file_peak: $file, goal: $goal}}' \
        "$json" >"$json.tmp" && mv "$json.tmp" "$json"
}

for broker in $brokers; do
    case "$broker" in
        entrepot)
            for size in $sizes; do
                step "starting Entrepot (release, sync ${ENTREPOT_SYNC:-always}) fresh for $size-byte messages"
                start_entrepot
                run entrepot "$size" || true
                stop_entrepot
            done ;;
        rabbitmq-classic)
            start_rabbitmq
            for size in $sizes; do run "$broker" "$size" || true; done ;;
        *) step "unknown broker $broker (entrepot, rabbitmq-classic)" ;;
    esac
done
cleanup

mib() { echo "(. / 1024 | . * 10 | round / 10)"; }
{
    echo "| size | broker | msgs/s | MB/s | p99 e2e ms | loss check | Entrepot/peer | broker CPU us/msg | VmHWM MiB | anon peak MiB | file peak MiB | goal MiB |"
    echo "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    for size in $sizes; do
        for b in entrepot rabbitmq-classic; do
            j="$out/s$size-$b.json"; e="$out/s$size-entrepot.json"
            [ -f "$j" ] || continue
            ratio=""
            if [ "$b" != entrepot ] && [ -f "$e" ] && jq -e '.receive_msgs_per_s > 0' "$j" >/dev/null 2>&1; then
                ratio=$(jq -n --slurpfile a "$e" --slurpfile b "$j" \
                    '$a[0].receive_msgs_per_s / $b[0].receive_msgs_per_s | . * 100 | round / 100')
            fi
            jq -r --arg b "$b" --arg r "$ratio" \
                '"| \(.size / 1048576) MiB | \($b) | \(.receive_msgs_per_s // 0 | . * 10 | round / 10) | \(.receive_mb_per_s // 0 | round) | \((.end_to_end.p99_us // 0) / 1000 | round) | \(if .failed then "FAIL " else "" end)\(.loss.verdict // "?") | \($r) | \(.broker_cpu_us_per_msg // 0 | round) | \(.memory_kib.vm_hwm | '"$(mib)"') | \(.memory_kib.anon_peak | '"$(mib)"') | \(.memory_kib.file_peak | '"$(mib)"') | \(.memory_kib.goal | '"$(mib)"') |"' "$j"
        done
    done
} >"$out/table.md"

echo
cat "$out/table.md"
echo
echo "1 producer (window $window unsettled) and 1 consumer (credit $window), persistent, ${duration}s after a"
echo "${warmup}s warm-up; goal: peak RSS <= $goal_factor x size x $window. Client and broker share $(nproc) cores."
[ -z "${ENTREPOT_ARGS:-}" ] || echo "entrepot serve flags: $ENTREPOT_ARGS"
for size in $sizes; do
    e="$out/s$size-entrepot.json"; r="$out/s$size-rabbitmq-classic.json"
    [ -f "$e" ] && [ -f "$r" ] || continue
    jq -rn --slurpfile a "$e" --slurpfile b "$r" --arg s "$(( size / 1048576 ))" \
        'if ($b[0].receive_msgs_per_s // 0) > 0 then "ratio entrepot/rabbitmq-classic p\($s)m-1x1: \($a[0].receive_msgs_per_s / $b[0].receive_msgs_per_s | . * 100 | round / 100)" else empty end'
    jq -rn --slurpfile a "$e" --slurpfile b "$r" --arg s "$(( size / 1048576 ))" \
        'if ($a[0].broker_cpu_us_per_msg // 0) > 0 then "cpu per message rabbitmq-classic/entrepot p\($s)m-1x1: \($b[0].broker_cpu_us_per_msg / $a[0].broker_cpu_us_per_msg | . * 100 | round / 100)" else empty end'
done
for size in $sizes; do
    e="$out/s$size-entrepot.json"
    [ -f "$e" ] || continue
    jq -r '"entrepot \(.size / 1048576) MiB: VmHWM \(.memory_kib.vm_hwm / 1024 | round) MiB (anon \(.memory_kib.anon_peak / 1024 | round), file \(.memory_kib.file_peak / 1024 | round)) vs goal \(.memory_kib.goal / 1024 | round) MiB: anon \(if .memory_kib.anon_peak <= .memory_kib.goal then "within" else "OVER" end), total \(if .memory_kib.vm_hwm <= .memory_kib.goal then "within" else "OVER" end)"' "$e"
done
echo "JSON per run and logs: $out"
