#!/usr/bin/env bash
# The elasticity test, long version (issue 13): builds the container image (docker/build.sh),
# runs a StatefulSet of it in Docker under load, scales it 3 -> 4 -> 5 -> 4 -> 3 and restarts
# every pod in turn, then prints the step table and ends with
#   elasticity: lost=L duplicates=D max_stall_s=S worst_recovery_s=R
# The timeline (one line per second, step markers) is printed while it runs; the text, the
# PNG plot and every container's log are kept in target/tmp/elasticity/<pid>/.
#
# Usage: bash tests/elasticity/run.sh [--short] [--groups]
#   --short  the CI length (about 80 s of load) instead of the full one (about 210 s),
#            each plus container starts and, when the tree changed, the image build (1-3 min)
#   --groups the brokers in `--cluster-mode groups` (a Raft group per address): eight
#            queues, a producer and a consumer each, every client following redirects;
#            after each step the pods' /status `groups:` sections must agree (members,
#            voters = placement, no move in flight) and the address groups led, and
#            preferred, per node must be within +-1 of G/N (the table of both is printed)
# Environment: ENTREPOT_ELASTICITY_MEMBERSHIP=admin|drain forces who changes the membership
# (one-group mode); ENTREPOT_ELASTICITY_LINK_ROUTING=forward runs groups-mode pods with
# --link-routing forward (producers carried to their leader instead of redirected);
# ENTREPOT_ELASTICITY_VERBOSE=1 prints every client reconnect. Needs Docker and cargo.
set -euo pipefail
cd "$(dirname "$0")/../.."

length=full
mode=one-group
for arg in "$@"; do
  case "$arg" in
    --short) length=short ;;
    --groups) mode=groups ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "tests/elasticity/run.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

docker info >/dev/null 2>&1 || { echo "tests/elasticity/run.sh: docker is not usable" >&2; exit 1; }
# One test per mode: scaling_3_5_3_... (one group) and scaling_groups_3_5_3_... (groups).
case "$mode" in
  groups) test=elasticity::scaling_groups_ ;;
  *) test=elasticity::scaling_3_ ;;
esac
if command -v cargo-nextest >/dev/null 2>&1; then
  run=(cargo nextest run --all-features --test broker --no-capture -E "test(/$test/)")
else
  run=(cargo test --all-features --test broker -- --nocapture "$test")
fi
# The test builds the image itself (docker/build.sh, once per run, under a lock).
ENTREPOT_ELASTICITY=$length "${run[@]}" 2>&1 | tee /tmp/entrepot-elasticity.$$.log
status=${PIPESTATUS[0]}
echo
grep -E '^elasticity: (plot|timeline) ' /tmp/entrepot-elasticity.$$.log || true
grep -E '^elasticity: lost=' /tmp/entrepot-elasticity.$$.log | tail -n 1
rm -f /tmp/entrepot-elasticity.$$.log
exit "$status"
