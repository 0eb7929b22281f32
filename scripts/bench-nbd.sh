#!/usr/bin/env bash
# Compares a ramster NBD export with nbdkit's memory plugin in one run: the
# same client (`ramster bench-nbd`), the same corpus, the same machine.
#   queue depth 16: write pages/s, read+verify pages/s (random order)
#   queue depth 1:  p50 latency of writes and reads
#   server CPU time per page at both depths (polling included)
#   memory per stored page: server RSS growth / pages (ramster also: store
#   accounting, and the backing file that took the rejected pages)
# plus `qemu-img bench` reads at depth 16 on the filled export, as a second
# client's view.
#
# Usage: scripts/bench-nbd.sh [CORPUS]   (default /tmp/corpus.bin)
# Env: CAPACITY (ramster store, default 1GiB), PORT (default 10950), RUNS (default 3),
#      BIN (the ramster binary; default: build this checkout),
#      NODE_ARGS (more `ramster node` flags, e.g. "--nbd-poll-us 0").
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS=${1:-/tmp/corpus.bin}
CAPACITY=${CAPACITY:-1GiB}
PORT=${PORT:-10950}
RUNS=${RUNS:-3}
for t in nbdkit qemu-img python3; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install nbdkit qemu-utils python3)"; exit 1; }
done
[ -f "$CORPUS" ] || { echo "no corpus at $CORPUS"; exit 1; }

# BIN: a ramster binary to measure instead of this checkout's release build.
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p ramster-node --bin ramster
  BIN=target/release/ramster
fi
bytes=$(stat -c %s "$CORPUS")
pages=$((bytes / 4096))
# Export size: the corpus rounded up to whole MiB.
size=$(( (bytes + (1 << 20) - 1) / (1 << 20) * (1 << 20) ))

work=$(mktemp -d)
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server did not listen on $PORT"; exit 1
}

start_ramster() {
  rm -rf "$work/node"
  "$BIN" node --name bench --data-dir "$work/node" --capacity "$CAPACITY" \
    --nbd-listen "127.0.0.1:$PORT" --nbd-export "corpus:$size" --admin-listen off \
    ${NODE_ARGS:-} >"$work/node.log" 2>&1 &
  server_pid=$!
  wait_port
}

start_nbdkit() {
  nbdkit -f -p "$PORT" -i 127.0.0.1 memory "$size" >"$work/nbdkit.log" 2>&1 &
  server_pid=$!
  wait_port
}

qemu_read_iops() {
  local out secs
  out=$(qemu-img bench -f raw -t none -d 16 -s 4096 -c "$pages" "nbd://127.0.0.1:$PORT/$1")
  secs=$(echo "$out" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
  python3 -c "print(round($pages / $secs))"
}

results="$work/results.jsonl"
for run in $(seq 1 "$RUNS"); do
  for server in nbdkit ramster; do
    for depth in 16 1; do
      "start_$server"
      extra=()
      export_name=""
      if [ "$server" = ramster ]; then
        extra=(--api-socket "$work/node/api.sock" --backing "$work/node/nbd/corpus.swap")
        export_name=corpus
      fi
      line=$("$BIN" bench-nbd --addr "127.0.0.1:$PORT" --export "$export_name" \
        --corpus "$CORPUS" --depth "$depth" --server-pid "$server_pid" \
        --label "$server" --json "${extra[@]}")
      if [ "$depth" = 16 ]; then
        q=$(qemu_read_iops "$export_name")
        line=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); d['qemu_read_pages_per_s']=$q; print(json.dumps(d))" "$line")
      fi
      echo "$line" >>"$results"
      echo "run $run $server depth $depth: $line" >&2
      stop_server
    done
  done
done

python3 - "$results" "$pages" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
pages = int(sys.argv[2])
def med(server, depth, f):
    v = [f(r) for r in rows if r["label"] == server and r["depth"] == depth]
    v = [x for x in v if x is not None]
    return st.median(v) if v else float("nan")
metrics = [
    ("QD16 write pages/s (higher is better)", 16, lambda r: r["write"]["pages_per_s"]),
    ("QD16 read+verify pages/s", 16, lambda r: r["read"]["pages_per_s"]),
    ("QD16 read pages/s, qemu-img bench", 16, lambda r: r.get("qemu_read_pages_per_s")),
    ("QD1 write p50 us (lower is better)", 1, lambda r: r["write"]["p50_us"]),
    ("QD1 read p50 us", 1, lambda r: r["read"]["p50_us"]),
    ("QD1 server CPU us/write (lower is better)", 1, lambda r: r["write"].get("server_cpu_us_per_page")),
    ("QD1 server CPU us/read", 1, lambda r: r["read"].get("server_cpu_us_per_page")),
    ("QD16 server CPU us/write", 16, lambda r: r["write"].get("server_cpu_us_per_page")),
    ("QD16 server CPU us/read", 16, lambda r: r["read"].get("server_cpu_us_per_page")),
    ("RSS growth B/page (lower is better)", 16, lambda r: r["rss_bytes_per_page"]),
    ("RSS + backing file B/page", 16, lambda r: r["total_bytes_per_page"]),
]
print(f"corpus: {pages} pages; median of {len(rows)//4} runs")
print(f"| {'metric':40} | {'ramster':>10} | {'nbdkit memory':>13} | {'ramster / nbdkit':>16} |")
print(f"|{'-'*42}|{'-'*12}|{'-'*15}|{'-'*18}|")
for name, depth, f in metrics:
    a, b = med("ramster", depth, f), med("nbdkit", depth, f)
    print(f"| {name:40} | {a:10.1f} | {b:13.1f} | {a/b:16.2f} |")
sb = med("ramster", 16, lambda r: r["store_bytes_per_page"])
sp = med("ramster", 16, lambda r: r["store_pages"])
print(f"ramster store: {sp:.0f} of {pages} pages in the store at {sb:.0f} B/page (slabs + index); "
      "the rest (incompressible) in the backing file")
PY
