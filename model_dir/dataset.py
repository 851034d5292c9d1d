"""Read and write mlsched training data: one migration candidate a row.

The formats are the ones mlsched-collect writes and model_dir/model_export.py --data reads;
model_dir/README.md defines them. In short: a CSV file (optionally .csv.gz), UTF-8, `#`
comment lines allowed, then exactly one of these headers and one candidate per row, every
field a decimal integer.

v1:  ts_ns,pid,cpu,cpu_idle,cpu_not_idle,src_dom,dst_dom,src_load_q,dst_load_q,action,source,label
v2:  the same twelve columns, then path,explore_q,fallback,propensity_q,window_ns,delay_ns,run_ns

The first eleven columns are struct mlsched_candidate (bpf/mlsched.h) without its key, in its
order: `action` is what the scheduler did (0 keep, 1 migrate), `source` who chose it (0 the
model, 1 the fallback, 2 a coin flip in collection mode); `label` is the better action in
hindsight (1 migrating was, 0 keeping was). v2 adds where the candidate was built (`path`: 0
a wakeup, 1 a steal by an idle CPU of the destination) and what counterfactual learning needs:
the logging policy (`explore_q`, P in 1/65536 units, and `fallback`, the policy used when the coin
was not flipped), the probability with which it took the row's action (`propensity_q`, in
1/131072 units: exact), and the outcome (the window's length, the task's run-queue delay and
run time in it). The reader recomputes every propensity from the row (model_dir/fallback.py) and
refuses a file whose propensities or fallback actions disagree with the kernel's policy.

The model input is computed as the loader computes it: the features are packed into the
kernel's decision key and unpacked by schema.unpack_keys(), so loads reach the model as
load_q / LOAD_SCALE. read_dataset() refuses a malformed file with a one-line DatasetError
naming the line.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from loader import contract, schema
from model_dir import fallback

FORMAT_VERSION = 2  # what write_dataset() writes when it has the columns
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

# (name, numpy dtype, lowest, highest): the columns in file order.
COLUMNS_V1: tuple[tuple[str, type, int, int], ...] = (
    ("ts_ns", np.uint64, 0, U64_MAX),
    ("pid", np.uint32, 0, U32_MAX),
    *((f.name, np.uint32, 0, f.hi) for f in schema.KEY_FIELDS[:3]),
    ("src_dom", np.uint32, 0, contract.MAX_DOMS - 1),
    ("dst_dom", np.uint32, 0, contract.MAX_DOMS - 1),
    *((f.name, np.uint32, 0, f.hi) for f in schema.KEY_FIELDS[3:]),
    ("action", np.uint8, 0, 1),
    ("source", np.uint8, 0, len(contract.Source) - 1),
    ("label", np.uint8, 0, 1),
)
COLUMNS_V2: tuple[tuple[str, type, int, int], ...] = (
    *COLUMNS_V1,
    ("path", np.uint8, 0, len(contract.Path) - 1),
    ("explore_q", np.uint32, 0, contract.EXPLORE_SCALE),
    ("fallback", np.uint8, 0, len(contract.Fallback) - 1),
    ("propensity_q", np.uint32, 1, fallback.PROPENSITY_SCALE),
    ("window_ns", np.uint64, 1, U64_MAX),
    ("delay_ns", np.uint64, 0, U64_MAX),
    ("run_ns", np.uint64, 0, U64_MAX),
)
COLUMNS_BY_VERSION = {1: COLUMNS_V1, 2: COLUMNS_V2}
# v1 names, kept for the callers that predate v2.
COLUMNS = COLUMNS_V1
COLUMN_NAMES = tuple(c[0] for c in COLUMNS_V1)
COLUMN_NAMES_V2 = tuple(c[0] for c in COLUMNS_V2)
HEADER = ",".join(COLUMN_NAMES)
HEADER_V2 = ",".join(COLUMN_NAMES_V2)
HEADERS = {HEADER: 1, HEADER_V2: 2}
_REF = "dataset format: model_dir/README.md"


class DatasetError(ValueError):
    """A dataset file that does not follow the format; str() is one line naming the place."""


@dataclass(frozen=True)
class Dataset:
    """The columns of a dataset, each a numpy array of the column's dtype."""

    columns: dict[str, np.ndarray]
    source: str = ""

    def __len__(self) -> int:
        return len(self.columns["label"])

    @property
    def version(self) -> int:
        """2 when the rows carry propensities and outcomes, else 1."""
        return 2 if all(name in self.columns for name in COLUMN_NAMES_V2) else 1

    @property
    def labels(self) -> np.ndarray:
        return self.columns["label"]

    @property
    def actions(self) -> np.ndarray:
        return self.columns["action"]

    @property
    def sources(self) -> np.ndarray:
        return self.columns["source"]

    def propensities(self) -> np.ndarray:
        """float64 [n]: the probability with which the logging policy took each row's action."""
        self.require_v2("propensities")
        return self.columns["propensity_q"].astype(np.float64) / fallback.PROPENSITY_SCALE

    def require_v2(self, what: str) -> None:
        if self.version < 2:
            raise DatasetError(
                f"{self.source or 'dataset'}: format v1 has no {what}; collect it again with "
                f"mlsched-collect, which writes v2 ({_REF})"
            )

    def keys(self) -> np.ndarray:
        """The packed decision key of every row, as select_cpu packs it."""
        return schema.pack_columns(self.columns)

    def features(self) -> np.ndarray:
        """Model input float32 [n, 10]: exactly what the loader feeds for these candidates."""
        return schema.unpack_keys(self.keys())

    def heuristic(self) -> np.ndarray:
        """What the kernel's heuristic fallback decides for every row: bool [n]."""
        c = self.columns
        return fallback.heuristic_migrate(c["cpu_idle"], c["src_load_q"], c["dst_load_q"])

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset({k: v[index] for k, v in self.columns.items()}, self.source)


