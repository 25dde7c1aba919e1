#!/usr/bin/env bash
# Entrepot side by side with RabbitMQ (quorum and classic durable queues, AMQP 1.0) and
# NATS JetStream (file storage), all driven by the same tool, `entrepot-bench`, on this
# machine, with the physical limits (fio, iperf3) in the same table.
#
# One broker runs at a time (started, measured, stopped by its pid), everything binds to
# 127.0.0.1, and every run is bounded (`--duration` plus a hard `--timeout`).
#
# Workloads (persistent = header.durable; every message checked for loss by sequence):
#   p1k-1x1   1 KiB, 1 producer / 1 consumer          p1k-8x8   1 KiB, 8 / 8
#   p64k-1x1  64 KiB, 1 / 1                           fanout    1 KiB, 1 producer -> 10 subscribers
#   lat-half  1 KiB, 1 / 1 at half of that broker's p1k-1x1 peak (--rate): latency at load;
#             for Entrepot also its /metrics around the run, whose read->accepted and fsync
#             histograms give the `lat-half entrepot:` breakdown line of the p99
#   fixed-rate 1 KiB, 1 / 1 at FIXED_RATE msgs/s (default 10,000) for every broker: CPU per
#             message at one moderate load, where per-round costs (wake-ups, syncs) dominate
#   credit    consume only: one consumer drains a backlog at credit 4000, then at 250 (Nagle on)
#             with its credit topped up every eighth, then at 250 granted by fe2o3-amqp (at half)
#   ceiling   1 KiB, 8 producers, no consumers, against `entrepot serve --sink` (accepts and
#             drops): the load generator's own ceiling on this machine (broker entrepot-sink)
#
# Usage: benches/compare.sh            (from anywhere in the workspace; as root: the peers
#                                       and fio/iperf3 are installed with apt-get if missing)
# Env:   DURATION (s per run, default 10), WARMUP (s, default 2), BROKERS (default
#        "entrepot entrepot-sink rabbitmq-qq rabbitmq-classic nats"; also `entrepot-never`:
#        Entrepot with `--sync never`, which acks before any fsync as NATS 2.9 does, for the
#        row beside NATS), NATS=0 to leave NATS out,
#        ENTREPOT_SYNC (default always), ENTREPOT_PORT (default 5692),
#        ENTREPOT_FANOUT_ADDRESS (Entrepot's fan-out topic, default topic.bench: a sender to
#        topic.x publishes, each receiver on topic.x is its own subscription),
#        BENCH_PROCESSES (generator processes per run, `entrepot-bench --processes`, default 1),
#        SKIP_LIMITS=1 to skip fio and iperf3, PLOT=0 to skip the PNG,
#        PEERS_DIR (default ../shared/peers), CREDIT=0 to skip the credit case,
#        CREDIT_BACKLOG (default 300000: a third of it is one drain of the credit case,
#        ~0.5 s, since drains of 0.15 s gave ratios from 0.76 to 1.05; the backlog filled is
#        one drain per drain run), CREDIT_ROUNDS (Entrepot's drains at credit 4000 and 250,
#        alternated, default 3: the ratio is of the medians, since single drains on two
#        shared cores ranged 0.80–0.95 in session 22; peers drain once each),
#        CASES (the workloads to run, default "p1k-1x1 p1k-8x8 p64k-1x1 fanout lat-half
#        fixed-rate";
#        lat-half needs p1k-1x1 before it unless LAT_RATE is set),
#        ENTREPOT_ARGS (more `entrepot serve` options, e.g. "--segment-bytes 536870912"),
#        BUILD=0 to use the binaries already built under $CARGO_TARGET_DIR/release,
#        LAT_RATE (msgs/s of lat-half instead of half the measured p1k-1x1 peak, so runs of
#        two builds can be compared at one rate), FIXED_RATE (msgs/s of fixed-rate, default
#        10000).
# Output: the table on stdout, benches/results.png (throughput vs p99, `entrepot-bench plot`),
#         and under target/compare/: one JSON per run, table.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
peers="${PEERS_DIR:-$root/../shared/peers}"
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/compare"
duration="${DURATION:-10}"
warmup="${WARMUP:-2}"
brokers="${BROKERS:-entrepot entrepot-sink rabbitmq-qq rabbitmq-classic nats}"
processes="${BENCH_PROCESSES:-1}"
[ "${NATS:-1}" = 0 ] && brokers="${brokers//nats/}"
entrepot_port="${ENTREPOT_PORT:-5692}"
entrepot_http="${ENTREPOT_HTTP_PORT:-18092}"
run_timeout=$(( duration + warmup + 120 ))
cases="${CASES:-p1k-1x1 p1k-8x8 p64k-1x1 fanout lat-half fixed-rate}"
# The credit case runs before the others unless CREDIT=0; named in CASES it is not run again
# as a workload (it would overwrite its own credit-BROKER.json).
cases="${cases//credit/}"
notes=()

