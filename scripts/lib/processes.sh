# Process bookkeeping shared by the benchmark scripts (sourced, not run).
# Every process a script starts goes into `pids`; all of them are stopped
# on exit. `wait_port` names "$out" (the script's log dir) when a server dies.

pids=()
# Stops what this script started and has not reaped yet: `jobs -p` lists only
# our live children, so a PID reused by someone else is never signalled.
stop_all() {
    local pid live
    live=" $(jobs -p | tr '\n' ' ') "
    for pid in "${pids[@]}"; do
        [[ "$live" == *" $pid "* ]] || continue
        kill "$pid" 2>/dev/null || true
        # Bounded wait for a clean exit, then insist.
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap stop_all EXIT

say() { echo "== $*" >&2; }

# Waits (bounded) until a TCP port on loopback accepts connections.
wait_port() {
    local port="$1" what="$2" pid="$3"
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { echo "$what exited; see $out" >&2; return 1; }
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "$what did not listen on 127.0.0.1:$port within 10 s" >&2
    return 1
}

# Waits (bounded, 30 s) until the node whose admin endpoint is $1 answers
# healthy and counts $2 members up. Health alone is not enough: a seed that
# bootstrapped is a healthy cluster of one before the others have joined.
wait_cluster() {
    local admin="$1" want="$2" up
    for _ in $(seq 1 300); do
        if "$ramster" health --endpoint "$admin" >/dev/null 2>&1; then
            up="$("$ramster" status --endpoint "$admin" -o json \
                | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes_up"])')"
            [[ "$up" == "$want" ]] && return 0
        fi
        sleep 0.1
    done
    "$ramster" status --endpoint "$admin" || true
    echo "cluster not healthy with $want nodes up within 30 s; logs in $out" >&2
    return 1
}
