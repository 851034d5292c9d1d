#!/usr/bin/env bash
# make train, end to end (tools/collect.md, "make train"):
#   1. collection, boot 1: the training run      scripts/train-guest.sh in a VM (vm-run.sh)
#   2. collection, boot 2: the held-out run      the same loads in another order, another boot
#   3. training on the training run              model_export.py --objective policy --safe Z
#                                                -> MODEL; and, to compare, without --safe
#                                                -> build/train/unconstrained
#   4. evaluation on the held-out run            mlsched-evaluate -> build/train/evaluation.*
# Both runs log with exploration P (the coin of collection mode) and write dataset v2 (every
# row's propensity and outcome); rows whose task slept through its window are kept as cost 0
# (mlsched-collect --idle-rows label), rows the VM could not measure because it did not run
# are left out (--max-late-ms). MODEL is the contract's 64-64 network, exported with its
# verified numpy fast path and manifest, ready for `sudo mlsched-load --model MODEL`.
#
# Files, in build/train/: train.csv, heldout.csv (+ .outcomes.csv, the collectors' logs),
# train.log (model_export's output), history.json (its learning curve), unconstrained/ and
# unconstrained.log (the comparison model), evaluation.txt / .md /
# .json / .png (the table, the figures, the learning curve and the policy comparison),
# timings.txt. Every step says how long it took; the VM lock wait is reported apart.
#
# Environment (the Makefile passes its variables): TRAIN_CPUS (4), TRAIN_SECONDS (210, the
# training run), HELDOUT_SECONDS (TRAIN_SECONDS), TRAIN_EXPLORE (0.5), TRAIN_ESTIMATOR (dr),
# TRAIN_MAX_LATE_MS (50, half the outcome window), TRAIN_SAFE (1.96; "" trains MODEL without
# --safe),
# TRAIN_COST (delay-per-run), TRAINED_MODEL (build/train/model), TRAIN_COLLECT (1;
# 0 trains and evaluates again on the datasets already in build/train), VM_LOCK (a file to
# flock around each boot, so that two measurements never share the machine; unset: no lock),
# PY (the venv's python).
set -euo pipefail
ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$ROOT"
# The tools run from this tree even when the venv's editable install points at another one.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-$ROOT/.venv/bin/python}
VENV_BIN=$(dirname "$PY")
CPUS=${TRAIN_CPUS:-4}
TRAIN_S=${TRAIN_SECONDS:-210}
HELDOUT_S=${HELDOUT_SECONDS:-$TRAIN_S}
EXPLORE=${TRAIN_EXPLORE:-0.5}
MAX_LATE_MS=${TRAIN_MAX_LATE_MS:-50}
SAFE=${TRAIN_SAFE-1.96}
ESTIMATOR=${TRAIN_ESTIMATOR:-dr}
COST=${TRAIN_COST:-delay-per-run}
MODEL=${TRAINED_MODEL:-build/train/model}
COLLECT=${TRAIN_COLLECT:-1}
LOCK=${VM_LOCK:-}
OUT=build/train
VM_OUT=build/vm-out/train
# The training run and the held-out run: the same loads, in another order.
TRAIN_ORDER="uneven mixed messaging build"
HELDOUT_ORDER="messaging build uneven mixed"

say() { printf 'train: %s\n' "$*"; }
die() {
	say "$*" >&2
	exit 1
}
T0=$SECONDS
timings=()
step_start=0
step() { # number, title
	step_start=$SECONDS
	say ""
	say "== step $1/4: $2 (at $((SECONDS - T0)) s)"
}
step_done() { # what
	local took=$((SECONDS - step_start))
	timings+=("$(printf '%-34s %4d s' "$1" "$took")")
	say "-- $1: $took s"
}

[ -x "$PY" ] || die "no $PY: run make setup"
[ -f bpf/mlsched.bpf.o ] || die "no bpf/mlsched.bpf.o: run make bpf"
mkdir -p "$OUT"

