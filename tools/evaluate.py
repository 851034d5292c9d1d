"""mlsched-evaluate: off-policy evaluation of migration policies on a collected dataset.

usage: mlsched-evaluate --data FILE [--model DIR ...] [--history FILE] [--plot FILE.png]
                        [--json FILE] [--markdown FILE]

FILE is a v2 dataset from mlsched-collect (model_dir/README.md): every candidate with the action
the logging policy took, the probability with which it took it, and the outcome. For
always-keep, always-migrate, the kernel's heuristic, the dummy (random weights, in a checkout)
and each --model (default: the bundled model), it prints the estimated mean cost per candidate
had that policy decided every row (model_dir/offpolicy.py): inverse-propensity (IPS) and doubly
robust (DR) estimates with 95 % block-bootstrap intervals, and each policy minus the heuristic
with its paired interval. The models run as the loader runs them (check_model_dir, then the
verified numpy fast path, else TensorFlow). Held-out data must come from a separate collection
run (another boot), not from the run a model was trained on. --plot draws the policy comparison,
and the learning curve of a model_export.py --history file.

Exit status: 0 evaluated; 2 a bad argument, dataset or model (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from loader import contract, paths
from loader.cli import parser, plot_refusal, positive_int
from model_dir import offpolicy

BASELINE = "heuristic"

EXAMPLES = """examples:
  mlsched-evaluate --data heldout.csv --model model_dir/model_path_trained
  mlsched-evaluate --data heldout.csv.gz --model /tmp/a /tmp/b --estimators dr --block-s 2
  mlsched-evaluate --data heldout.csv --model /tmp/learned --history /tmp/history.json \\
      --plot /tmp/eval.png --json /tmp/eval.json

The dataset comes from a collection run other than the training run:
  sudo mlsched-collect --output heldout.csv --explore 0.3     # after a reboot, under load
"""


class EvalError(Exception):
    """A bad input; str() is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = parser("mlsched-evaluate", "Estimate, from logged candidates, the mean cost each "
               "migration policy would have had (IPS and DR, 95 % bootstrap intervals), and its "
               "difference with the kernel's heuristic.", EXAMPLES)
    p.add_argument("--data", required=True, type=Path, metavar="FILE",
                   help="dataset from mlsched-collect, format v2 (.csv or .csv.gz)")
    p.add_argument("--model", nargs="+", default=[paths.BUNDLED_MODEL], type=Path,
                   metavar="DIR", help="SavedModel directories to evaluate (default: the "
                   f"bundled model, {paths.BUNDLED_MODEL})")
    # The dummy (random weights) lives with the tests: a checkout has it, a package does not.
    dummy = paths.DUMMY_MODEL if paths.IN_CHECKOUT else None
    p.add_argument("--dummy", type=Path, default=dummy, metavar="DIR",
                   help=f"a random-weights baseline (default: {dummy or 'none when installed'})")
    p.add_argument("--no-dummy", action="store_true", help="leave the dummy model out")
    p.add_argument("--cost", choices=offpolicy.COST_KINDS, default=offpolicy.DEFAULT_COST,
                   help="a row's cost from its outcome (default: delay-per-run)")
    p.add_argument("--migrate-penalty", type=float, default=0.0, metavar="C",
                   help="added to the cost of every migration (default 0)")
    p.add_argument("--estimators", default="ips,dr", metavar="NAME,...",
                   help="ips, dr or both (default: ips,dr)")
    p.add_argument("--bootstrap", type=positive_int, default=offpolicy.DEFAULT_BOOTSTRAP,
                   metavar="N", help=f"bootstrap resamples (default {offpolicy.DEFAULT_BOOTSTRAP})")
    p.add_argument("--block-s", type=float, default=offpolicy.DEFAULT_BLOCK_NS / 1e9,
                   metavar="S", help="resample blocks of S seconds of rows, 0 for single rows "
                   "(default 1: outcome windows overlap later decisions)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and cross-fitting seed")
    p.add_argument("--history", type=Path, metavar="FILE",
                   help="a model_export.py --history file: its learning curve goes in --plot")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="write the figure here")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--markdown", type=Path, metavar="FILE",
                   help="write the table as Markdown (the data lines, the policies, the "
                   "differences with the heuristic)")
    return p


