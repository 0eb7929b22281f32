#!/usr/bin/env bash
# Measures ramster side by side with zram, memcached and Redis in one run, on
# the same pages, and prints a markdown table with ratios against zram and
# memcached. Absolute figures move with the machine's load; the ratios from
# one run are what to quote.
#
#   scripts/bench-peers.sh [CORPUS]      # default: synthetic pages
#
# Needs root for zram (it is reset, used and reset again; a device in use is
# refused). memcached and redis-server are installed with apt-get if missing.
# Every process this script starts is stopped by its PID on exit.
#
# Environment: ROUNDS (3: every system is measured once per round, servers
# fresh each round; the table gives each round and the best of them),
# DEPTH (16), PAGES (all of the corpus), ZRAM_DEVICE
# (/dev/zram0), MEMCACHED_PORT (21211), REDIS_PORT (26379), OUT (a temp dir
# for the JSON reports and server logs).

set -euo pipefail

corpus="${1:-}"
depth="${DEPTH:-16}"
rounds="${ROUNDS:-3}"
zram_device="${ZRAM_DEVICE:-/dev/zram0}"
memcached_port="${MEMCACHED_PORT:-21211}"
redis_port="${REDIS_PORT:-26379}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d /tmp/ramster-bench-peers.XXXXXX)}"
mkdir -p "$out"

# shellcheck source=lib/processes.sh
source "$root/scripts/lib/processes.sh"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

source_args=(--synthetic)
[[ -n "$corpus" ]] && source_args=(--corpus "$corpus")
[[ -n "${PAGES:-}" ]] && source_args+=(--pages "$PAGES")

say "building release"
(cd "$root" && cargo build --release -p ramster-node --bin ramster) >&2
ramster="$root/target/release/ramster"

