#!/usr/bin/env bash
# Chaos on the compose cluster (docker/compose.yaml): stores a known set of
# pages through node1 once, then hits the donors one fault at a time and
# loads every accepted page back, checked byte for byte, while each fault
# lasts and again once it is healed:
#
#   kill     docker kill a donor (node2), start it again
#   pause    docker pause another (node3), unpause it
#   netsplit docker network disconnect the memory server, connect it again
#   restart  docker-compose restart the memory server
#
# Each fault is healed (the cluster back to HEALTH_OK) before the next.
# Everything runs under its own compose project and is torn down on exit,
# pass or fail; a failure prints the nodes' logs. Bounded: every command has
# a timeout and the run (after the image build) stops after CHAOS_DEADLINE
# seconds.
#
#   scripts/compose-chaos.sh            # builds the image first
#   SKIP_BUILD=1 CHAOS_STEPS="pause restart" scripts/compose-chaos.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export RAMSTER_IMAGE=${RAMSTER_IMAGE:-ramster:dev}
project=${CHAOS_PROJECT:-ramster-chaos}
pages=${CHAOS_PAGES:-48000}
deadline=${CHAOS_DEADLINE:-420}
verify_timeout=${CHAOS_VERIFY_TIMEOUT:-60}
# Which faults, in order (any of kill pause netsplit restart).
steps=${CHAOS_STEPS:-kill pause netsplit restart}
for step in $steps; do
  case $step in
    kill | pause | netsplit | restart) ;;
    *) echo "unknown step $step (kill, pause, netsplit, restart)" >&2; exit 2 ;;
  esac
done
compose=(docker-compose -p "$project" -f docker/compose.yaml)
network="${project//[^a-zA-Z0-9_-]/}_default"
state=$(mktemp -d)
# The client container runs as the image's user.
chmod 0777 "$state"
results=()
failed=0

log() { printf '[%3ds] %s\n' "$SECONDS" "$*"; }

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ]; then
    echo "== logs"
    timeout 60 "${compose[@]}" logs --no-color --tail=80 node1 node2 node3 memory1 2>&1
  fi
  # Paused containers cannot be stopped.
  for c in $(timeout 30 "${compose[@]}" ps -q 2>/dev/null); do
    docker unpause "$c" >/dev/null 2>&1
  done
  timeout 120 "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
  rm -rf "$state"
  log "torn down"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check_deadline() {
  if [ "$SECONDS" -gt "$deadline" ]; then
    log "over the ${deadline}s deadline"
    exit 1
  fi
}

container() { "${compose[@]}" ps -q "$1"; }

# `ramster bench` in a client container on node1's API socket.
bench() {
  timeout 180 "${compose[@]}" run --rm -T --no-deps -v "$state:/state" client \
    bench --socket /node1/api.sock --state /state/pages.json --json "$@"
}

# Waits until node1 answers HEALTH_OK (every node up, a leader).
wait_healthy() {
  local why=$1 line
  for _ in $(seq 90); do
    check_deadline
    if line=$(timeout 20 "${compose[@]}" exec -T node1 ramster health 2>&1); then
      log "HEALTH_OK ($why)"
      return 0
    fi
    sleep 1
  done
  log "not healthy after 90 s ($why): $line"
  return 1
}

# Waits until node1 sees all four nodes up (HEALTH_OK alone holds as soon
# as node1 has formed the cluster by itself).
wait_members() {
  for _ in $(seq 90); do
    check_deadline
    if timeout 20 "${compose[@]}" exec -T node1 ramster status 2>/dev/null | grep -q "4 of 4 up"; then
      return 0
    fi
    sleep 1
  done
  log "node1 never saw four nodes up"
  return 1
}

# Loads every accepted page back; records a result line for the summary.
# A page whose only reachable copy sits on a silent donor costs an RPC
# deadline (5 s) before it is given up on, so a verify during a fault is
# bounded on its own.
verify() {
  local step=$1 out rc=0 found
  check_deadline
  out=$(timeout "$verify_timeout" "${compose[@]}" run --rm -T --no-deps -v "$state:/state" client \
    bench --socket /node1/api.sock --state /state/pages.json --json --phase verify 2>&1) || rc=$?
  found=$(grep '^{"phase"' <<<"$out" | tail -n1 || true)
  if [ "$rc" -eq 0 ]; then
    results+=("PASS  $step  $found")
    log "PASS $step"
  else
    [ "$rc" -eq 124 ] && found="no answer within ${verify_timeout}s"
    results+=("FAIL  $step  ${found:-$(tail -n1 <<<"$out")}")
    log "FAIL $step: ${found:-$(tail -n1 <<<"$out")}"
    failed=1
  fi
}

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building $RAMSTER_IMAGE"
  docker/build-image.sh
  log "built"
  # The deadline is for the cluster's run; a cold build is the compiler's.
  SECONDS=0
fi

log "starting the cluster ($project)"
timeout 180 "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
timeout 180 "${compose[@]}" up -d
wait_members
wait_healthy "four nodes"
timeout 20 "${compose[@]}" exec -T node1 ramster status

log "storing $pages pages through node1"
bench --phase store --pages "$pages"
sleep 5 # remotify runs in the background: let it ship pages to the donors
timeout 20 "${compose[@]}" exec -T node1 ramster status | tail -n 5
verify "baseline"

step_kill() {
  log "kill: node2"
  docker kill "$(container node2)" >/dev/null
  verify "kill node2 (down)"
  docker start "$(container node2)" >/dev/null
  wait_healthy "node2 back"
  verify "kill node2 (healed)"
}

step_pause() {
  log "pause: node3"
  docker pause "$(container node3)" >/dev/null
  verify "pause node3 (paused)"
  docker unpause "$(container node3)" >/dev/null
  wait_healthy "node3 unpaused"
  verify "pause node3 (healed)"
}

step_netsplit() {
  log "netsplit: memory1"
  docker network disconnect "$network" "$(container memory1)"
  verify "disconnect memory1 (split)"
  docker network connect --alias memory1 "$network" "$(container memory1)"
  wait_healthy "memory1 reconnected"
  verify "disconnect memory1 (healed)"
}

step_restart() {
  log "restart: memory1"
  # The memory server drains before it stops (up to 60 s), then starts.
  timeout 150 "${compose[@]}" restart memory1
  wait_healthy "memory1 restarted"
  verify "restart memory1 (healed)"
}

for step in $steps; do
  "step_$step"
done

timeout 20 "${compose[@]}" exec -T node1 ramster status | tail -n 5
echo "== results (${SECONDS}s)"
printf '%s\n' "${results[@]}"
[ "$failed" -eq 0 ]