def fail(msg: str) -> int:
    print(f"mlsched-evaluate: {msg}", file=sys.stderr)
    return 2


def _estimators(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in offpolicy.ESTIMATORS]
    if not names or bad:
        raise EvalError(f"--estimators: choose from {', '.join(offpolicy.ESTIMATORS)}, "
                        f"not {text!r}")
    return list(dict.fromkeys(names))


def model_decisions(path: Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    """A model's decisions on x as the loader takes them, and which backend ran it."""
    from loader.backends import open_backend
    from loader.model_check import ModelError, check_model_dir

    try:
        info = check_model_dir(path)
        backend, why = open_backend(info, "auto")
        p = backend.predict(x)
    except ModelError as e:
        raise EvalError(str(e)) from None
    if not np.all(np.isfinite(p)):
        raise EvalError(f"{path}: the model gives non-finite outputs on this dataset")
    return p > contract.MIGRATE_THRESHOLD, why


def read_history(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise EvalError(f"--history: cannot read {path} ({e.strerror})") from None
    except ValueError:
        raise EvalError(f"--history: {path} is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("epochs"), list) or not doc["epochs"]:
        raise EvalError(f"--history: {path} is not a model_export.py --history file")
    return doc


def _fmt(e: offpolicy.Estimate) -> str:
    return f"{e.mean:8.4f} [{e.lo:8.4f}, {e.hi:8.4f}]"


def _verdict(e: offpolicy.Estimate) -> str:
    if e.hi < 0:
        return "lower (interval excludes 0)"
    if e.lo > 0:
        return "higher (interval excludes 0)"
    return "no difference shown (interval includes 0)"


def rows_needed(e: offpolicy.Estimate, nr_rows: int) -> float:
    """Rows at which a difference this size would have a 95 % interval clear of 0.

    The standard error shrinks as 1 / sqrt(rows) (whole blocks of them, so the rows' own
    correlation is in it): n (1.96 se / |mean|)^2; inf for a zero difference.
    """
    if e.mean == 0 or not np.isfinite(e.se):
        return float("inf")
    return nr_rows * (1.96 * e.se / abs(e.mean)) ** 2


def _needed(e: offpolicy.Estimate, nr_rows: int) -> str:
    n = rows_needed(e, nr_rows)
    return "never (no difference)" if not np.isfinite(n) else f"~{n:.0f} rows"


def table(reports: list[offpolicy.PolicyReport], estimators: list[str],
          nr_rows: int = 0) -> list[str]:
    w = max(len("policy"), *(len(r.name) for r in reports))
    head = f"{'policy':<{w}} {'migrate':>7} {'matched':>8} {'ESS':>7}"
    for e in estimators:
        head += f"  {e.upper() + ' mean [95 % interval]':<29}"
    lines = [head.rstrip(), "-" * len(head.rstrip())]
    for r in reports:
        line = f"{r.name:<{w}} {100 * r.migrate_share:6.1f}% {r.matched:8d} {r.ess:7.0f}"
        for e in estimators:
            line += f"  {_fmt(r.estimates[e]):<29}"
        lines.append(line.rstrip())
    lines.append("")
    lines.append(f"difference with the {BASELINE} (policy - {BASELINE}, paired bootstrap):")
    for r in reports:
        if r.vs_baseline is None:
            continue
        parts = [f"{e.upper()} {_fmt(r.vs_baseline[e]).strip()} {_verdict(r.vs_baseline[e])}"
                 for e in estimators]
        lines.append(f"  {r.name:<{w}} " + "; ".join(parts))
    if nr_rows:
        lines.append("")
        lines.append(f"signal and noise: the difference, its standard error (block bootstrap) and "
                     f"the rows at which a difference this size would exclude 0 (this run: "
                     f"{nr_rows}):")
        for r in reports:
            if r.vs_baseline is None:
                continue
            parts = [f"{e.upper()} {r.vs_baseline[e].mean:+.4f} se {r.vs_baseline[e].se:.4f}: "
                     f"{_needed(r.vs_baseline[e], nr_rows)}" for e in estimators]
            lines.append(f"  {r.name:<{w}} " + "; ".join(parts))
    return lines


def markdown(head: list[str], reports: list[offpolicy.PolicyReport],
             estimators: list[str], nr_rows: int = 0) -> list[str]:
    """The table of table() as Markdown: the data lines, the policies, the differences."""
    def cell(e: offpolicy.Estimate) -> str:
        return f"{e.mean:.4f} [{e.lo:.4f}, {e.hi:.4f}]"

    lines = [*(f"- {h}" for h in head), ""]
    cols = ["policy", "migrate", "matched", "ESS"] + [f"{e.upper()} mean [95 %]"
                                                      for e in estimators]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(
        [" --- "] + [" ---: "] * (len(cols) - 1)) + "|"]
    for r in reports:
        row = [f"`{r.name}`", f"{100 * r.migrate_share:.1f} %", str(r.matched), f"{r.ess:.0f}"]
        lines.append("| " + " | ".join(row + [cell(r.estimates[e]) for e in estimators]) + " |")
    lines += ["", f"Difference with the {BASELINE} (policy − {BASELINE}, paired bootstrap):", ""]
    cols = ["policy"] + [f"{e.upper()} difference [95 %]" for e in estimators]
    if nr_rows:
        cols += [f"{e.upper()} se, rows to exclude 0" for e in estimators]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(
        [" --- "] + [" ---: "] * (len(cols) - 1)) + "|"]
    for r in reports:
        if r.vs_baseline is None:
            continue
        diffs = [f"{cell(r.vs_baseline[e])} {_verdict(r.vs_baseline[e])}" for e in estimators]
        if nr_rows:
            diffs += [f"{r.vs_baseline[e].se:.4f}, {_needed(r.vs_baseline[e], nr_rows)}"
                      for e in estimators]
        lines.append("| " + " | ".join([f"`{r.name}`", *diffs]) + " |")
    if nr_rows:
        lines += ["", f"Rows to exclude 0: where a difference of this size would get a 95 % "
                  f"interval clear of 0, the standard error shrinking as 1/sqrt(rows) (this "
                  f"run: {nr_rows} rows)."]
    return lines


def plot(path: Path, reports: list[offpolicy.PolicyReport], estimators: list[str],
         history: dict[str, Any] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if history else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    if history:
        ax = axes[0][0]
        epochs = [r["epoch"] for r in history["epochs"]]
        for key, style in (("loss", "-"), ("val_loss", "--")):
            ax.plot(epochs, [r[key] for r in history["epochs"]], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (weighted)" if history.get("objective") == "policy" else "loss")
        if history.get("best_epoch"):
            ax.axvline(history["best_epoch"], color="grey", lw=0.8, ls=":", label="best epoch")
        cost_keys = [k for k in history["epochs"][0] if k.startswith("val_cost_")
                     and not k.endswith("_heuristic")]
        if cost_keys:
            key = cost_keys[0]
            twin = ax.twinx()
            twin.plot(epochs, [r[key] for r in history["epochs"]], color="C2",
                      label=f"{key} (learned)")
            heur = history["epochs"][0].get(f"{key}_heuristic")
            if heur is not None:
                twin.axhline(heur, color="C3", lw=1, label=f"{key} (heuristic)")
            twin.set_ylabel("estimated mean cost, validation rows")
            twin.legend(loc="center right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"learning curve ({history.get('objective', '?')})")
    ax = axes[0][panels - 1]
    names = [r.name for r in reports]
    y = np.arange(len(names))
    for k, e in enumerate(estimators):
        off = (k - (len(estimators) - 1) / 2) * 0.25
        means = np.array([r.estimates[e].mean for r in reports])
        lo = means - np.array([r.estimates[e].lo for r in reports])
        hi = np.array([r.estimates[e].hi for r in reports]) - means
        ax.errorbar(means, y + off, xerr=[lo, hi], fmt="o", capsize=3, label=e.upper())
    base = next((r for r in reports if r.name == BASELINE), None)
    if base is not None:
        ax.axvline(base.estimates[estimators[-1]].mean, color="grey", lw=0.8, ls=":")
    ax.set_yticks(y, [n if len(n) <= 40 else "..." + n[-37:] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("estimated mean cost per candidate (95 % interval)")
    ax.legend(fontsize=8)
    ax.set_title("policies")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise EvalError(f"--plot: cannot write {path} ({e.strerror})") from None
    finally:
        plt.close(fig)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation, print the table; the figures. EvalError / DatasetError."""
    from model_dir.dataset import read_dataset

    estimators = _estimators(args.estimators)
    if args.block_s < 0:
        raise EvalError("--block-s must be >= 0")
    for name, out in (("--json", args.json), ("--markdown", args.markdown)):
        if out is not None and not out.resolve().parent.is_dir():
            raise EvalError(f"{name}: directory {out.resolve().parent} does not exist")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise EvalError(f"--plot: expected a .png file name, not {args.plot}")
    if args.plot is not None and (why := plot_refusal("--plot")):
        raise EvalError(why)  # now, not after the tables
    history = read_history(args.history) if args.history else None
    ds = read_dataset(args.data)
    ds.require_v2("propensities and outcomes, which off-policy evaluation needs")
    x = ds.features()
    n = len(ds)
    policies: dict[str, np.ndarray] = {
        "always-keep": np.zeros(n, bool),
        "always-migrate": np.ones(n, bool),
        BASELINE: ds.heuristic(),
    }
    backends: dict[str, str] = {}
    models = [] if args.no_dummy or args.dummy is None else [
        (f"dummy ({paths.shown(args.dummy)})", args.dummy)]
    models += [(paths.shown(m), m) for m in args.model]
    seen: set[Path] = set()
    for name, path in models:
        if path.resolve() in seen:
            continue  # the dummy given again, or a directory given twice
        seen.add(path.resolve())
        policies[name], backends[name] = model_decisions(path, x)
    cost = offpolicy.row_costs(ds, args.cost, args.migrate_penalty)
    block_ns = int(args.block_s * 1e9)
    reports = offpolicy.evaluate(ds, policies, cost=cost, baseline=BASELINE,
                                 estimators=estimators, nr_boot=args.bootstrap,
                                 block_ns=block_ns, seed=args.seed)
    explore = np.unique(ds.columns["explore_q"]) / contract.EXPLORE_SCALE
    nr_blocks = len(np.unique(offpolicy.block_ids(ds.columns["ts_ns"], block_ns)))
    span_s = (int(ds.columns["ts_ns"].max()) - int(ds.columns["ts_ns"].min())) / 1e9
    penalty = f" + {args.migrate_penalty:g} per migration" if args.migrate_penalty else ""
    head = [
        f"data: {args.data}: {n} candidates over {span_s:.1f} s, logged with explore P "
        f"{', '.join(f'{p:g}' for p in explore)} (propensities "
        f"{ds.propensities().min():.3f}..{ds.propensities().max():.3f})",
        f"cost: {args.cost}{penalty}; observed mean under the logging policy {cost.mean():.4f}",
        f"intervals: {args.bootstrap} bootstrap resamples of "
        + (f"{nr_blocks} blocks of {args.block_s:g} s" if block_ns else f"{n} single rows"),
    ]
    for name, why in backends.items():
        head.append(f"model {name}: {why}")
    lines = [*head, "", *table(reports, estimators, n)]
    print("\n".join(lines))
    result = {
        "data": str(args.data),
        "rows": n,
        "cost": args.cost,
        "migrate_penalty": args.migrate_penalty,
        "bootstrap": args.bootstrap,
        "block_s": args.block_s,
        "observed_mean_cost": float(cost.mean()),
        "policies": [asdict(r) for r in reports],
        "rows_needed": {r.name: {e: rows_needed(d, n) for e, d in r.vs_baseline.items()}
                        for r in reports if r.vs_baseline is not None},
    }
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        except OSError as e:
            raise EvalError(f"--json: cannot write {args.json} ({e.strerror})") from None
    if args.markdown is not None:
        try:
            args.markdown.write_text("\n".join(markdown(head, reports, estimators, n)) + "\n")
        except OSError as e:
            raise EvalError(f"--markdown: cannot write {args.markdown} ({e.strerror})") from None
    if args.plot is not None:
        plot(args.plot, reports, estimators, history,
             f"{args.data.name}: {n} candidates, cost {args.cost}{penalty}")
        print(f"\nwrote {args.plot}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model_dir.dataset import DatasetError

    try:
        evaluate(args)
    except (EvalError, DatasetError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
