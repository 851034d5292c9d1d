#!/usr/bin/env bash
# The soak, run inside the VM by `make soak`: mlsched under a mixed load for SOAK_SECONDS
# (default 300), sampling the loader's RSS; fails if the scheduler is ejected or the loader dies.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${SOAK_SECONDS:-300}
OUT=${MLSCHED_VM_OUT:-build/vm-out}
LOG=$OUT/soak-loader.log
mkdir -p "$OUT"

state() { cat /sys/kernel/sched_ext/state; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

python -m loader.main --model model_dir/model_path --domains 2 >"$LOG" 2>&1 &
loader=$!
trap 'kill -INT $loader 2>/dev/null || true; wait $loader 2>/dev/null || true' EXIT
for _ in $(seq 600); do
	[ "$(state)" = enabled ] && [ -d /sys/fs/bpf/mlsched ] && break
	sleep 0.1
done
[ "$(state)" = enabled ] || { echo "soak: mlsched did not attach"; cat "$LOG"; exit 1; }
sleep 2
rss0=$(rss_kb $loader)
echo "soak: attached; loader RSS ${rss0} kB; load for ${SECONDS_TOTAL} s:" \
	"stress-ng cpu, fork, pipe, switch (wakeup-heavy)"

stress-ng --temp-path /tmp --cpu 2 --fork 2 --pipe 2 --switch 2 --timeout "${SECONDS_TOTAL}s" \
	--metrics-brief >"$OUT/soak-stress.log" 2>&1 &
load=$!
rss_max=$rss0
ejected=0
t=0
while kill -0 $load 2>/dev/null; do
	sleep 10
	t=$((t + 10))
	if [ "$(state)" != enabled ] || ! kill -0 $loader 2>/dev/null; then
		ejected=1
		break
	fi
	rss=$(rss_kb $loader)
	[ "$rss" -gt "$rss_max" ] && rss_max=$rss
	if [ $((t % 60)) = 0 ]; then
		echo "soak: t=${t}s loader RSS ${rss} kB"
		python -m tools.stats --once | sed 's/^/  /'
	fi
done
wait $load || true
rss1=$(rss_kb $loader 2>/dev/null || echo 0)
echo "soak: stress-ng finished:"
sed 's/^/  /' "$OUT/soak-stress.log" | grep -E 'metrc|successful|fail' || true
python -m tools.stats --once | sed 's/^/  /' || true
echo "soak: loader RSS start ${rss0} kB, end ${rss1} kB, max ${rss_max} kB," \
	"growth $((rss1 - rss0)) kB"
if [ $ejected = 1 ]; then
	echo "soak: FAILED: mlsched left or the loader died (state $(state))"
	cat "$LOG"
	exit 1
fi
kill -INT $loader
status=0
wait $loader || status=$?
trap - EXIT
echo "soak: loader exited $status; state $(state); no ejection in ${SECONDS_TOTAL} s"
[ "$status" = 0 ]
