#!/usr/bin/env bash
# One collection run of `make train` (scripts/train.sh), inside the VM: mlsched-collect for
# TRAIN_SECONDS (default 120) while the benchmark's kinds of load run one after the other, an
# equal share of the time each, in the order TRAIN_ORDER (default "uneven mixed messaging
# build"; the held-out run takes another order, so that its rows are not the training run's
# moments over again):
#   uneven      one more CPU hog than CPUs beside pipe and context-switch pairs: one domain
#               holds more hogs, its wakeups find no idle CPU while the other is less loaded
#               (no --taskset: a CPU kept busy by a pinned hog starves its domain's queue)
#   mixed       the benchmark's mixed load: more stress-ng CPU hogs (fft) than CPUs, pipe pairs
#   messaging   `perf bench sched messaging` in a loop (wakeup-heavy groups over sockets)
#   build       `make -j<cpus>` of the benchmark's generated C code base, in a loop
# Writes $OUT/candidates.csv (+ .outcomes.csv) and $OUT/collect.log, OUT =
# ${MLSCHED_VM_OUT:-build/vm-out}/train/$TRAIN_RUN; prints the collector's progress every
# PROGRESS_S seconds; exit status: the collector's. Environment: TRAIN_SECONDS, TRAIN_RUN
# (default "train"), TRAIN_ORDER, TRAIN_EXPLORE (default 0.3), TRAIN_DOMAINS (passed as
# --domains when set), TRAIN_COLLECT_ARGS (more mlsched-collect options), MLSCHED_VM_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${TRAIN_SECONDS:-120}
EXPLORE=${TRAIN_EXPLORE:-0.3}
RUN=${TRAIN_RUN:-train}
read -r -a order <<<"${TRAIN_ORDER:-uneven mixed messaging build}"
OUT=${MLSCHED_VM_OUT:-build/vm-out}/train/$RUN
PROGRESS_S=15
mkdir -p "$OUT"
rm -f "$OUT/candidates.csv" "$OUT/candidates.outcomes.csv"
ncpu=$(nproc)
[ ${#order[@]} -gt 0 ] || { echo "train-guest: TRAIN_ORDER is empty" >&2; exit 2; }
phase=$((TOTAL / ${#order[@]}))
say() { echo "train-guest[$RUN]: $*"; }

# The benchmark's code base, generated before the clock runs (tools/bench/workloads.py).
codebase=/tmp/train-codebase
have_build=0
if python -c "from pathlib import Path; from tools.bench.workloads import generate_codebase
generate_codebase(Path('$codebase'), 24, 6)" 2>/dev/null; then have_build=1; fi

domains=()
[ -z "${TRAIN_DOMAINS:-}" ] || domains=(--domains "$TRAIN_DOMAINS")
read -r -a extra <<<"${TRAIN_COLLECT_ARGS:-}"
python -m tools.collect --output "$OUT/candidates.csv" --duration "$TOTAL" \
	--explore "$EXPLORE" "${domains[@]}" "${extra[@]}" >"$OUT/collect.log" 2>&1 &
collector=$!
load_pids=()
stop_load() {
	for p in "${load_pids[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
	load_pids=()
}
trap 'stop_load; kill -INT $collector 2>/dev/null || true' EXIT

for _ in $(seq 900); do
	grep -q 'attached mlsched' "$OUT/collect.log" 2>/dev/null && break
	kill -0 $collector 2>/dev/null || break
	sleep 0.1
done
if ! grep -q 'attached mlsched' "$OUT/collect.log"; then
	say "the collector did not attach"; cat "$OUT/collect.log"; exit 1
fi
say "collector attached ($ncpu CPUs, explore P $EXPLORE); $TOTAL s of load in ${#order[@]} phases of $phase s: ${order[*]}"

# The collector's latest progress line ("t= 45 s: 1962 records ..."), without its time stamp;
# nothing when it has not moved on (the last phase outlives the collection by a little).
last_progress=
progress() {
	local line
	line=$(grep ' t=' "$OUT/collect.log" | tail -n 1) || true
	[ -n "$line" ] && [ "$line" != "$last_progress" ] || return 0
	last_progress=$line
	say "${line#* mlsched-collect: }"
}

# Each phase runs in its own process group so that stop_load takes all of it down.
run_phase() { # name, command...
	local name=$1 left=$phase
	shift
	say "phase $name ($phase s)"
	setsid "$@" >/dev/null 2>&1 &
	load_pids+=($!)
	while [ "$left" -gt 0 ]; do
		local step=$((left < PROGRESS_S ? left : PROGRESS_S))
		sleep "$step"
		left=$((left - step))
		progress
	done
	stop_load
}
sng=(stress-ng --temp-path /tmp --timeout "${phase}s" --quiet)
for name in "${order[@]}"; do
	case $name in
	uneven) run_phase uneven "${sng[@]}" --cpu $((ncpu + 1)) --pipe 2 --switch 1 ;;
	mixed) run_phase mixed "${sng[@]}" --cpu $((ncpu + 2)) --cpu-method fft --pipe 2 ;;
	messaging)
		if command -v perf >/dev/null; then
			run_phase messaging bash -c 'while :; do perf bench sched messaging -g 4 -l 60; done'
		else
			run_phase messaging "${sng[@]}" --sock 2 --switch 2
		fi ;;
	build)
		if [ $have_build = 1 ]; then
			run_phase build bash -c "while :; do rm -rf /tmp/train-build
				make -s -f $codebase/Makefile SRC=$codebase OUT=/tmp/train-build -j$ncpu; done"
		else
			run_phase build "${sng[@]}" --fork 2 --exec 1
		fi ;;
	*) say "unknown phase '$name' in TRAIN_ORDER (uneven, mixed, messaging, build)"; exit 2 ;;
	esac
done

status=0
wait $collector || status=$?
trap - EXIT
say "collector exited with $status"
sed -n '/time is up\|ending early/,$p' "$OUT/collect.log" | sed 's/^[0-9:]* mlsched-collect: /  /'
exit $status
