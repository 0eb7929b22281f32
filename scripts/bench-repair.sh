#!/usr/bin/env bash
# Measures repair: how long an owner takes to get every page back to two
# copies after a donor holding about a GiB of its copies is killed, and how
# loads fare meanwhile.
#
#   scripts/bench-repair.sh [CORPUS]      # default: synthetic pages
#
# Four nodes on loopback under a fresh CA: an owner with a small store
# (CAPACITY, 256MiB) and three memory servers (DONOR_CAPACITY, 3GiB each).
# The owner is given PAGES pages (1,048,576: 4 GiB), so nearly all of them
# go to the memory servers, two copies each. Then:
#
#   1. idle: every page is loaded and checked (request p50 / p99);
#   2. one memory server (the one holding most) is killed with SIGKILL;
#   3. while the owner repairs, every page is loaded and checked again and
#      again (request p50 / p99 during repair);
#   4. repair is done when the owner's `ramster_degraded_pages` is 0 and
#      `ramster_last_repair_seconds` is set; then every page is checked
#      once more.
#
# Reported: the compressed bytes and pages the killed donor held, the time
# from the kill to full redundancy (failure detection included) and the
# owner's own figure (first degraded page to full redundancy), the repair
# rate, load p99 idle and during repair, and whether every page was good.
#
# Environment: PAGES, CAPACITY, DONOR_CAPACITY, DEPTH (4), BATCH (16),
# LOADS (1; 0: no loads during repair),
# PORT_BASE (28800), OUT (a temp dir for logs and reports). Every process
# this script starts is stopped by its PID on exit.

set -euo pipefail

corpus="${1:-}"
pages="${PAGES:-1048576}"
capacity="${CAPACITY:-256MiB}"
donor_capacity="${DONOR_CAPACITY:-3GiB}"
depth="${DEPTH:-4}"
batch="${BATCH:-16}"
base="${PORT_BASE:-28800}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d /tmp/ramster-bench-repair.XXXXXX)}"
mkdir -p "$out"

# shellcheck source=lib/processes.sh
source "$root/scripts/lib/processes.sh"
now() { date +%s.%N; }

source_args=(--synthetic)
[[ -n "$corpus" ]] && source_args=(--corpus "$corpus")

say "building release"
(cd "$root" && cargo build --release -p ramster-node --bin ramster) >&2
ramster="$root/target/release/ramster"

"$ramster" cert create-ca --certs-dir "$out/ca" >/dev/null
names=(owner mem1 mem2 mem3)
seeds="127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"
declare -A pid_of
i=0
for name in "${names[@]}"; do
    "$ramster" cert create-node "$name" --certs-dir "$out/ca" >/dev/null
    extra=(--capacity "$donor_capacity" --role memory-server)
    # The owner repairs as soon as the donor is down (OUT_AFTER=0): the
    # figure is the repair's, not the grace's.
    [[ "$name" == owner ]] && extra=(--capacity "$capacity" --out-after "${OUT_AFTER:-0}")
    RUST_LOG=info "$ramster" node --name "$name" --data-dir "$out/$name" \
        --certs-dir "$out/ca/$name" --listen "127.0.0.1:$((base + i))" --join "$seeds" \
        --admin-listen "127.0.0.1:$((base + 10 + i))" "${extra[@]}" \
        >"$out/$name.log" 2>&1 &
    pids+=($!)
    pid_of[$name]=$!
    i=$((i + 1))
done
owner_admin="127.0.0.1:$((base + 10))"

say "waiting for the cluster"
wait_cluster "$owner_admin" 4

metric() {
    curl -fsS "http://$owner_admin/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}

say "storing $pages pages"
"$ramster" bench --socket "$out/owner/api.sock" --phase store --state "$out/state.json" \
    "${source_args[@]}" --pages "$pages" --depth 16 --batch 64 --json >"$out/store.json"

say "waiting for remotify to settle"
last=-1
for _ in $(seq 1 600); do
    r="$(metric ramster_store_remote_pages)"
    [[ "$r" == "$last" ]] && break
    last="$r"
    sleep 1
done

say "idle: every page loaded and checked"
"$ramster" bench --socket "$out/owner/api.sock" --phase verify --state "$out/state.json" \
    --depth "$depth" --batch "$batch" --json >"$out/idle.json"

"$ramster" status --endpoint "$owner_admin" -o json >"$out/before.json"
victim="$(python3 - "$out/before.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
held = [n for n in s["nodes"] if n["name"] != "owner"]
print(max(held, key=lambda n: n["held_for_others_bytes"])["name"])
EOF
)"
repaired_before="$(metric ramster_repaired_pages_total)"

