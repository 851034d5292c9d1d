#!/usr/bin/env bash
# The demo, run inside the VM by `make demo`: attach mlsched with the bundled model, show the
# counters, run a workload, show them again, detach.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MLSCHED_MODEL:-model_dir/model_path}
WORKLOAD_S=${MLSCHED_DEMO_SECONDS:-20}
LOG=${MLSCHED_VM_OUT:-build/vm-out}/demo-loader.log
mkdir -p "$(dirname "$LOG")"

state() { cat /sys/kernel/sched_ext/state; }
echo "demo: sched_ext state before: $(state)"
echo "demo: starting mlsched-load --model $MODEL --domains 2 --stats 5 (log: $LOG)"
# --stats: the loader prints a JSON stats line every 5 s, during the workload too (in its log).
python -m loader.main --model "$MODEL" --domains 2 --stats 5 >"$LOG" 2>&1 &
loader=$!
cleanup() { kill -INT "$loader" 2>/dev/null || true; wait "$loader" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 600); do
	[ "$(state)" = enabled ] && [ -d /sys/fs/bpf/mlsched ] && break
	kill -0 "$loader" 2>/dev/null || { echo "demo: loader exited:"; cat "$LOG"; exit 1; }
	sleep 0.1
done
echo "demo: attached: state $(state), ops $(cat /sys/kernel/sched_ext/root/ops)"
echo "demo: waiting for the model (the fallback serves meanwhile)"
for _ in $(seq 2400); do
	python -m tools.stats --once | grep -q 'model ready' && break
	sleep 0.1
done
totals() { python -m tools.stats --once --json --interval 0.2; }
echo
echo "=== mlsched-stats --once, before the workload ==="
python -m tools.stats --once
before=$(totals)
echo
echo "demo: running stress-ng (2 CPU hogs + 2 pipe ping-pong pairs) for ${WORKLOAD_S} s"
stress-ng --temp-path /tmp --cpu 2 --pipe 2 --timeout "${WORKLOAD_S}s" --metrics-brief \
	>"$(dirname "$LOG")/demo-stress.log" 2>&1 &
wait $!
grep -E 'metrc: .* (cpu|pipe) |successful' "$(dirname "$LOG")/demo-stress.log" | sed 's/^/  /'
echo
echo "=== mlsched-stats --once, after the workload ==="
python -m tools.stats --once
after=$(totals)
echo
echo "=== counters over the workload (after - before) ==="
python - "$before" "$after" <<'PY'
import json, sys
a, b = (json.loads(x) for x in sys.argv[1:3])
keys = ("candidates", "hits", "misses", "migrate", "keep", "fallback_migrate", "fallback_keep",
        "submitted", "rb_drops", "decisions", "migr_model", "migr_fallback")
print("  " + "  ".join(f"{k}={b[k + '_total'] - a[k + '_total']}" for k in keys))
PY
echo
kill -INT "$loader"
status=0
wait "$loader" || status=$?
trap - EXIT
echo "demo: loader exited with $status; sched_ext state after: $(state)"
echo "--- loader log (with its --stats lines) ---"
cat "$LOG"
[ "$status" = 0 ] && [ "$(state)" = disabled ]