def logging_columns(columns: Mapping[str, np.ndarray], explore_q: int | np.ndarray,
                    policy: contract.Fallback | int | np.ndarray) -> dict[str, np.ndarray]:
    """The v2 logging-policy columns (explore_q, fallback, propensity_q) for rows of a run.

    columns holds at least cpu_idle, src_load_q, dst_load_q and action; explore_q and policy
    are what the collector configured (the explore and fallback_policy settings).
    """
    n = len(columns["action"])
    explore = np.broadcast_to(np.asarray(explore_q, dtype=np.int64), (n,))
    pol = np.broadcast_to(np.asarray(policy, dtype=np.int64), (n,))
    chosen = fallback.fallback_migrate(pol, columns["cpu_idle"], columns["src_load_q"],
                                       columns["dst_load_q"])
    return {
        "explore_q": explore.copy(),
        "fallback": pol.copy(),
        "propensity_q": fallback.propensity_q(columns["action"], chosen, explore),
    }


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def _lines(f: IO[str]) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(f, 1):
        line = line.rstrip("\r\n")
        if line and not line.startswith("#"):
            yield lineno, line


def _check_logging(path: Path, linenos: list[int], cols: dict[str, np.ndarray]) -> None:
    """v2 rows' propensities and fallback actions must be what the kernel's policy gives."""
    source, action, explore = cols["source"], cols["action"], cols["explore_q"].astype(np.int64)
    chosen = fallback.fallback_migrate(cols["fallback"], cols["cpu_idle"], cols["src_load_q"],
                                       cols["dst_load_q"]).astype(np.int64)
    want = fallback.propensity_q(action, chosen, explore)
    known = source != contract.Source.MODEL  # a model's choice cannot be recomputed from a row
    checks = (
        ((source == contract.Source.FALLBACK) & (action != chosen),
         lambda i: f"source is the fallback, but its action {action[i]} is not what fallback "
         f"{contract.Fallback(int(cols['fallback'][i])).name.lower()} decides for these "
         f"features ({chosen[i]})"),
        ((source == contract.Source.EXPLORE) & (explore == 0),
         lambda i: "a coin-flip row, but explore_q is 0"),
        ((source == contract.Source.FALLBACK) & (explore == contract.EXPLORE_SCALE),
         lambda i: f"a fallback row, but explore_q is {contract.EXPLORE_SCALE} (always a coin)"),
        (known & (cols["propensity_q"] != want),
         lambda i: f"propensity_q is {cols['propensity_q'][i]}, but the logging policy "
         f"(explore_q {explore[i]}, fallback {cols['fallback'][i]}, action {action[i]}) "
         f"gives {want[i]}"),
    )
    bad = [(int(np.argmax(rows)), why) for rows, why in checks if rows.any()]
    if bad:
        i, why = min(bad, key=lambda b: b[0])
        raise DatasetError(f"{path}:{linenos[i]}: {why(i)} ({_REF})")


