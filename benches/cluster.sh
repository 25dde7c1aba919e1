#!/usr/bin/env bash
# Entrepot clustered (3 nodes, Raft) next to a single node in the same run, driven by
# `entrepot-bench`: persistent 1 KiB messages, every message checked for loss by sequence.
# Then failover: SIGKILL the leader under load and measure the time from the kill to the
# first new leader reported by a survivor and to the first message accepted again.
#
# All nodes run on 127.0.0.1 as processes of the release build; every run is bounded
# (`--duration` plus a hard `--timeout`); every process started here is stopped on exit.
#
# Workloads: p1k-1x1 (1 producer / 1 consumer), p1k-8x8 (8 / 8), each against
#   single        one node, `serve` as in the README (fsync per group commit)
#   cluster       the leader of a 3-node cluster (accepted = committed on 2 of 3 logs)
#   cluster-fwd   a follower of the same cluster, which forwards to the leader
#   cluster-tls   the leader of a fresh 3-node cluster whose inter-node traffic is TLS
#                 (--cluster-tls-*, mutual; certificates made here with openssl)
# and p1k-8x8q (8 / 8 over 8 queues, issue 12's acceptance workload) against
#   single          one node
#   cluster-spread  the 3-node one-group cluster, connections spread over every node
#   cluster-groups  a fresh 3-node cluster in `--cluster-mode groups` (a Raft group per
#                   queue, leaders spread), connections spread over every node, links
#                   redirected to their queue's leader (the load generator follows)
# whose ratio is the last line: `ratio cluster/single p1k-8x8: R` (cluster-groups against
# single; the one-group figure is the line before), with per-node CPU µs and bytes written
# per message (/proc/PID/stat, /proc/PID/io) and the leaders per node of each run.
#
# Usage: benches/cluster.sh      Env: DURATION (s per run, default 10), WARMUP (default 2),
#                                     FAILOVER_ROUNDS (default 3), TLS (0: skip the TLS phase)
# Output: a table on stdout and under target/cluster-bench/ (JSON per run, table.md).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/cluster-bench"
duration="${DURATION:-10}"
warmup="${WARMUP:-2}"
rounds="${FAILOVER_ROUNDS:-3}"
run_timeout=$(( duration + warmup + 120 ))
bin="$target/release/entrepot"
bench_bin="$target/release/entrepot-bench"
work="$(mktemp -d)"
pids=()

step() { echo "==> $*" >&2; }
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
command -v jq >/dev/null || apt-get install -y jq >/dev/null 2>&1

