"""Read and write mlsched training data: one migration candidate a row, with its label.

The format (v1) is the one mlsched-collect writes and model_dir/model_export.py --data reads;
model_dir/README.md defines it. In short: a CSV file (optionally .csv.gz), UTF-8, `#` comment
lines allowed, then exactly this header and one candidate per row, every field a decimal
integer:

    ts_ns,pid,cpu,cpu_idle,cpu_not_idle,src_dom,dst_dom,src_load_q,dst_load_q,action,source,label

The first eleven columns are struct mlsched_candidate (bpf/mlsched.h) without its key, in its
order: `action` is what the scheduler did (0 keep, 1 migrate), `source` who chose it (0 the
model, 1 the fallback, 2 a coin flip in collection mode); `label` is the better action in
hindsight (1 migrating was, 0 keeping was). The model input is computed as the loader
computes it: the features are packed into the kernel's decision key and unpacked by
contract.unpack_keys(), so loads reach the model as load_q / LOAD_SCALE.

read_dataset() refuses a malformed file with a one-line DatasetError naming the line.
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

FORMAT_VERSION = 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

# (name, numpy dtype, lowest, highest): the columns in file order.
COLUMNS: tuple[tuple[str, type, int, int], ...] = (
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
COLUMN_NAMES = tuple(c[0] for c in COLUMNS)
HEADER = ",".join(COLUMN_NAMES)
_REF = f"dataset format v{FORMAT_VERSION}: model_dir/README.md"


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
    def labels(self) -> np.ndarray:
        return self.columns["label"]

    @property
    def actions(self) -> np.ndarray:
        return self.columns["action"]

    @property
    def sources(self) -> np.ndarray:
        return self.columns["source"]

    def keys(self) -> np.ndarray:
        """The packed decision key of every row, as select_cpu packs it."""
        return schema.pack_keys(self.columns)

    def features(self) -> np.ndarray:
        """Model input float32 [n, 10]: exactly what the loader feeds for these candidates."""
        return contract.unpack_keys(self.keys())

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset({k: v[index] for k, v in self.columns.items()}, self.source)


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def _lines(f: IO[str]) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(f, 1):
        line = line.rstrip("\r\n")
        if line and not line.startswith("#"):
            yield lineno, line


def read_dataset(path: str | Path) -> Dataset:
    """Read and validate a dataset file; DatasetError (one line) when it is malformed.

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
        raise DatasetError(f"{path}: empty file, expected the header {HEADER} ({_REF})")
    (lineno, header), rows = numbered[0], numbered[1:]
    if header.replace(" ", "") != HEADER:
        raise DatasetError(
            f"{path}:{lineno}: header is {header[:120]!r}, expected {HEADER!r} ({_REF})"
        )
    if not rows:
        raise DatasetError(f"{path}: a header but no rows ({_REF})")
    try:
        table = np.loadtxt([line for _, line in rows], delimiter=",", dtype=np.uint64, ndmin=2)
    except ValueError:
        table = None
    if table is None or table.shape[1] != len(COLUMNS):
        raise _unparsable(path, rows)
    col = {name: table[:, i] for i, (name, _, _, _) in enumerate(COLUMNS)}
    # Each check: the rows it fails and the message for one of them. Checked in this order on
    # the first row that fails any; the last two are what the kernel guarantees a candidate.
    checks = [
        (col[name] > hi, lambda r, name=name, lo=lo, hi=hi: f"{name} is {col[name][r]}, "
         f"expected {lo}..{hi}")
        for name, _, lo, hi in COLUMNS
    ] + [
        (col["src_load_q"] <= col["dst_load_q"], lambda r: f"src_load_q {col['src_load_q'][r]}"
         f" <= dst_load_q {col['dst_load_q'][r]}; a candidate's destination is less loaded "
         "than its source"),
        (col["src_dom"] == col["dst_dom"], lambda r: f"src_dom and dst_dom are both "
         f"{col['src_dom'][r]}"),
    ]
    bad = np.logical_or.reduce([mask for mask, _ in checks])
    if bad.any():
        r = int(np.argmax(bad))
        what = next(say for mask, say in checks if mask[r])
        raise DatasetError(f"{path}:{rows[r][0]}: {what(r)} ({_REF})")
    columns = {name: col[name].astype(dtype) for name, dtype, _, _ in COLUMNS}
    return Dataset(columns, str(path))


def _unparsable(path: Path, rows: list[tuple[int, str]]) -> DatasetError:
    """The error for the first row numpy could not parse as len(COLUMNS) unsigned integers."""
    for lineno, line in rows:
        fields = line.split(",")
        if len(fields) != len(COLUMNS):
            return DatasetError(
                f"{path}:{lineno}: {len(fields)} fields, expected {len(COLUMNS)} ({_REF})"
            )
        for (name, _, lo, hi), v in zip(COLUMNS, fields, strict=True):
            try:
                value = int(v)
            except ValueError:
                return DatasetError(
                    f"{path}:{lineno}: {name} is {v[:40]!r}, not an integer ({_REF})"
                )
            if not lo <= value <= hi:
                return DatasetError(
                    f"{path}:{lineno}: {name} is {value}, expected {lo}..{hi} ({_REF})"
                )
    return DatasetError(f"{path}: unreadable rows ({_REF})")


def write_dataset(
    path: str | Path, columns: Mapping[str, np.ndarray], comments: tuple[str, ...] = ()
) -> None:
    """Write rows in the dataset format (every column of COLUMNS, same length)."""
    path = Path(path)
    missing = [name for name in COLUMN_NAMES if name not in columns]
    if missing:
        raise ValueError(f"missing columns: {', '.join(missing)}")
    table = np.stack([np.asarray(columns[name], dtype=np.uint64) for name in COLUMN_NAMES], 1)
    with _open_text(path, "w") as f:
        for comment in comments:
            f.write(f"# {comment}\n")
        f.write(HEADER + "\n")
        np.savetxt(f, table, fmt="%d", delimiter=",")
