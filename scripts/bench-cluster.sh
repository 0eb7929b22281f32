#!/usr/bin/env bash
# Measures remote memory on a three-node loopback cluster (mutual TLS under a
# fresh CA) and, in the same run, a Redis GET round trip on the same machine,
# then prints a markdown table of the cluster targets:
#
#   remote load at one in flight, p50     vs  2 x Redis GET p50 (one in flight)
#   pipelined remote loads                vs  50,000 pages/s
#   remotify, compressed                  vs  200 MB/s (alone, and while
#                                             the client stores)
#   hot-load p99 during suction           vs  2 x its idle p99
#
#   scripts/bench-cluster.sh [CORPUS]      # default: synthetic pages
#
# The owner node starts with ALONE_CAPACITY (512MiB): it is filled to 70%
# of that, then its capacity is lowered to CAPACITY (64MiB) through its
# admin endpoint, and remotify is timed alone as it ships the excess to its
# donors, a peer and a memory server. Then, at CAPACITY, it is given PAGES
# pages (4x its capacity) so most go to the donors while it stores. Every
# process this script starts is stopped by its PID on exit.
#
# Environment: ROUNDS (3), CAPACITY (64MiB), ALONE_CAPACITY (512MiB; empty:
# no remotify-alone phase, the owner starts at CAPACITY), PAGES (65536), DEPTH (16),
# BATCH (16), REPLICAS (donor copies of each page; unset: the node's default,
# 2), PORT_BASE (27800: peers on PORT_BASE..+2 UDP, admin endpoints on
# PORT_BASE+10..+12, Redis on PORT_BASE+20), OUT (a temp dir for reports and
# logs), BIN (a ramster binary to measure instead of this checkout's release
# build, for A/B runs), NODE_ARGS (more flags for every node, e.g.
# "--gso false").

set -euo pipefail

corpus="${1:-}"
rounds="${ROUNDS:-3}"
capacity="${CAPACITY:-64MiB}"
alone_capacity="${ALONE_CAPACITY-512MiB}"
pages="${PAGES:-65536}"
depth="${DEPTH:-16}"
batch="${BATCH:-16}"
replicas=()
[[ -n "${REPLICAS:-}" ]] && replicas=(--replicas "$REPLICAS")
read -r -a node_args <<<"${NODE_ARGS:-}"
base="${PORT_BASE:-27800}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d /tmp/ramster-bench-cluster.XXXXXX)}"
mkdir -p "$out"

# shellcheck source=lib/processes.sh
source "$root/scripts/lib/processes.sh"

source_args=(--synthetic)
[[ -n "$corpus" ]] && source_args=(--corpus "$corpus")

if ! command -v redis-server >/dev/null; then
    say "installing redis-server"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y redis-server >&2
fi

if [[ -n "${BIN:-}" ]]; then
    ramster="$BIN"
else
    say "building release"
    (cd "$root" && cargo build --release -p ramster-node --bin ramster) >&2
    ramster="$root/target/release/ramster"
fi

one_round() {
    local round="$1" dir="$out/round.$1"
    mkdir -p "$dir"
    "$ramster" cert create-ca --certs-dir "$dir/ca" >/dev/null
    local seeds="127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"
    local names=(owner peer memory) i=0
    for name in "${names[@]}"; do
        "$ramster" cert create-node "$name" --certs-dir "$dir/ca" >/dev/null
        local extra=(--capacity 1GiB)
        [[ "$name" == owner ]] && extra=(--capacity "${alone_capacity:-$capacity}" "${replicas[@]}")
        [[ "$name" == memory ]] && extra+=(--role memory-server)
        RUST_LOG=warn "$ramster" node --name "$name" --data-dir "$dir/$name" \
            --certs-dir "$dir/ca/$name" --listen "127.0.0.1:$((base + i))" --join "$seeds" \
            --admin-listen "127.0.0.1:$((base + 10 + i))" "${extra[@]}" "${node_args[@]}" \
            >"$dir/$name.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    say "round $round: waiting for the cluster"
    wait_cluster "127.0.0.1:$((base + 10))" 3

    local alone=()
    [[ -n "$alone_capacity" ]] && alone=(--shrink-to "$capacity" --admin "127.0.0.1:$((base + 10))")
    say "round $round: ramster bench --cluster ${alone[*]}"
    "$ramster" bench --socket "$dir/owner/api.sock" --cluster "${source_args[@]}" "${alone[@]}" \
        --pages "$pages" --depth "$depth" --batch "$batch" --json >"$out/cluster.$round.json"
    # Each node's metrics (RPC and remote-load histograms among them) stay
    # beside the report for a look at where the time went.
    i=0
    for name in "${names[@]}"; do
        curl -fsS "http://127.0.0.1:$((base + 10 + i))/metrics" >"$dir/$name.metrics" 2>/dev/null || true
        i=$((i + 1))
    done
    stop_all

    say "round $round: Redis GET, one in flight"
    local redis_port=$((base + 20))
    redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
        --daemonize no --dir "$dir" >"$dir/redis.log" 2>&1 &
    pids+=($!)
    wait_port "$redis_port" redis-server "$!"
    "$ramster" bench --peer redis --peer-addr "127.0.0.1:$redis_port" --depth 1 \
        "${source_args[@]}" --pages 16384 --json >"$out/redis.$round.json"
    stop_all
}

for round in $(seq 1 "$rounds"); do
    one_round "$round"
done

python3 - "$out" "$rounds" <<'EOF'
import json, os, sys

out, rounds = sys.argv[1], int(sys.argv[2])
runs = []
for r in range(1, rounds + 1):
    with open(os.path.join(out, f"cluster.{r}.json")) as f:
        c = json.load(f)
    with open(os.path.join(out, f"redis.{r}.json")) as f:
        g = json.load(f)
    runs.append((r, c, g))

print("| round | remote load p50, 1 in flight | Redis GET p50 | × Redis | pipelined remote loads | remotify alone | remotify while storing | hot p99 idle | hot p99 during suction | × idle | verified |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r, c, g in runs:
    a = c.get("remotify_alone")
    alone = (f"{a['mb_per_sec']:.0f} MB/s ({a['pages_per_sec']:,.0f} pages/s, {a['shipped_mb']:.1f} MB)"
             if a else "not run")
    print(f"| {r} | {c['single_load_p50_us']:.1f} µs ({c['single_loads_remote']:,}/{c['single_loads']:,} from donors) "
          f"| {g['load_p50_us']:.1f} µs | {c['single_load_p50_us'] / g['load_p50_us']:.2f} "
          f"| {c['pipelined_pages_per_sec']:,.0f} pages/s ({c['pipelined_loads_remote']:,}/{c['pipelined_loads']:,} from donors) "
          f"| {alone} "
          f"| {c['remotify_mb_per_sec']:.0f} MB/s ({c['remote_mb']:.1f} MB) "
          f"| {c['idle_load_p99_us']:.1f} µs | {c['suction_load_p99_us']:.1f} µs ({c['suctioned_pages']:,} pages home, {c['suction_loads']:,} loads) "
          f"| {c['suction_load_p99_us'] / c['idle_load_p99_us']:.2f} "
          f"| {'yes' if c['verified'] and g['verified'] else 'NO'} |")
print(f"\nreports and logs: {out}")
EOF
