#!/usr/bin/env bash
# Attach/detach cycles under load, run inside the VM by scripts/vm-run.sh:
#
#   scripts/vm-run.sh --cpus 2 -- 'bash scripts/attach-cycles-guest.sh [N]'
#
# A stability check of the VM itself as much as of mlsched: every sched_ext attach and detach
# flips static keys, i.e. patches kernel text while the other vCPUs run, and bookworm's QEMU 7.2
# under multi-threaded TCG left stale int3 breakpoints behind and panicked the guest
# (DESIGN.md, "VM"). With `stress-ng --cpu 2 --pipe 1` in the background, N times (default 25):
# start `python -m loader.main --no-model --domains 2` (the fallback serves every candidate: no
# model to load, so a cycle takes seconds under TCG), wait for state `enabled` with ops
# `mlsched`, let it schedule ~2 s, SIGINT it, then wait for state `disabled` and the loader's
# exit status 0. At the end the kernel log is searched for an oops, a BUG, a stall, an int3 trap
# or a panic. Prints one line per cycle and the summary
#
#   attach-cycles: N ok, M failed, dmesg: clean|<first bad line>
#
# and exits 0 only when every cycle passed and the kernel log is clean. A failed cycle prints
# the tail of its loader log; each log is kept in $MLSCHED_VM_OUT/attach-cycles/ (default
# build/vm-out/attach-cycles/, shared with the host), with the stress-ng log and the dmesg.
set -euo pipefail
cd "$(dirname "$0")/.."

CYCLES=${1:-25}
[[ $CYCLES =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [CYCLES]" >&2; exit 2; }
# Upper bounds so that a broken cycle fails instead of hanging; not performance targets. Under
# TCG beside the stress load the loader's start (Python, numpy, libbpf) took 34-59 s to attach on
# a 2-core host shared with another VM (2026-12), hence a bound well above tests/vm's 60 s.
ATTACH_TIMEOUT_S=300
RUN_S=2
DETACH_TIMEOUT_S=60
OUT=${MLSCHED_VM_OUT:-build/vm-out}/attach-cycles
mkdir -p "$OUT"
rm -f "$OUT"/loader-*.log

state() { cat /sys/kernel/sched_ext/state; }
ops() { cat /sys/kernel/sched_ext/root/ops 2>/dev/null || true; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
# Poll a condition (a command) every 50 ms for at most $1 seconds; status 1 on timeout.
wait_until() {
	local limit=$(($(now_ms) + $1 * 1000))
	shift
	until "$@"; do
		[ "$(now_ms)" -lt "$limit" ] || return 1
		sleep 0.05
	done
}
is_attached() { [ "$(state)" = enabled ] && [ "$(ops)" = mlsched ]; }
is_disabled() { [ "$(state)" = disabled ]; }
loader_alive() { kill -0 "$loader" 2>/dev/null; }
loader_gone() { ! loader_alive; }
attached_or_gone() { is_attached || loader_gone; }

[ -e /sys/kernel/sched_ext/state ] || { echo "attach-cycles: this kernel has no sched_ext"; exit 2; }
is_disabled || { echo "attach-cycles: a scheduler is already attached ($(ops))"; exit 2; }

# The load: two CPU hogs and a pipe ping-pong pair, so wakeups find busy CPUs and mlsched's
# migration path runs during each cycle; it runs across all cycles, attach and detach included.
stress-ng --temp-path /tmp --cpu 2 --pipe 1 >"$OUT/stress.log" 2>&1 &
load=$!
loader=
cleanup() {
	[ -z "$loader" ] || kill -KILL "$loader" 2>/dev/null || true
	kill -TERM "$load" 2>/dev/null || true
	wait "$load" 2>/dev/null || true
}
trap cleanup EXIT
echo "attach-cycles: $(uname -r), $(nproc) CPUs, stress-ng --cpu 2 --pipe 1, $CYCLES cycles"

ok=0 failed=0
for i in $(seq "$CYCLES"); do
	log=$OUT/loader-$i.log
	why=
	t0=$(now_ms)
	python -m loader.main --no-model --domains 2 >"$log" 2>&1 &
	loader=$!
	# Attach: enabled with our ops, while the loader still runs (a loader that died is a
	# failure at once, not after the timeout).
	if ! wait_until "$ATTACH_TIMEOUT_S" attached_or_gone; then
		why="not attached after ${ATTACH_TIMEOUT_S} s (state $(state))"
	elif ! loader_alive; then
		why="loader exited before attaching"
	fi
	t_att=$(($(now_ms) - t0))
	t_det=-1 status=-
	if [ -z "$why" ]; then
		sleep "$RUN_S"
		if ! is_attached; then
			why="left during the run (state $(state), ops '$(ops)')"
		fi
		kill -INT "$loader" 2>/dev/null || true
		t1=$(now_ms)
		# Detach: the loader exits (its link dies with it) and the kernel reports disabled.
		if ! wait_until "$DETACH_TIMEOUT_S" loader_gone; then
			why=${why:-"loader still running ${DETACH_TIMEOUT_S} s after SIGINT"}
			kill -KILL "$loader" 2>/dev/null || true
		fi
		status=0
		wait "$loader" || status=$?
		if ! wait_until "$DETACH_TIMEOUT_S" is_disabled; then
			why=${why:-"state $(state) ${DETACH_TIMEOUT_S} s after the loader exited"}
		fi
		t_det=$(($(now_ms) - t1))
		[ "$status" = 0 ] || why=${why:-"loader exit status $status"}
		[ ! -e /sys/fs/bpf/mlsched ] || why=${why:-"/sys/fs/bpf/mlsched left behind"}
	else
		kill -KILL "$loader" 2>/dev/null || true
		wait "$loader" 2>/dev/null || true
		wait_until "$DETACH_TIMEOUT_S" is_disabled || true
	fi
	loader=
	if [ -z "$why" ]; then
		ok=$((ok + 1))
		echo "cycle $i: ok (attach ${t_att} ms, SIGINT to disabled ${t_det} ms, exit $status)"
	else
		failed=$((failed + 1))
		echo "cycle $i: FAILED: $why"
		tail -n 20 "$log" | sed 's/^/    /'
	fi
done

trap - EXIT
cleanup

# The kernel log: whatever the cycles said, an oops, BUG, stall (sched_ext watchdog, RCU,
# soft lockup), int3 trap or panic fails the run. The kernel command line is skipped: virtme-ng
# boots with panic=-1 on it.
dmesg >"$OUT/dmesg.log" 2>&1 || true
bad=$(grep -E 'Oops|BUG|stall|int3|panic' "$OUT/dmesg.log" |
	grep -vE 'Command line:|Kernel command line:' | head -n 1 || true)
echo "attach-cycles: $CYCLES cycles in $SECONDS s"
echo "attach-cycles: $ok ok, $failed failed, dmesg: ${bad:-clean}"
[ "$failed" = 0 ] && [ -z "$bad" ]