step() { echo "==> $*" >&2; }
need() { # need CMD PACKAGE
    command -v "$1" >/dev/null && return
    step "$1 not found, installing $2 with apt-get"
    apt-get install -y "$2" >/dev/null 2>&1 || { apt-get update >/dev/null; apt-get install -y "$2" >/dev/null; }
}
need jq jq

mkdir -p "$out"
# Only the brokers of this run are measured again; the table shows every JSON present.
for b in $brokers; do rm -f "$out"/*-"$b".json "$out"/*-"$b".txt; done
rm -f "$out"/table.md

# --- the tool and the broker under test -------------------------------------------------
# The load generator is its own binary (bench/): `entrepot-bench`, with its features `plot`
# (`entrepot-bench plot` for benches/results.png) and `nats` (the NATS JetStream driver).
features="plot,nats"
case "$brokers" in *nats*) ;; *) features="plot" ;; esac
[ "${PLOT:-1}" = 0 ] && features="${features/plot/}"
features="${features#,}"; features="${features%,}"
if [ "${BUILD:-1}" = 0 ]; then
    step "BUILD=0: using the binaries already in $target/release"
else
    step "cargo build --release --bin entrepot; cargo build --release -p entrepot-bench --features '$features'"
    cargo build --release --bin entrepot >&2
    if ! cargo build --release -p entrepot-bench --features "$features" >&2; then
        [ -n "$features" ] || exit 1
        step "build with features '$features' failed: building without them (no NATS, no plot)"
        notes+=("Built without '$features': NATS JetStream and/or the plot left out.")
        brokers="${brokers//nats/}"
        features=""
        cargo build --release -p entrepot-bench >&2
    fi
fi
bin="$target/release/entrepot"
bench_bin="$target/release/entrepot-bench"

started_pid=""
started_peer=""
cleanup() {
    if [ -n "$started_pid" ] && kill -0 "$started_pid" 2>/dev/null; then
        kill "$started_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$started_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$started_pid" 2>/dev/null || true
    fi
    if [ -n "$started_peer" ]; then "$peers/$started_peer.sh" stop >/dev/null 2>&1 || true; fi
    started_pid=""; started_peer=""
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

start_entrepot() { # start_entrepot SYNC [--sink]
    local data="$out/entrepot-data" sync="$1"
    shift
    rm -rf "$data"
    "$bin" serve --listen "127.0.0.1:$entrepot_port" --http "127.0.0.1:$entrepot_http" \
        --data-dir "$data" --sync "$sync" ${ENTREPOT_ARGS:-} "$@" >"$out/entrepot-$sync$*.log" 2>&1 &
    started_pid=$!
    wait_port "$entrepot_port"
}

# --- CPU time of the broker process -------------------------------------------------------
# The figure that holds on a noisy machine: utime+stime of the broker's process (for
# RabbitMQ the beam.smp VM, for NATS nats-server) over a run, divided by the messages
# delivered in it.
peers_state="${PEERS_STATE_DIR:-/var/tmp/amqp-peers}"
broker_pid() { # broker_pid BROKER → the pid whose CPU time is the broker's
    case "$1" in
        entrepot|entrepot-sink|entrepot-never) echo "$started_pid" ;;
        rabbitmq-*) cat "$peers_state/rabbitmq/beam.pid" 2>/dev/null || pgrep -o beam.smp ;;
        nats) cat "$peers_state/nats/server.pid" 2>/dev/null || pgrep -o nats-server ;;
    esac
}
cpu_ticks() { # cpu_ticks PID → utime+stime in clock ticks (0 when unreadable)
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
clk_tck=$(getconf CLK_TCK)

# --- the broker's own latency histograms (Entrepot's /metrics) --------------------------
# hist_quantiles BEFORE AFTER NAME → JSON {p50_ms, p99_ms, max_ms, count}: upper bounds of
# the buckets that hold those quantiles of the observations made between the two scrapes
# (max: the highest non-empty bucket; null past the last bound).
hist_quantiles() {
    awk -v name="$3" '
        FNR == 1 { f++ }
        index($0, name "_bucket{le=\"") == 1 {
            split($0, a, "\""); le = a[2]; n = $NF
            if (f == 1) before[le] = n; else { after[le] = n; order[++k] = le }
        }
        END {
            total = after[order[k]] - before[order[k]]
            if (total <= 0) { print "{\"count\": 0}"; exit }
            p50 = p99 = ""; prev = 0; top = ""
            for (i = 1; i <= k; i++) {
                le = order[i]; c = after[le] - before[le]
                if (c > prev) top = le
                if (p50 == "" && c >= 0.5 * total) p50 = le
                if (p99 == "" && c >= 0.99 * total) p99 = le
                prev = c
            }
            printf "{\"count\": %d, \"p50_ms\": %s, \"p99_ms\": %s, \"max_ms\": %s}\n", total,
                (p50 == "+Inf" ? "null" : p50 * 1000), (p99 == "+Inf" ? "null" : p99 * 1000), (top == "+Inf" ? "null" : top * 1000)
        }' "$1" "$2"
}

# --- one run ----------------------------------------------------------------------------
# bench BROKER CASE [extra flags] → writes $out/CASE-BROKER.json (or records the failure)
bench() {
    local broker="$1" case="$2"; shift 2
    local json="$out/$case-$broker.json" conn=() addr=() size=1024 shape=()
    case "$broker" in
        entrepot|entrepot-sink|entrepot-never) conn=(--url "amqp://127.0.0.1:$entrepot_port"); addr=(--address "bench-$case") ;;
        rabbitmq-qq) conn=(--url "$AMQP_URL"); addr=(--address /amq/queue/bench.qq) ;;
        rabbitmq-classic) conn=(--url "$AMQP_URL"); addr=(--address /amq/queue/bench.classic) ;;
        nats) conn=(--nats-url "$NATS_URL"); addr=(--address "bench.$case") ;;
    esac
    case "$case" in
        p1k-1x1|lat-half|fixed-rate) shape=(--producers 1 --consumers 1) ;;
        p1k-8x8) shape=(--producers 8 --consumers 8) ;;
        p64k-1x1) shape=(--producers 1 --consumers 1); size=65536 ;;
        ceiling) shape=(--producers 8 --consumers 0) ;;
        fanout)
            shape=(--producers 1 --topic-subscribers 10)
            case "$broker" in
                entrepot) addr=(--address "${ENTREPOT_FANOUT_ADDRESS:-topic.bench}") ;;
                rabbitmq-qq)
                    # Fan-out in RabbitMQ is an exchange; each subscriber gets its own
                    # server-named queue (not quorum): measured once, as rabbitmq-classic.
                    echo '{"na": "fan-out runs through amq.fanout, see rabbitmq-classic"}' >"$json"; return ;;
                rabbitmq-classic)
                    addr=(--address /exchange/amq.fanout --consumer-address /exchange/amq.fanout/bench) ;;
            esac ;;
    esac
    step "$broker $case: entrepot-bench ${conn[*]/*@/***@} ${addr[*]} ${shape[*]} --size $size $*"
    local pid cpu0 scrape=""
    pid=$(broker_pid "$broker"); cpu0=$(cpu_ticks "${pid:-0}")
    # Entrepot's latency runs: its /metrics around the run, for the breakdown of the p99.
    if [ "$broker" = entrepot ] && [ "$case" = lat-half ]; then
        scrape="$out/$case-$broker.metrics"
        curl -s --max-time 5 "http://127.0.0.1:$entrepot_http/metrics" >"$scrape.0" || scrape=""
    fi
    if RUST_LOG="${RUST_LOG:-warn}" NO_COLOR=1 "$bench_bin" "${conn[@]}" "${addr[@]}" "${shape[@]}" --size "$size" --persistent \
        --duration "$duration" --warmup "$warmup" --timeout "$run_timeout" --quiet --processes "$processes" \
        --json "$json" "$@" >"$out/$case-$broker.txt" 2>&1; then
        tail -1 "$out/$case-$broker.txt" >&2
        local cpu1; cpu1=$(cpu_ticks "${pid:-0}")
        # The generator's own utime+stime (its getrusage, over the same span) per message,
        # beside the broker's: on 2 shared cores, the generator may be what limits a row.
        jq --argjson t "$(( cpu1 - cpu0 ))" --argjson hz "$clk_tck" \
            '(if .delivered > 0 then .delivered elif .accepted > 0 then .accepted else 0 end) as $n
             | . + {broker_cpu_s: ($t / $hz), broker_cpu_us_per_msg: (if $n > 0 then $t / $hz * 1e6 / $n else 0 end),
                    generator_cpu_us_per_msg: (if $n > 0 then (.generator.cpu_s // 0) * 1e6 / $n else 0 end)}' \
            "$json" >"$json.tmp" && mv "$json.tmp" "$json"
        if [ -n "$scrape" ] && curl -s --max-time 5 "http://127.0.0.1:$entrepot_http/metrics" >"$scrape.1"; then
            jq --argjson a "$(hist_quantiles "$scrape.0" "$scrape.1" entrepot_produce_accept_seconds)" \
                --argjson f "$(hist_quantiles "$scrape.0" "$scrape.1" entrepot_fsync_seconds)" \
                '. + {broker_read_to_accepted: $a, broker_fsync: $f}' "$json" >"$json.tmp" && mv "$json.tmp" "$json"
        fi
    else
        step "$broker $case FAILED: $(tail -1 "$out/$case-$broker.txt")"
        [ -s "$json" ] || echo "{\"failed\": $(tail -1 "$out/$case-$broker.txt" | jq -R .)}" >"$json"
        jq '. + {failed: true}' "$json" >"$json.tmp" && mv "$json.tmp" "$json"
    fi
}

# credit_case BROKER: one consumer draining a backlog (consume only, `--producers 0`) at
# credit 4000 and at credit 250, its socket with Nagle on as fe2o3-amqp leaves it (`--nagle`):
# a broker that waits for something other than credit and a message shows here (issue 15's
# credit stall). The consumer tops its credit up every eighth used, as proton keeps it full
# (bench/src/amqp.rs, CREDIT_TOP_UP_PARTS); a third drain at 250 lets fe2o3-amqp grant it
# (only once half is used, `--half-credit`), for comparison with earlier sessions. Writes
# $out/credit-BROKER.json {c4000, c250, c250_half} in msgs/s.
credit_case() {
    local broker="$1" conn=() addr per=$(( ${CREDIT_BACKLOG:-300000} / 3 )) rounds=1 r r4000=() r250=() r250h
    case "$broker" in
        entrepot) conn=(--url "amqp://127.0.0.1:$entrepot_port"); addr=bench-credit; rounds="${CREDIT_ROUNDS:-3}" ;;
        rabbitmq-qq) conn=(--url "$AMQP_URL"); addr=/amq/queue/bench.qq ;;
        *) return ;;
    esac
    local n=$(( per * (2 * rounds + 1) ))
    step "$broker credit: a backlog of $n, then one consumer draining $per at credit 4000 and at 250 ($rounds× alternated), then at 250 (fe2o3 grants)"
    drain_at() { # drain_at CREDIT [FLAGS] → msgs/s
        local credit="$1"; shift
        RUST_LOG=warn NO_COLOR=1 "$bench_bin" "${conn[@]}" --address "$addr" --producers 0 --consumers 1 \
            --count "$per" --credit "$credit" --nagle "$@" --timeout "$run_timeout" 2>&1 \
            | sed -n 's/^received .*: \([0-9.]*\) msgs\/s$/\1/p'
    }
    if RUST_LOG=warn NO_COLOR=1 "$bench_bin" "${conn[@]}" --address "$addr" --producers 4 --consumers 0 \
        --count "$n" --persistent --timeout "$run_timeout" --quiet >"$out/credit-$broker.txt" 2>&1; then
        for (( r = 0; r < rounds; r++ )); do
            r4000+=("$(drain_at 4000)"); r250+=("$(drain_at 250)")
        done
        r250h=$(drain_at 250 --half-credit)
    fi
    # Medians of the alternated drains (a drain that printed no rate counts as 0).
    jq -n --arg a "${r4000[*]:-0}" --arg b "${r250[*]:-0}" --arg c "${r250h:-0}" '
        def nums: split(" ") | map(tonumber? // 0);
        def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
        {c4000: ($a | nums | median), c250: ($b | nums | median), c250_half: ($c | tonumber? // 0),
         c4000_all: ($a | nums), c250_all: ($b | nums)}' >"$out/credit-$broker.json"
    step "$broker credit 4000: ${r4000[*]:-?} msgs/s, credit 250: ${r250[*]:-?} msgs/s, 250 fe2o3 grants: ${r250h:-?} msgs/s"
}

run_cases() { # run_cases BROKER
    local broker="$1" c peak
    if [ "$broker" = entrepot-sink ]; then bench "$broker" ceiling; return; fi
    [ "${CREDIT:-1}" = 0 ] || credit_case "$broker"
    for c in $cases; do
        if [ "$c" = lat-half ]; then
            peak=$(jq -r '.send_msgs_per_s // 0 | floor' "$out/p1k-1x1-$broker.json" 2>/dev/null || echo 0)
            if [ -z "${LAT_RATE:-}" ] && [ "${peak:-0}" -lt 2 ]; then
                echo '{"na": "no p1k-1x1 peak to halve"}' >"$out/$c-$broker.json"; continue
            fi
            bench "$broker" "$c" --rate "${LAT_RATE:-$(( peak / 2 ))}"
        elif [ "$c" = fixed-rate ]; then
            bench "$broker" "$c" --rate "${FIXED_RATE:-10000}"
        else
            bench "$broker" "$c"
        fi
    done
}

# start_peer NAME: starts ../shared/peers/NAME.sh unless it already runs (then it is left
# running at the end, since this script did not start it); sets peer_url from the KEY=
# line that `start` prints.
start_peer() { # start_peer NAME KEY DEFAULT_URL
    local name="$1" key="$2"
    if "$peers/$name.sh" status >/dev/null 2>&1; then
        step "$name already running: using it, and leaving it running"
        peer_url="$3"
        return
    fi
    step "starting $name with $peers/$name.sh"
    started_peer="$name"
    local said
    said=$("$peers/$name.sh" start 2>&1) || { echo "$said" >&2; exit 1; }
    echo "$said" >&2
    peer_url=$(echo "$said" | sed -n "s/^ *$key=\([^ ]*\).*/\1/p" | tail -1)
    [ -n "$peer_url" ] || { echo "$name.sh start printed no $key" >&2; exit 1; }
}

