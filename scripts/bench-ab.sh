#!/usr/bin/env bash
# Two ramster binaries on the page path, alternating in one sitting: each
# round starts a fresh node of one binary, runs the socket bench at 16 x 16
# and 16 x 1 pages in flight on the same pages, stops it, then does the same
# with the other binary. Prints each run and the ratio of the medians
# (B / A). Alternating keeps the machine's drift out of the ratio.
#
#   scripts/bench-ab.sh BIN_A BIN_B [CORPUS]
#
# Environment: ROUNDS (3), DEPTH (16), PAGES (all of the corpus), CLIENT
# (one binary whose bench client drives both nodes, so that only the
# servers differ; by default each binary drives its own node), OUT (a temp
# dir for the JSON reports and node logs). Every process this script
# starts is stopped by its PID on exit.

set -euo pipefail

bin_a="${1:?usage: bench-ab.sh BIN_A BIN_B [CORPUS]}"
bin_b="${2:?usage: bench-ab.sh BIN_A BIN_B [CORPUS]}"
corpus="${3:-}"
rounds="${ROUNDS:-3}"
depth="${DEPTH:-16}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d /tmp/ramster-bench-ab.XXXXXX)}"
mkdir -p "$out"

# shellcheck source=lib/processes.sh
source "$root/scripts/lib/processes.sh"

source_args=(--synthetic)
[[ -n "$corpus" ]] && source_args=(--corpus "$corpus")
[[ -n "${PAGES:-}" ]] && source_args+=(--pages "$PAGES")

# One run of one binary: a fresh node, both benches, the node stopped.
run() {
    local label="$1" bin="$2" round="$3"
    local dir="$out/$label.$round"
    mkdir -p "$dir"
    "$bin" node --name "ab-$label" --data-dir "$dir" --capacity 2GiB \
        --api-socket "$dir/api.sock" --admin-listen off >"$dir/node.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do
        [[ -S "$dir/api.sock" ]] && break
        kill -0 "$pid" 2>/dev/null || { echo "$label node exited; see $dir/node.log" >&2; exit 1; }
        sleep 0.1
    done
    local client="${CLIENT:-$bin}"
    "$client" bench "${source_args[@]}" --json --socket "$dir/api.sock" \
        --depth "$depth" --batch 16 --area 1 >"$out/$label.b16.$round.json"
    "$client" bench "${source_args[@]}" --json --socket "$dir/api.sock" \
        --depth "$depth" --batch 1 --area 2 >"$out/$label.b1.$round.json"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

for round in $(seq "$rounds"); do
    say "round $round of $rounds"
    run a "$bin_a" "$round"
    run b "$bin_b" "$round"
done

python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(label, shape):
    return [json.load(open(f"{out}/{label}.{shape}.{r}.json")) for r in range(1, rounds + 1)]
print("| shape | measure | A runs | B runs | B / A (medians) |")
print("|---|---|---|---|---:|")
for shape in ("b16", "b1"):
    a, b = runs("a", shape), runs("b", shape)
    for key in ("store_pages_per_sec", "load_pages_per_sec"):
        va = [r[key] for r in a]
        vb = [r[key] for r in b]
        ratio = statistics.median(vb) / statistics.median(va)
        fmt = lambda v: ", ".join(f"{x:,.0f}" for x in v)
        print(f"| 16 x {shape[1:]} | {key} | {fmt(va)} | {fmt(vb)} | {ratio:.3f} |")
PY
echo "reports in $out"