say "killing $victim"
t_kill="$(now)"
kill -9 "${pid_of[$victim]}"
wait "${pid_of[$victim]}" 2>/dev/null || true

say "loading and checking every page until repair is done"
round=0
(
    while [[ "${LOADS:-1}" == 1 && ! -e "$out/repaired" ]]; do
        round=$((round + 1))
        "$ramster" bench --socket "$out/owner/api.sock" --phase verify --state "$out/state.json" \
            --depth "$depth" --batch "$batch" --json >"$out/during.$round.json" || touch "$out/verify-failed"
    done
) &
loader=$!
pids+=($loader)

t_done=""
for _ in $(seq 1 3000); do
    degraded="$(metric ramster_degraded_pages)"
    last_repair="$(metric ramster_last_repair_seconds)"
    repaired="$(metric ramster_repaired_pages_total)"
    if [[ "$degraded" == 0 && "$last_repair" != 0 && "$repaired" != "$repaired_before" ]]; then
        t_done="$(now)"
        break
    fi
    sleep 0.1
done
touch "$out/repaired"
wait "$loader" || true
[[ -n "$t_done" ]] || { echo "repair did not finish within 300 s; logs in $out" >&2; exit 1; }

say "after repair: every page loaded and checked"
"$ramster" bench --socket "$out/owner/api.sock" --phase verify --state "$out/state.json" \
    --depth "$depth" --batch "$batch" --json >"$out/after.json"
"$ramster" status --endpoint "$owner_admin" -o json >"$out/after-status.json"
metric ramster_last_repair_seconds >"$out/last_repair"
metric ramster_repaired_pages_total >"$out/repaired_total"
[[ -e "$out/verify-failed" ]] && echo "a verify during repair failed; see $out" >&2

python3 - "$out" "$victim" "$t_kill" "$t_done" "$repaired_before" <<'EOF'
import glob, json, os, sys

out, victim, t_kill, t_done, repaired_before = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(float(sys.argv[5]))
load = lambda p: json.load(open(os.path.join(out, p)))
before = load("before.json")
v = next(n for n in before["nodes"] if n["name"] == victim)
store, idle, after = load("store.json"), load("idle.json"), load("after.json")
during = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "during.*.json")))]
owner_secs = float(open(os.path.join(out, "last_repair")).read())
repaired = int(float(open(os.path.join(out, "repaired_total")).read())) - repaired_before
wall = t_done - t_kill
gib = v["held_for_others_bytes"] / 2**30
good = all(r["verified"] for r in [idle, after] + during) and not os.path.exists(os.path.join(out, "verify-failed"))
p99_during = max((r["p99_us"] for r in during), default=float("nan"))
print(f"| killed donor held | kill → full redundancy | owner's repair time | repair rate | copies re-created | load p99 idle | load p99 during repair | × idle | verified |")
print(f"|---|---:|---:|---:|---:|---:|---:|---:|---|")
print(f"| {v['held_for_others_bytes'] / 2**20:,.0f} MiB compressed ({v['held_for_others_pages']:,} pages, {v['held_for_others_pages'] * 4096 / 2**30:.2f} GiB of pages) "
      f"| {wall:.1f} s | {owner_secs:.1f} s | {v['held_for_others_bytes'] / 2**20 / owner_secs:,.0f} MiB/s "
      f"| {repaired:,} | {idle['p99_us']:,.0f} µs | {p99_during:,.0f} µs ({len(during)} passes, {sum(r['accepted'] for r in during):,} pages checked) "
      f"| {p99_during / idle['p99_us']:.2f} | {'yes' if good else 'NO'} |")
print(f"\nstored {store['accepted']:,} of {store['pages']:,} pages; requests of {idle.get('p50_us', 0):.0f} µs p50 idle; reports and logs: {out}")
sys.exit(0 if good else 1)
EOF
