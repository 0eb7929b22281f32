#!/usr/bin/env bash
# Runs many process-level chaos schedules (cluster-tests/tests/chaos.rs), one
# seed after another, and stops at the first that fails: its seed and the
# command that replays it are printed, with its output kept in the log dir.
#
#   scripts/chaos-schedules.sh                  # seeds 1..20, 3 faults each
#   FIRST=101 COUNT=100 STEPS=5 scripts/chaos-schedules.sh
#
# Each schedule takes about a minute and a half on two cores (five node processes,
# 24,576 pages per owner, every accepted page verified during each fault and
# after its repair). Bounded: each schedule has a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

first=${FIRST:-1}
count=${COUNT:-20}
steps=${STEPS:-3}
timeout_s=${SCHEDULE_TIMEOUT:-1200}
logs=${LOG_DIR:-$(mktemp -d -t ramster-chaos-XXXXXX)}

# The node binary is built once and kept apart: each schedule's test run
# uses it (RAMSTER_BIN) instead of building it again, which would rebuild
# shared crates with other features every time.
cargo build --release -p ramster-node --bin ramster
bin_dir=$(mktemp -d -t ramster-chaos-bin-XXXXXX)
trap 'rm -rf "$bin_dir"' EXIT
cp target/release/ramster "$bin_dir/ramster"
export RAMSTER_BIN="$bin_dir/ramster"
cargo test --release -p ramster-cluster-tests --test chaos --no-run >/dev/null 2>&1 \
    || cargo test --release -p ramster-cluster-tests --test chaos --no-run

passed=0 faults=0 loads=0
started=$(date +%s)
for seed in $(seq "$first" $((first + count - 1))); do
    log="$logs/seed-$seed.log"
    if RAMSTER_CHAOS_SEED=$seed RAMSTER_CHAOS_STEPS=$steps timeout "$timeout_s" \
        cargo test --release -p ramster-cluster-tests --test chaos -- --nocapture >"$log" 2>&1; then
        summary=$(grep -o 'chaos seed .*' "$log" | tail -1)
        echo "PASS $summary"
        passed=$((passed + 1))
        faults=$((faults + steps))
        loads=$((loads + $(sed -n 's/.* \([0-9]*\) page loads checked.*/\1/p' "$log" | tail -1)))
    else
        echo "FAIL seed $seed ($steps faults); output in $log"
        grep -E 'panicked|step [0-9]+:' "$log" | head -20 || true
        echo "replay: RAMSTER_CHAOS_SEED=$seed RAMSTER_CHAOS_STEPS=$steps cargo test --release -p ramster-cluster-tests --test chaos -- --nocapture"
        echo "$passed schedules passed before it"
        exit 1
    fi
done
echo "$passed schedules passed ($faults faults, $loads page loads checked, 0 lost) in $(( $(date +%s) - started )) s"