step "building the release binaries (the broker, the load generator)"
cargo build --release --quiet --bin entrepot
cargo build --release --quiet -p entrepot-bench
mkdir -p "$out"
rm -f "$out"/*.json "$out"/table.md

peers="0=127.0.0.1:7400/5740,1=127.0.0.1:7401/5741,2=127.0.0.1:7402/5742"
cluster_flags=()   # extra flags for every cluster node (the TLS phase sets them)
start_node() { # start_node ID (cluster member, data in $work/nID)
    local i=$1
    "$bin" serve --node-id "$i" --peers "$peers" --cluster-listen "127.0.0.1:740$i" \
        --listen "127.0.0.1:574$i" --http "127.0.0.1:184$i" --data-dir "$work/n$i" \
        "${cluster_flags[@]}" >>"$work/n$i.log" 2>&1 &
    pids+=($!)
    node_pid[$i]=$!
}
declare -A node_pid
stop_nodes() { # SIGKILL the three cluster nodes, wait until they are gone (their ports free), drop their data
    for i in 0 1 2; do
        kill -9 "${node_pid[$i]}" 2>/dev/null || true
        wait "${node_pid[$i]}" 2>/dev/null || true
        rm -rf "$work/n$i"
    done
}
wait_ready() { # wait_ready NODES...: until each answers /readyz 200 (10 s each at most)
    local i
    for i in "$@"; do
        for _ in $(seq 1 200); do
            [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 0.2 "http://127.0.0.1:184$i/readyz")" = 200 ] &&
                continue 2
            sleep 0.05
        done
        step "node $i not ready: $(tail -2 "$work/n$i.log")"
        return 1
    done
}
leader_of() { # prints the leader id as seen by any answering node, or nothing
    for i in "$@"; do
        curl -s --max-time 0.2 "http://127.0.0.1:184$i/cluster" 2>/dev/null |
            awk '/^leader:/ && $2 != "null" {print $2; exit}' && return 0
    done
}
wait_leader() { # wait_leader NODES... → leader id
    local l=""
    for _ in $(seq 1 200); do
        l="$(leader_of "$@")"
        [ -n "$l" ] && { echo "$l"; return 0; }
        sleep 0.05
    done
    echo "no leader" >&2; return 1
}

bench() { # bench NAME URL PRODUCERS CONSUMERS [QUEUES]
    local name=$1 url=$2 p=$3 c=$4 q=${5:-1} case="p1k-${3}x${4}"
    [ "$q" -gt 1 ] && case="${case}q"
    step "$name: $p producers / $c consumers over $q queue(s), ${duration}s"
    "$bench_bin" --quiet --url "$url" --address "bench-$name-$p" --queues "$q" --persistent --size 1024 \
        --producers "$p" --consumers "$c" --window 64 --duration "$duration" --warmup "$warmup" \
        --timeout "$run_timeout" --json "$out/$case-$name.json" >"$out/$case-$name.txt" 2>&1 ||
        step "$name run failed: $(tail -3 "$out/$case-$name.txt")"
}

# Per-process counters: CPU ticks (utime+stime) and bytes written to storage.
proc_cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
proc_wbytes() { awk '/^write_bytes:/ {print $2}' "/proc/$1/io" 2>/dev/null || echo 0; }
hz=$(getconf CLK_TCK)
declare -A cpu0 wb0
nodes_mark() { # nodes_mark PIDS...: remember every node's counters
    for p in "$@"; do cpu0[$p]=$(proc_cpu "$p"); wb0[$p]=$(proc_wbytes "$p"); done
}
nodes_report() { # nodes_report JSON PIDS...: per node CPU µs and bytes written per message
    local json=$1; shift
    # Every message the run delivered (warm-up and drain included, as the counters are).
    local msgs; msgs=$(jq -r '.delivered // 0' "$json" 2>/dev/null || echo 0)
    [ "${msgs:-0}" -gt 0 ] 2>/dev/null || { echo "no messages counted in $json"; return 0; }
    local i=0
    for p in "$@"; do
        local dc=$(( $(proc_cpu "$p") - ${cpu0[$p]} )) dw=$(( $(proc_wbytes "$p") - ${wb0[$p]} ))
        awk -v n="$i" -v c="$dc" -v hz="$hz" -v w="$dw" -v m="$msgs" 'BEGIN {
            printf "node %s: %.1f CPU us/msg, %.0f bytes written/msg\n", n, c / hz * 1e6 / m, w / m }'
        i=$(( i + 1 ))
    done
}

# --- single node ---------------------------------------------------------------------------
"$bin" serve --listen 127.0.0.1:5750 --http 127.0.0.1:18450 --data-dir "$work/single" \
    >"$work/single.log" 2>&1 &
single=$!; pids+=($single)
sleep 1
bench single amqp://127.0.0.1:5750 1 1
bench single amqp://127.0.0.1:5750 8 8
nodes_mark "$single"
bench single amqp://127.0.0.1:5750 8 8 8
single_nodes="$(nodes_report "$out/p1k-8x8q-single.json" "$single")"
kill "$single"; wait "$single" 2>/dev/null || true

# --- three nodes -----------------------------------------------------------------------------
for i in 0 1 2; do start_node "$i"; done
leader="$(wait_leader 0 1 2)"
follower=$(( (leader + 1) % 3 ))
step "cluster formed, leader $leader"
bench cluster "amqp://127.0.0.1:574$leader" 1 1
bench cluster "amqp://127.0.0.1:574$leader" 8 8
bench cluster-fwd "amqp://127.0.0.1:574$follower" 8 8
nodes_mark "${node_pid[0]}" "${node_pid[1]}" "${node_pid[2]}"
bench cluster-spread "amqp://127.0.0.1:5740,amqp://127.0.0.1:5741,amqp://127.0.0.1:5742" 8 8 8
spread_nodes="$(nodes_report "$out/p1k-8x8q-cluster-spread.json" "${node_pid[0]}" "${node_pid[1]}" "${node_pid[2]}")"
spread_leader="$(leader_of 0 1 2)"

# --- failover: SIGKILL the leader under load ------------------------------------------------
failover=()
for r in $(seq 1 "$rounds"); do
    leader="$(wait_leader 0 1 2)"
    survivors=(); for i in 0 1 2; do [ "$i" != "$leader" ] && survivors+=("$i"); done
    # Load on the leader while it dies (the generator loses its connection; that is the point).
    "$bench_bin" --quiet --url "amqp://127.0.0.1:574$leader" --address failover --persistent \
        --producers 4 --consumers 0 --duration 30 --timeout 40 >/dev/null 2>&1 &
    load=$!
    sleep 2
    t0=$(date +%s%N)
    kill -9 "${node_pid[$leader]}"
    new=""
    while [ -z "$new" ] || [ "$new" = "$leader" ]; do new="$(leader_of "${survivors[@]}")"; done
    t1=$(date +%s%N)
    # First acceptance after the kill: one persistent message through a survivor.
    until "$bench_bin" --quiet --url "amqp://127.0.0.1:574${survivors[0]}" --address failover-probe \
        --persistent --count 1 --consumers 0 --drain 0 --timeout 2 >/dev/null 2>&1; do sleep 0.01; done
    t2=$(date +%s%N)
    kill "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
    elect=$(( (t1 - t0) / 1000000 )); accept=$(( (t2 - t0) / 1000000 ))
    step "round $r: leader $leader killed; node $new leads after ${elect} ms, first acceptance after ${accept} ms"
    failover+=("| $r | $leader → $new | $elect | $accept |")
    start_node "$leader"   # back as a follower for the next round
    sleep 2
done

# --- three nodes, a Raft group per address (--cluster-mode groups) ---------------------------
stop_nodes
cluster_flags=(--cluster-mode groups)
for i in 0 1 2; do start_node "$i"; done
if wait_ready 0 1 2; then step "groups cluster ready"; else step "groups cluster NOT ready (see below)"; fi
nodes_mark "${node_pid[0]}" "${node_pid[1]}" "${node_pid[2]}"
# Connections spread over every node; a link on a node that does not lead its queue's group
# is redirected (amqp:link:redirect) and the load generator follows it to the leader.
bench cluster-groups "amqp://127.0.0.1:5740,amqp://127.0.0.1:5741,amqp://127.0.0.1:5742" 8 8 8
groups_nodes="$(nodes_report "$out/p1k-8x8q-cluster-groups.json" "${node_pid[0]}" "${node_pid[1]}" "${node_pid[2]}")"
groups_led=""
for i in 0 1 2; do
    led="$(curl -s --max-time 1 "http://127.0.0.1:184$i/status" | awk '/^  led:/ {print $2; exit}')"
    groups_led="$groups_led node $i leads ${led:-?};"
done
stop_nodes
cluster_flags=()

# --- three nodes, inter-node TLS ------------------------------------------------------------
if [ "${TLS:-1}" = 0 ]; then
    step "TLS=0: the inter-node TLS phase is skipped"
elif command -v openssl >/dev/null; then
    step "certificates for inter-node TLS"
    (cd "$work" &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
            -subj /CN=bench-ca -keyout ca-key.pem -out ca.pem 2>/dev/null &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=entrepot \
            -addext subjectAltName=IP:127.0.0.1 -keyout peer-key.pem -out peer.csr 2>/dev/null &&
        openssl x509 -req -in peer.csr -CA ca.pem -CAkey ca-key.pem -days 1 \
            -copy_extensions copy -out peer.pem 2>/dev/null)
    cluster_flags=(--cluster-tls-cert "$work/peer.pem" --cluster-tls-key "$work/peer-key.pem"
        --cluster-tls-ca "$work/ca.pem")
    for i in 0 1 2; do start_node "$i"; done
    leader="$(wait_leader 0 1 2)"
    step "TLS cluster formed, leader $leader"
    bench cluster-tls "amqp://127.0.0.1:574$leader" 1 1
    bench cluster-tls "amqp://127.0.0.1:574$leader" 8 8
else
    step "no openssl: the inter-node TLS phase is skipped"
fi

# --- table ----------------------------------------------------------------------------------
{
    echo "| workload | setup | accepted msgs/s | produce→accepted p99 (ms) | end-to-end p99 (ms) | loss check |"
    echo "|---|---|---:|---:|---:|---:|"
    for f in "$out"/p1k-*.json; do
        name="$(basename "$f" .json)"
        jq -r --arg n "${name%%-*}-$(echo "$name" | cut -d- -f2)" --arg s "$(echo "$name" | cut -d- -f3-)" \
            '"| \($n) | \($s) | \(.send_msgs_per_s // 0 | round) | \((.produce_to_accepted.p99_us // 0) / 1000 | . * 10 | round / 10) | \((.end_to_end.p99_us // 0) / 1000 | . * 10 | round / 10) | \(.loss.verdict // "?") |"' "$f" 2>/dev/null ||
            echo "| $name | (no figures: see $out/$name.txt) |"
    done
    echo
    echo "| failover round | leader killed → new | kill → new leader (ms) | kill → first acceptance (ms) |"
    echo "|---|---|---:|---:|"
    printf '%s\n' "${failover[@]}"
    echo
    echo "p1k-8x8q single: $single_nodes"
    echo "p1k-8x8q cluster-spread (one Raft group: every address led by node ${spread_leader:-?}):"
    echo "$spread_nodes"
    echo "p1k-8x8q cluster-groups (a Raft group per queue; groups led among this run's 8 and group 0:$groups_led):"
    echo "$groups_nodes"
    s=$(jq -r '.send_msgs_per_s // 0' "$out/p1k-8x8q-single.json" 2>/dev/null || echo 0)
    o=$(jq -r '.send_msgs_per_s // 0' "$out/p1k-8x8q-cluster-spread.json" 2>/dev/null || echo 0)
    c=$(jq -r '.send_msgs_per_s // 0' "$out/p1k-8x8q-cluster-groups.json" 2>/dev/null || echo 0)
    awk -v s="$s" -v c="$o" 'BEGIN { printf "ratio one-group/single p1k-8x8: %.2f\n", (s > 0 ? c / s : 0) }'
    awk -v s="$s" -v c="$c" 'BEGIN { printf "ratio cluster/single p1k-8x8: %.2f\n", (s > 0 ? c / s : 0) }'
} | tee "$out/table.md"
