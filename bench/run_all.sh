#!/usr/bin/env bash
# Run the whole benchmark set, one benchmark at a time (never two at once: they pin cores).
#
#   bash bench/run_all.sh           # full set, about 28 minutes on 2 cores
#   bash bench/run_all.sh --quick   # quick subset, under 2 minutes; results in bench/results/quick/
#
# Needs nginx (apt-get install nginx-light), the bench extra (pip install -e '.[bench]':
# aioapns, matplotlib) and, for the Node peers, node + npm (packages are installed on
# demand into /tmp/fanout-bench-node). Everything talks to 127.0.0.1 only.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
QUICK=""
if [ "${1:-}" = "--quick" ]; then
    QUICK="--quick"
    export FANOUT_BENCH_RESULTS="$PWD/bench/results/quick"
else
    export FANOUT_BENCH_RESULTS="$PWD/bench/results"
fi
mkdir -p "$FANOUT_BENCH_RESULTS"
failed=()
start_all=$(date +%s)
cpu_busy() {  # share of all cores busy over one second, from /proc/stat
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat); sleep 1
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    echo "$a $b" | awk '{ d = $4 - $2; printf "%d", (d > 0 ? 100 * ($3 - $1) / d : 0) }'
}
busy=$(cpu_busy)
if [ "$busy" -gt 20 ]; then
    echo "warning: the cores are ${busy}% busy before starting: something else is running;" \
         "figures will be noisy (each report records the load average)" >&2
fi

step() {
    local name=$1; shift
    local t0; t0=$(date +%s)
    echo "=== $name: $*" >&2
    if "$@"; then
        echo "=== $name: done in $(( $(date +%s) - t0 )) s" >&2
    else
        echo "=== $name: FAILED (exit $?) after $(( $(date +%s) - t0 )) s" >&2
        failed+=("$name")
    fi
}

if [ -n "$QUICK" ]; then
    # quick: aioapns is measured once, by peers.py; throughput.py gives the engine/floor ratio
    step throughput $PY bench/throughput.py --quick --clients fanout,floor --matrix
    step peers      $PY bench/peers.py --quick
    step latency    $PY bench/latency.py --quick
    step scaling    $PY bench/scaling.py --quick
    step rejections $PY bench/rejections.py --quick
    step faults     $PY bench/faults.py --quick
    step teams      $PY bench/teams.py --quick
    step memory     $PY bench/memory.py --quick
    step doors      $PY bench/doors.py --quick
else
    step throughput $PY bench/throughput.py --matrix
    step peers      $PY bench/peers.py
    step latency    $PY bench/latency.py
    step scaling    $PY bench/scaling.py --rounds 5
    step rejections $PY bench/rejections.py --rounds 2
    step faults     $PY bench/faults.py
    step teams      $PY bench/teams.py
    step memory     $PY bench/memory.py
    step doors      $PY bench/doors.py
fi
step serve      $PY bench/serve.py $QUICK   # in both sets (--quick when given)
step demo_rate  $PY bench/demo_rate.py $QUICK   # fanout demo against the nginx sink's rate
step plots $PY bench/plots.py

echo
echo "Targets (ratios from this run):"
for f in throughput peers latency scaling rejections teams memory doors serve demo_rate; do
    md="$FANOUT_BENCH_RESULTS/$f.md"
    [ -f "$md" ] && grep -h -E 'target|\| (yes|NO) \|$' "$md" | sed "s/^/  [$f] /"
done
echo
echo "Results: $FANOUT_BENCH_RESULTS/*.json, *.md, *.png ($(( $(date +%s) - start_all )) s in all)"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