# One collection boot: run name, seconds, load order.
collect() {
	local run=$1 secs=$2 order=$3 fd waited=0 rc=0 t
	local cmd="TRAIN_RUN=$run TRAIN_SECONDS=$secs TRAIN_EXPLORE=$EXPLORE"
	cmd+=" TRAIN_ORDER='$order' TRAIN_COLLECT_ARGS='--idle-rows label --max-late-ms $MAX_LATE_MS'"
	cmd+=" bash scripts/train-guest.sh"
	rm -f "$VM_OUT/$run/candidates.csv"
	if [ -n "$LOCK" ]; then
		exec {fd}>>"$LOCK"
		t=$SECONDS
		if ! flock -n "$fd"; then
			say "waiting for the VM lock $LOCK (another measurement is running)"
			flock "$fd"
		fi
		waited=$((SECONDS - t))
		[ "$waited" = 0 ] || say "got the VM lock after $waited s"
		timings+=("$(printf '%-34s %4d s' "  (lock wait before $run)" "$waited")")
	fi
	t=$SECONDS
	scripts/vm-run.sh --cpus "$CPUS" -- "$cmd" || rc=$?
	if [ -n "$LOCK" ]; then
		flock -u "$fd"
		exec {fd}>&-
	fi
	step_start=$((step_start + waited)) # the step's time is the boot's, not the wait's
	[ "$rc" = 0 ] || die "the $run collection failed in the VM (status $rc): $VM_OUT/$run/collect.log"
	[ -s "$VM_OUT/$run/candidates.csv" ] || die "the $run collection wrote no dataset"
	cp "$VM_OUT/$run/candidates.csv" "$OUT/$run.csv"
	cp "$VM_OUT/$run/candidates.outcomes.csv" "$OUT/$run.outcomes.csv"
	cp "$VM_OUT/$run/collect.log" "$OUT/$run.collect.log"
	say "$run run: $(grep -c '^[0-9]' "$OUT/$run.csv") rows in $OUT/$run.csv ($((SECONDS - t)) s in the VM)"
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
git diff --quiet HEAD 2>/dev/null || commit+="+changes"
say "mlsched make train ($commit): $CPUS vCPUs, training run $TRAIN_S s, held-out run $HELDOUT_S s, explore P $EXPLORE; estimator $ESTIMATOR${SAFE:+, --safe $SAFE}, cost $COST -> $MODEL"
if [ "$COLLECT" = 1 ]; then
	step 1 "collection, boot 1: the training run ($TRAIN_S s: $TRAIN_ORDER)"
	collect train "$TRAIN_S" "$TRAIN_ORDER"
	step_done "collection, boot 1 (training)"
	step 2 "collection, boot 2: the held-out run ($HELDOUT_S s: $HELDOUT_ORDER)"
	collect heldout "$HELDOUT_S" "$HELDOUT_ORDER"
	step_done "collection, boot 2 (held-out)"
else
	for run in train heldout; do
		[ -s "$OUT/$run.csv" ] || die "TRAIN_COLLECT=0 but no $OUT/$run.csv: collect first"
	done
	say "TRAIN_COLLECT=0: the datasets already in $OUT (steps 1 and 2 skipped)"
fi

step 3 "training on the training run: model_export.py --objective policy --estimator $ESTIMATOR${SAFE:+ --safe $SAFE}"
safe_args=()
[ -z "$SAFE" ] || safe_args=(--safe "$SAFE")
if ! "$VENV_BIN/mlsched-export" --objective policy --estimator "$ESTIMATOR" \
	"${safe_args[@]}" --cost "$COST" --data "$OUT/train.csv" --history "$OUT/history.json" \
	--output "$MODEL" 2>&1 | tee "$OUT/train.log"; then
	die "training failed ($OUT/train.log)"
fi
compare=()
if [ -n "$SAFE" ]; then
	# The same objective learning from every row, for comparison: $OUT/unconstrained.log.
	say "and without --safe, for comparison: $OUT/unconstrained (output in $OUT/unconstrained.log)"
	if "$VENV_BIN/mlsched-export" --objective policy --estimator "$ESTIMATOR" \
		--cost "$COST" --data "$OUT/train.csv" --output "$OUT/unconstrained" \
		>"$OUT/unconstrained.log" 2>&1; then
		compare=("$OUT/unconstrained")
		grep -E '^(early stop|done after|fast path|learned - heuristic)' "$OUT/unconstrained.log" |
			sed 's/^/  /'
	else
		say "the comparison model failed ($OUT/unconstrained.log); evaluating without it"
	fi
fi
step_done "training"

step 4 "evaluation on the held-out run: mlsched-evaluate"
if ! "$PY" -m tools.evaluate --data "$OUT/heldout.csv" --model "$MODEL" "${compare[@]}" \
	--cost "$COST" \
	--history "$OUT/history.json" --plot "$OUT/evaluation.png" --json "$OUT/evaluation.json" \
	--markdown "$OUT/evaluation.md" 2>&1 | tee "$OUT/evaluation.txt"; then
	die "evaluation failed ($OUT/evaluation.txt)"
fi
step_done "evaluation"

# The verdict on the target, from the figures: learned below the heuristic, interval < 0. It
# also goes into the model's provenance (its manifest), which the loader logs at start.
verdict=$("$PY" - "$OUT/evaluation.json" "$MODEL" <<'EOF'
import json, sys
from pathlib import Path
from loader.model_check import MANIFEST_FILE
from model_dir.export_verified import write_manifest
doc = json.loads(Path(sys.argv[1]).read_text())
model = Path(sys.argv[2]).resolve()
for p in doc["policies"]:
    if p["vs_baseline"] is None or not (Path(p["name"]).resolve() == model):
        continue
    parts = []
    for e, d in p["vs_baseline"].items():
        met = d["hi"] < 0
        parts.append(f"{e.upper()} {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] "
                     + ("met" if met else "NOT met"))
    print("target (learned - heuristic < 0, its 95 % interval excluding 0): " + "; ".join(parts))
    prov = json.loads((model / MANIFEST_FILE).read_text()).get("provenance") or {}
    prov["summary"] = (f"{prov.get('summary', 'trained')}; held-out learned - heuristic "
                       + "; ".join(parts))
    prov["evaluation"] = {"heldout": str(Path(sys.argv[1])), "vs_heuristic": p["vs_baseline"]}
    prov["tool"] = "make train"
    write_manifest(model, prov)
EOF
)
say ""
say "$verdict"
say "the model: $MODEL, ready for: sudo mlsched-load --model $MODEL"
say "files: $OUT/{train,heldout}.csv, train.log, history.json, evaluation.{txt,md,json,png}"
timings+=("$(printf '%-34s %4d s' "total" "$((SECONDS - T0))")")
printf '%s\n' "${timings[@]}" | tee "$OUT/timings.txt" | sed 's/^/train: /'