running=""
for broker in $brokers; do
    service="${broker%%-*}"
    [ "$broker" = entrepot-sink ] && service=sink
    [ "$broker" = entrepot-never ] && service=never
    if [ "$service" != "$running" ]; then
        cleanup
        case "$service" in
            entrepot)
                step "starting Entrepot (release, sync ${ENTREPOT_SYNC:-always}) on 127.0.0.1:$entrepot_port"
                start_entrepot "${ENTREPOT_SYNC:-always}" ;;
            never)
                step "starting Entrepot (release, sync never: acks before any fsync) on 127.0.0.1:$entrepot_port"
                start_entrepot never ;;
            sink)
                step "starting Entrepot with --sink (accepts and drops) on 127.0.0.1:$entrepot_port"
                start_entrepot "${ENTREPOT_SYNC:-always}" --sink ;;
            rabbitmq)
                start_peer rabbitmq AMQP_URL "amqp://guest:guest@127.0.0.1:${RABBITMQ_AMQP_PORT:-5682}"
                AMQP_URL="$peer_url" ;;
            nats)
                start_peer nats NATS_URL "nats://127.0.0.1:${NATS_CLIENT_PORT:-4232}"
                NATS_URL="$peer_url" ;;
            *) continue ;;
        esac
        running="$service"
    fi
    run_cases "$broker"
