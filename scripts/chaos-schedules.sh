#!/usr/bin/env bash
# Runs many process-level chaos schedules (cluster-tests/tests/chaos.rs):
# COUNT seeded random schedules, seeds FIRST, FIRST+1, ..., each in a fresh
# five-node cluster with two or three faults (STEPS sets the number). Each
# failing schedule prints its seed, what failed, the end of the nodes' logs
# and the command that replays it; after three failures no new schedule
# starts. The output is kept in LOG; the total time is printed.
#
#   scripts/chaos-schedules.sh                  # 20 schedules, new seeds each run
#   FIRST=1 COUNT=20 scripts/chaos-schedules.sh # seeds 1..20
#   FIRST=101 COUNT=100 STEPS=5 scripts/chaos-schedules.sh
#
# A schedule takes 5 to 25 s on two cores (12 s on average). Bounded: the
# whole run has a timeout (TIMEOUT seconds), and every wait in a schedule
# has one.
set -euo pipefail
cd "$(dirname "$0")/.."

first=${FIRST:-random}
count=${COUNT:-20}
timeout_s=${TIMEOUT:-$((count * 60 + 300))}
log=${LOG:-$(mktemp -t ramster-chaos-XXXXXX.log)}

# The node binary is built once and kept apart: the test uses it
# (RAMSTER_BIN) instead of building it again.
cargo build --release -p ramster-node --bin ramster
bin_dir=$(mktemp -d -t ramster-chaos-bin-XXXXXX)
trap 'rm -rf "$bin_dir"' EXIT
cp "${CARGO_TARGET_DIR:-target}/release/ramster" "$bin_dir/ramster"
export RAMSTER_BIN="$bin_dir/ramster"
cargo test --release -p ramster-cluster-tests --test chaos --no-run

export RAMSTER_CHAOS_SEED=$first RAMSTER_CHAOS_SCHEDULES=$count
if [ -n "${STEPS:-}" ]; then
    export RAMSTER_CHAOS_STEPS=$STEPS
fi
started=$(date +%s)
status=0
# timeout signals the whole process group: the test and the nodes it runs.
timeout "$timeout_s" cargo test --release -p ramster-cluster-tests --test chaos -- \
    --nocapture 2>&1 | tee "$log" || status=$?
took=$(( $(date +%s) - started ))
if [ "$status" -ne 0 ]; then
    [ "$status" -eq 124 ] && echo "timed out after $timeout_s s"
    echo "chaos schedules FAILED after $took s; the whole output is in $log"
    exit 1
fi
echo "$count chaos schedules passed in $took s ($(( took / count )) s each); output in $log"
