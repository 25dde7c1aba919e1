#!/usr/bin/env bash
# The elasticity test, long version (issue 13): builds the container image (docker/build.sh),
# runs a StatefulSet of it in Docker under load, scales it 3 -> 4 -> 5 -> 4 -> 3 and restarts
# every pod in turn, then prints the step table and ends with
#   elasticity: lost=L duplicates=D max_stall_s=S worst_recovery_s=R
# The timeline (one line per second, step markers) is printed while it runs; the text, the
# PNG plot and every container's log are kept in target/tmp/elasticity/<pid>/.
#
# Usage: bash tests/elasticity/run.sh [--short]
#   --short  the CI length (about 80 s of load) instead of the full one (about 210 s),
#            each plus container starts and, when the tree changed, the image build (1-3 min)
# Environment: ENTREPOT_ELASTICITY_MEMBERSHIP=admin|drain forces who changes the membership;
# ENTREPOT_ELASTICITY_VERBOSE=1 prints every client reconnect. Needs Docker and cargo.
set -euo pipefail
cd "$(dirname "$0")/../.."

length=full
case "${1:-}" in
  --short) length=short ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "tests/elasticity/run.sh: unknown argument $1" >&2; exit 2 ;;
esac

docker info >/dev/null 2>&1 || { echo "tests/elasticity/run.sh: docker is not usable" >&2; exit 1; }
if command -v cargo-nextest >/dev/null 2>&1; then
  run=(cargo nextest run --all-features --test broker --no-capture -E 'test(/elasticity::/)')
else
  run=(cargo test --all-features --test broker -- --nocapture elasticity::)
fi
# The test builds the image itself (docker/build.sh, once per run, under a lock).
ENTREPOT_ELASTICITY=$length "${run[@]}" 2>&1 | tee /tmp/entrepot-elasticity.$$.log
status=${PIPESTATUS[0]}
echo
grep -E '^elasticity: (plot|timeline) ' /tmp/entrepot-elasticity.$$.log || true
grep -E '^elasticity: lost=' /tmp/entrepot-elasticity.$$.log | tail -n 1
rm -f /tmp/entrepot-elasticity.$$.log
exit "$status"