done
cleanup

# --- physical limits ----------------------------------------------------------------------
fio_64k="n/a"; fio_4k="n/a"; fsync_p99_us="n/a"; fsync_max_us="n/a"; iperf_mbs="n/a"
if [ "${SKIP_LIMITS:-0}" != 1 ]; then
    need fio fio
    need iperf3 iperf3
    fio_dir="$out/fio"; mkdir -p "$fio_dir"
    # The same fio invocation as benches/disk-limit.sh (same disk as target/, psync,
    # sequential writes, fdatasync after every block, bounded by size and runtime).
    run_fio() { # run_fio NAME ARGS... → the fio JSON file
        local name="$1"; shift
        fio --name="$name" --directory="$fio_dir" --filename="fio-$name.dat" --ioengine=psync \
            --size="${FIO_SIZE:-256m}" --runtime="${FIO_RUNTIME:-10}" \
            --output-format=json --output="$fio_dir/fio-$name.json" "$@" >/dev/null
        rm -f "$fio_dir/fio-$name.dat"
        echo "$fio_dir/fio-$name.json"
    }
    step "fio: sequential writes with fdatasync per 64 KiB and per 4 KiB block"
    f=$(run_fio sync64k --rw=write --bs=64k --fdatasync=1)
    fio_64k=$(jq '.jobs[0].write.bw_bytes / 1e6 | . * 100 | floor / 100' "$f")
    f=$(run_fio sync4k --rw=write --bs=4k --fdatasync=1)
    fio_4k=$(jq '.jobs[0].write.bw_bytes / 1e6 | . * 100 | floor / 100' "$f")
    fsync_p99_us=$(jq '.jobs[0].sync.lat_ns.percentile["99.000000"] / 1000 | floor' "$f")
    fsync_max_us=$(jq '.jobs[0].sync.lat_ns.max / 1000 | floor' "$f")
    step "iperf3: loopback TCP bandwidth, 5 s"
    iperf3 -s -1 -B 127.0.0.1 -p "${IPERF_PORT:-15201}" >/dev/null 2>&1 &
    iperf_pid=$!
    wait_port "${IPERF_PORT:-15201}"
    if iperf3 -c 127.0.0.1 -p "${IPERF_PORT:-15201}" -t 5 -J >"$out/iperf3.json" 2>/dev/null; then
        iperf_mbs=$(jq '.end.sum_received.bits_per_second / 8e6 | floor' "$out/iperf3.json")
    fi
    kill "$iperf_pid" 2>/dev/null || true
    wait "$iperf_pid" 2>/dev/null || true