# One round: every system once, fresh servers, reports in $out/<system>.<round>.json.
one_round() {
    local round="$1"
    bench() {
        local name="$1"
        shift
        say "round $round: $name"
        "$ramster" bench "${source_args[@]}" --json "$@" >"$out/$name.$round.json"
    }

    # 1. ramster, embedded, one thread.
    bench ramster-embedded --embedded

    # 2. ramster over the Unix socket: batches of 16 pages, and one page per
    #    request (comparable with memcached's and Redis's one-page requests).
    node_dir="$out/node.$round"
    mkdir -p "$node_dir"
    "$ramster" node --name bench --data-dir "$node_dir" --capacity 2GiB \
        --admin-listen off 2>"$out/node.$round.log" &
    pids+=($!)
    node_pid=$!
    for _ in $(seq 1 100); do
        [[ -S "$node_dir/api.sock" ]] && break
        kill -0 "$node_pid" 2>/dev/null || { echo "ramster node exited; see $out/node.$round.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -S "$node_dir/api.sock" ]] || { echo "ramster node did not open its socket" >&2; exit 1; }
    bench ramster-socket-b16 --socket "$node_dir/api.sock" --depth "$depth" --batch 16 --area 1
    bench ramster-socket-b1 --socket "$node_dir/api.sock" --depth "$depth" --batch 1 --area 2
    kill "$node_pid"
    wait "$node_pid" 2>/dev/null || true

    # 3. zram.
    if [[ ! -e "$zram_device" ]]; then
        modprobe zram 2>/dev/null || true
    fi
    if [[ -e "$zram_device" ]]; then
        bench zram --peer zram --peer-device "$zram_device"
    else
        say "skipping zram: $zram_device does not exist (modprobe zram failed)"
    fi

    # 4. memcached and Redis on loopback, fresh servers so their memory figures
    #    hold only this run's pages.
    port_free "$memcached_port" || { echo "port $memcached_port is taken; set MEMCACHED_PORT" >&2; exit 1; }
    port_free "$redis_port" || { echo "port $redis_port is taken; set REDIS_PORT" >&2; exit 1; }

    # Room for every page (4 KiB values land in 4.5 KiB chunks) so nothing is evicted.
    memcached -l 127.0.0.1 -p "$memcached_port" -U 0 -m 2048 -u "$(id -un)" \
        2>"$out/memcached.$round.log" &
    pids+=($!)
    wait_port "$memcached_port" memcached "$!"
    bench memcached --peer memcached --peer-addr "127.0.0.1:$memcached_port" --depth "$depth"

    redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
        --daemonize no --dir "$out" >"$out/redis.$round.log" 2>&1 &
    pids+=($!)
    wait_port "$redis_port" redis-server "$!"
    bench redis --peer redis --peer-addr "127.0.0.1:$redis_port" --depth "$depth"

    stop_all
}

install_if_missing() {
    local bin="$1" pkg="$2"
    if ! command -v "$bin" >/dev/null; then
        say "installing $pkg"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y "$pkg" >&2
    fi
}
install_if_missing memcached memcached
install_if_missing redis-server redis-server

for round in $(seq 1 "$rounds"); do
    one_round "$round"
done

# 5. The table.
python3 - "$out" "$rounds" <<'EOF'
import json, os, sys

out, rounds = sys.argv[1], int(sys.argv[2])
rows = [
    ("ramster, embedded, 1 thread", "ramster-embedded"),
    ("ramster, Unix socket, 16 x 16 pages", "ramster-socket-b16"),
    ("ramster, Unix socket, 16 x 1 page", "ramster-socket-b1"),
    ("zram, lz4, O_DIRECT 4 KiB", "zram"),
    ("memcached, 16 pipelined", "memcached"),
    ("Redis, 16 pipelined", "redis"),
]

def load(round):
    r = {}
    for _, name in rows:
        path = os.path.join(out, f"{name}.{round}.json")
        if os.path.exists(path):
            with open(path) as f:
                r[name] = json.load(f)
    return r

def ratio(a, b):
    return f"{a / b:.2f}" if b else "-"

def table(title, r):
    print(f"### {title}\n")
    print("| system | store pages/s | ×zram | ×memcached | load pages/s | ×zram | ×memcached "
          "| B/page | ×zram | B/compressed page | refused | verified |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    z, m = r.get("zram"), r.get("memcached")
    for label, name in rows:
        x = r.get(name)
        if x is None:
            print(f"| {label} | skipped |")
            continue
        s, l, b = x["store_pages_per_sec"], x["load_pages_per_sec"], x["bytes_per_page"]
        print(f"| {label} | {s:,.0f} | {ratio(s, z and z['store_pages_per_sec'])} "
              f"| {ratio(s, m and m['store_pages_per_sec'])} "
              f"| {l:,.0f} | {ratio(l, z and z['load_pages_per_sec'])} "
              f"| {ratio(l, m and m['load_pages_per_sec'])} "
              f"| {b:,.0f} | {ratio(b, z and z['bytes_per_page'])} "
              f"| {x['bytes_per_compressed_page']:,.0f} | {x['rejected']} "
              f"| {'yes' if x['verified'] else 'NO'} |")
    print()

per_round = [load(i) for i in range(1, rounds + 1)]
first = next(iter(per_round[0].values()))
print(f"{first['pages']} pages from {first['source']}; reports in {out}\n")
for i, r in enumerate(per_round, 1):
    table(f"round {i}", r)

# Others' load on a shared machine only ever slows a run down, so each
# system's best round is the closest to its undisturbed speed.
best = {}
for _, name in rows:
    runs = [r[name] for r in per_round if name in r]
    if runs:
        b = dict(runs[0])
        for key in ("store_pages_per_sec", "load_pages_per_sec"):
            b[key] = max(x[key] for x in runs)
        b["verified"] = all(x["verified"] for x in runs)
        best[name] = b
if rounds > 1:
    table(f"best of {rounds} rounds, per system and direction", best)
for label, name in rows:
    if name in best:
        print(f"- {label}: memory = {best[name]['memory_basis']}")
EOF