def read_dataset(path: str | Path) -> Dataset:
    """Read and validate a dataset file (v1 or v2); DatasetError (one line) when malformed.

    numpy parses and checks every row at once; only a file it cannot parse is read again line
    by line, to name the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found at {path}")
    try:
        with _open_text(path, "r") as f:
            numbered = list(_lines(f))
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 text file ({_REF})") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot read it ({e})") from None
    if not numbered:
        raise DatasetError(f"{path}: empty file, expected the header {HEADER_V2} ({_REF})")
    (lineno, header), rows = numbered[0], numbered[1:]
    version = HEADERS.get(header.replace(" ", ""))
    if version is None:
        raise DatasetError(
            f"{path}:{lineno}: header is {header[:120]!r}, expected {HEADER_V2!r} (v2) "
            f"or {HEADER!r} (v1) ({_REF})"
        )
    columns = COLUMNS_BY_VERSION[version]
    if not rows:
        raise DatasetError(f"{path}: a header but no rows ({_REF})")
    try:
        table = np.loadtxt([line for _, line in rows], delimiter=",", dtype=np.uint64, ndmin=2)
    except ValueError:
        table = None
    if table is None or table.shape[1] != len(columns):
        raise _unparsable(path, rows, columns, version)
    col = {name: table[:, i] for i, (name, _, _, _) in enumerate(columns)}
    # What the kernel guarantees for every candidate it builds on a wakeup (a steal, v2's
    # path 1, may find the source no busier than the destination).
    wakeup = col["path"] == contract.Path.WAKEUP if version == 2 else True
    # Each check: the rows it fails and the message for one of them, checked in this order on
    # the first row that fails any.
    checks = [
        ((col[name] < lo) | (col[name] > hi), lambda r, name=name, lo=lo, hi=hi:
         f"{name} is {col[name][r]}, expected {lo}..{hi}")
        for name, _, lo, hi in columns
    ] + [
        ((col["src_load_q"] <= col["dst_load_q"]) & wakeup, lambda r: f"src_load_q "
         f"{col['src_load_q'][r]} <= dst_load_q {col['dst_load_q'][r]}; a candidate's "
         "destination is less loaded than its source"),
        (col["src_dom"] == col["dst_dom"], lambda r: f"src_dom and dst_dom are both "
         f"{col['src_dom'][r]}"),
    ]
    bad = np.logical_or.reduce([mask for mask, _ in checks])
    if bad.any():
        r = int(np.argmax(bad))
        what = next(say for mask, say in checks if mask[r])
        raise DatasetError(f"{path}:{rows[r][0]}: {what(r)} ({_REF})")
    cols = {name: col[name].astype(dtype) for name, dtype, _, _ in columns}
    if version == 2:
        _check_logging(path, [n for n, _ in rows], cols)
    return Dataset(cols, str(path))


def _unparsable(path: Path, rows: list[tuple[int, str]], columns: tuple[tuple[str, type, int,
                int], ...], version: int) -> DatasetError:
    """The error for the first row numpy could not parse as len(columns) unsigned integers."""
    for lineno, line in rows:
        fields = line.split(",")
        if len(fields) != len(columns):
            return DatasetError(f"{path}:{lineno}: {len(fields)} fields, expected "
                                f"{len(columns)} (v{version}) ({_REF})")
        for (name, _, lo, hi), v in zip(columns, fields, strict=True):
            try:
                value = int(v)
            except ValueError:
                return DatasetError(
                    f"{path}:{lineno}: {name} is {v[:40]!r}, not an integer ({_REF})")
            if not lo <= value <= hi:
                return DatasetError(
                    f"{path}:{lineno}: {name} is {value}, expected {lo}..{hi} ({_REF})")
    return DatasetError(f"{path}: unreadable rows ({_REF})")


def write_dataset(
    path: str | Path,
    columns: Mapping[str, np.ndarray],
    comments: tuple[str, ...] = (),
    version: int | None = None,
) -> None:
    """Write rows in the dataset format: v2 when columns has v2's columns, else v1.

    version forces one (ValueError when a column it needs is missing).
    """
    path = Path(path)
    if version is None:
        version = 2 if all(name in columns for name in COLUMN_NAMES_V2) else 1
    names = [c[0] for c in COLUMNS_BY_VERSION[version]]
    missing = [name for name in names if name not in columns]
    if missing:
        raise ValueError(f"format v{version}: missing columns: {', '.join(missing)}")
    table = np.stack([np.asarray(columns[name], dtype=np.uint64) for name in names], 1)
    with _open_text(path, "w") as f:
        for comment in comments:
            f.write(f"# {comment}\n")
        f.write(",".join(names) + "\n")
        np.savetxt(f, table, fmt="%d", delimiter=",")