fi

# --- the table ----------------------------------------------------------------------------
acks_after_fsync() {
    case "$1" in
        entrepot) [ "${ENTREPOT_SYNC:-always}" = always ] && echo yes || echo "no (${ENTREPOT_SYNC})" ;;
        entrepot-never) echo "no (--sync never)" ;;
        rabbitmq-qq) echo "yes (Raft log fsync)" ;;
        rabbitmq-classic) echo "yes (publisher confirm after fsync)" ;;
        nats) echo "no (2.9: ack before fsync)" ;;
    esac
}
row() { # row CASE BROKER → one table line
    local j="$out/$1-$2.json" ratio="" e="$out/$1-entrepot.json"
    if [ ! -f "$j" ]; then return; fi
    if jq -e '.na' "$j" >/dev/null 2>&1; then
        printf '| %-9s | %-16s | %-34s | %10s | %8s | %10s | %10s | %-14s | %8s | %8s | %8s |\n' \
            "$1" "$2" "$(acks_after_fsync "$2")" "n/a" "" "" "" "$(jq -r .na "$j")" "" "" ""
        return
    fi
    if [ "$2" != entrepot ] && jq -e '.receive_msgs_per_s > 0' "$e" >/dev/null 2>&1 \
        && jq -e '.receive_msgs_per_s > 0' "$j" >/dev/null 2>&1; then
        ratio=$(jq -n --slurpfile a "$e" --slurpfile b "$j" \
            'if "'"$1"'" == "lat-half" then ($b[0].produce_to_accepted.p99_us / ($a[0].produce_to_accepted.p99_us | if . == 0 then 1 else . end))
             elif "'"$1"'" == "fixed-rate" then (($b[0].broker_cpu_us_per_msg // 0) / ($a[0].broker_cpu_us_per_msg // 0 | if . == 0 then 1 else . end))
             else ($a[0].receive_msgs_per_s / $b[0].receive_msgs_per_s) end | . * 100 | round / 100')
    fi
    jq -r --arg c "$1" --arg b "$2" --arg f "$(acks_after_fsync "$2")" --arg r "$ratio" \
        '"| \($c) | \($b) | \($f) | \(.receive_msgs_per_s // 0 | round) | \(.receive_mb_per_s // 0 | . * 10 | round / 10) | \((.produce_to_accepted.p99_us // 0) / 1000 | . * 10 | round / 10) | \((.end_to_end.p99_us // 0) / 1000 | . * 10 | round / 10) | \(if .failed then "FAIL " else "" end)\(.loss.verdict // "?") | \($r) | \(.broker_cpu_us_per_msg // 0 | . * 10 | round / 10) | \(.generator_cpu_us_per_msg // 0 | . * 10 | round / 10) |"' "$j"
}
ceiling_row() { # the generator's own ceiling: accepted msgs/s against the sink
    local j="$out/ceiling-entrepot-sink.json"
    [ -f "$j" ] || return 0
    jq -r '"| ceiling | entrepot --sink | no (drops every message) | \(.send_msgs_per_s // 0 | round) | \(.send_mb_per_s // 0 | . * 10 | round / 10) | \((.produce_to_accepted.p99_us // 0) / 1000 | . * 10 | round / 10) |  | \(if .failed then "FAIL " else "" end)generator ceiling: \(.generator.cpu_cores_used // 0 | . * 100 | round / 100) cores, \(.processes // 1) process(es) |  | \(.broker_cpu_us_per_msg // 0 | . * 10 | round / 10) | \(.generator_cpu_us_per_msg // 0 | . * 10 | round / 10) |"' "$j"
}
{
    echo "| case | broker | ack waits for fsync | msgs/s | MB/s | p99 accepted ms | p99 e2e ms | loss check | Entrepot/peer | broker CPU us/msg | generator CPU us/msg |"
    echo "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"
    for c in $cases; do
        for b in entrepot entrepot-never rabbitmq-qq rabbitmq-classic nats; do row "$c" "$b"; done
    done
    ceiling_row
    echo
    echo "| physical limit | value |"
    echo "|---|---|"
    echo "| fio write bs=64k fdatasync=1 | $fio_64k MB/s |"
    echo "| fio write bs=4k fdatasync=1 | $fio_4k MB/s |"
    echo "| fdatasync p99 (fio, 4k) | $fsync_p99_us us |"
    echo "| fdatasync max (fio, 4k) | $fsync_max_us us |"
    echo "| iperf3 loopback TCP | $iperf_mbs MB/s |"
} >"$out/table.md"

# --- the plot -------------------------------------------------------------------------------
plot="$root/benches/results.png"
if [[ "$features" == *plot* ]]; then
    if [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
        step "no DejaVu Sans for the plot's labels: installing fonts-dejavu-core with apt-get"
        apt-get install -y fonts-dejavu-core >/dev/null 2>&1 \
            || { apt-get update >/dev/null && apt-get install -y fonts-dejavu-core >/dev/null; } || true
    fi
    step "entrepot-bench plot --input $out --output $plot"
    "$bench_bin" plot --input "$out" --output "$plot" >&2 || notes+=("No plot: entrepot-bench plot failed.")
else
    notes+=("No plot: built without the plot feature (PLOT=0 or the build failed).")
fi

echo
cat "$out/table.md"
echo
echo "msgs/s and MB/s: deliveries per second after a ${warmup}s warm-up over ${duration}s (fan-out: all"
echo "subscribers together). Entrepot/peer: throughput ratio; for lat-half, the peer's p99"
echo "produce->accepted over Entrepot's (above 1: Entrepot is faster); for fixed-rate, the peer's broker CPU"
echo "per message over Entrepot's (above 1: Entrepot uses less). Client and broker share $(nproc) cores."
[ -f "$out/p1k-1x1-nats.json" ] || echo "NATS JetStream: not measured (NATS=0 or the driver did not build)."
for n in "${notes[@]}"; do echo "$n"; done
echo "broker CPU us/msg: utime+stime of the broker process (RabbitMQ: beam.smp) over the run per"
echo "message delivered; generator CPU us/msg: the same for entrepot-bench itself (its processes'"
echo "getrusage), so broker + generator per message against the $(nproc) cores shows which one limits."
ratio_line() { # ratio_line NAME A_JSON B_JSON JQ_FIELD
    [ -f "$2" ] && [ -f "$3" ] || return 0
    jq -rn --slurpfile a "$2" --slurpfile b "$3" --arg n "$1" \
        'if ($b[0]'"$4"' // 0) > 0 then "\($n): \(($a[0]'"$4"' // 0) / $b[0]'"$4"' | . * 100 | round / 100)" else empty end'
}
ratio_line "ratio entrepot/rabbitmq-qq p1k-8x8" "$out/p1k-8x8-entrepot.json" "$out/p1k-8x8-rabbitmq-qq.json" .receive_msgs_per_s
ratio_line "ratio entrepot/nats p1k-8x8 (NATS 2.9 acks before fsync)" "$out/p1k-8x8-entrepot.json" "$out/p1k-8x8-nats.json" .receive_msgs_per_s
ratio_line "ratio entrepot-never/nats p1k-8x8 (both ack before fsync)" "$out/p1k-8x8-entrepot-never.json" "$out/p1k-8x8-nats.json" .receive_msgs_per_s
ratio_line "cpu per message rabbitmq-qq/entrepot p1k-8x8" "$out/p1k-8x8-rabbitmq-qq.json" "$out/p1k-8x8-entrepot.json" .broker_cpu_us_per_msg
ratio_line "cpu per message nats/entrepot p1k-8x8" "$out/p1k-8x8-nats.json" "$out/p1k-8x8-entrepot.json" .broker_cpu_us_per_msg
ratio_line "cpu per message rabbitmq-qq/entrepot fixed-rate ${FIXED_RATE:-10000} msgs/s" "$out/fixed-rate-rabbitmq-qq.json" "$out/fixed-rate-entrepot.json" .broker_cpu_us_per_msg
ratio_line "cpu per message nats/entrepot fixed-rate ${FIXED_RATE:-10000} msgs/s" "$out/fixed-rate-nats.json" "$out/fixed-rate-entrepot.json" .broker_cpu_us_per_msg
for b in entrepot entrepot-never rabbitmq-qq rabbitmq-classic nats; do
    j="$out/p1k-8x8-$b.json"
    [ -f "$j" ] && jq -e '.receive_msgs_per_s > 0' "$j" >/dev/null 2>&1 || continue
    jq -r --arg b "$b" '"cpu per message p1k-8x8 \($b): broker \(.broker_cpu_us_per_msg // 0 | . * 10 | round / 10) us, generator \(.generator_cpu_us_per_msg // 0 | . * 10 | round / 10) us (generator used \(.generator.cpu_cores_used // 0 | . * 100 | round / 100) of \(.generator.cores // 0) cores)"' "$j"
done
# Where Entrepot's p99 produce->accepted at half load goes: the generator's own lag before
# the send (timer tick, full window, descheduled), the broker's read->accepted and its
# fsyncs (bucket bounds of its histograms), beside fio's fdatasync.
j="$out/lat-half-entrepot.json"
if [ -f "$j" ] && jq -e '.broker_read_to_accepted.count > 0' "$j" >/dev/null 2>&1; then
    jq -r --arg fp "$fsync_p99_us" --arg fm "$fsync_max_us" '"lat-half entrepot: p99 produce->accepted \(.produce_to_accepted.p99_us / 1000) ms (p50 \(.produce_to_accepted.p50_us / 1000)); generator send lag p99 \((.send_lag.p99_us // 0) / 1000) ms (p50 \((.send_lag.p50_us // 0) / 1000)); broker read->accepted p99 <= \(.broker_read_to_accepted.p99_ms) ms, max <= \(.broker_read_to_accepted.max_ms) ms; broker fsync p99 <= \(.broker_fsync.p99_ms) ms, max <= \(.broker_fsync.max_ms) ms (\(.broker_fsync.count) syncs); fio fdatasync p99 \($fp) us, max \($fm) us"' "$j"
fi
if [ -f "$out/credit-entrepot.json" ]; then
    jq -r 'if .c4000 > 0 then "credit 250/4000: \(.c250 / .c4000 | . * 100 | round / 100) (medians \(.c250 | round) vs \(.c4000 | round) msgs/s of \(.c250_all // [] | length) alternated drains each: 250 \(.c250_all // [] | map(round)), 4000 \(.c4000_all // [] | map(round)); one consumer, Nagle on; with fe2o3-amqp granting at half: \((.c250_half // 0) / .c4000 | . * 100 | round / 100))" else "credit 250/4000: n/a" end' "$out/credit-entrepot.json"
fi
if [ -f "$out/credit-rabbitmq-qq.json" ]; then
    jq -r 'if .c4000 > 0 then "rabbitmq-qq credit 250/4000: \(.c250 / .c4000 | . * 100 | round / 100)" else empty end' "$out/credit-rabbitmq-qq.json"
fi
echo "ceiling: the generator against \`entrepot serve --sink\` (accepted at once, dropped):"
echo "accepted msgs/s there is the most this tool can offer here; a broker row near it is"
echo "limited by the generator, not the broker (try BENCH_PROCESSES=2)."
[ -f "$plot" ] && echo "Plot: $plot"
echo "JSON per run and logs: $out"
