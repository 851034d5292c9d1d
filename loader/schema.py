"""The feature schema: a candidate's key fields, how the kernel packs them, what the model sees.

KEY_FIELDS is the one table: each field's name (struct mlsched_candidate, the dataset column),
its place in the 64-bit decision key, its range, and the model input it becomes (field / scale).
Everything else is derived from it: the decision key (pack_keys, as mlsched_pack_key in
bpf/mlsched_policy.h), the model input (unpack_keys), the inverse for rules written on model
inputs (fields_of_features), every key a machine can produce (feature_grid) and the dense
decision grid's layout (grid_*: mlsched_grid_index). load_q is the kernel's load quantization
(mlsched_load_q). The C side is bpf/mlsched.h and mlsched_policy.h;
tests/host/test_contract.py and test_policy.py check the two against each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

MAX_CPUS = 512
LOAD_SCALE = 16  # domain loads are integers 0..LOAD_SCALE; the model sees load / LOAD_SCALE
LOAD_FULL_PER_CPU = 4  # runnable tasks per CPU that make a domain's load LOAD_SCALE
KEY_FIELD_MAX = 255  # the kernel clamps the 8-bit key fields at this


@dataclass(frozen=True)
class KeyField:
    name: str  # field of struct mlsched_candidate and column of the dataset
    shift: int  # bit position in the decision key
    bits: int  # width in the key; a larger value is clamped to all ones
    hi: int  # largest value a candidate carries (lowest: 0)
    feature: str  # model input name
    scale: int  # model input = field / scale

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


KEY_FIELDS = (
    KeyField("cpu", 32, 32, MAX_CPUS - 1, "cpu", 1),
    KeyField("cpu_idle", 24, 8, KEY_FIELD_MAX, "cpu_idle", 1),
    KeyField("cpu_not_idle", 16, 8, KEY_FIELD_MAX, "cpu_not_idle", 1),
    KeyField("src_load_q", 8, 8, LOAD_SCALE, "src_dom_load", LOAD_SCALE),
    KeyField("dst_load_q", 0, 8, LOAD_SCALE, "dst_dom_load", LOAD_SCALE),
)
KEY_FIELD_NAMES = tuple(f.name for f in KEY_FIELDS)
KEY_CPU_SHIFT, KEY_IDLE_SHIFT, KEY_NOT_IDLE_SHIFT, KEY_SRC_SHIFT, KEY_DST_SHIFT = (
    f.shift for f in KEY_FIELDS
)
# Model input: float32 [?, 10], the key fields' features in order, then five reserved zeros.
FEATURE_NAMES = (*(f.feature for f in KEY_FIELDS), *(f"reserved{i}" for i in range(5)))
NR_FEATURES = len(FEATURE_NAMES)


def load_q(runnable: ArrayLike, nr_cpus: ArrayLike) -> np.ndarray:
    """A domain's load as the kernel quantizes it (mlsched_load_q in bpf/mlsched_policy.h):
    runnable tasks (busy CPUs plus queued) per CPU, LOAD_FULL_PER_CPU of them = LOAD_SCALE."""
    runnable, nr_cpus = np.asarray(runnable, np.int64), np.asarray(nr_cpus, np.int64)
    load = runnable * LOAD_SCALE // np.maximum(LOAD_FULL_PER_CPU * nr_cpus, 1)
    return np.where(nr_cpus > 0, np.minimum(load, LOAD_SCALE), LOAD_SCALE)


def pack_keys(*fields: ArrayLike) -> np.ndarray:
    """uint64 decision keys from the key fields in KEY_FIELDS order (arrays or ints), as
    select_cpu packs them (mlsched_pack_key): 8-bit fields clamped."""
    if len(fields) != len(KEY_FIELDS):
        raise TypeError(f"pack_keys takes the {len(KEY_FIELDS)} key fields, {KEY_FIELD_NAMES}")
    values = [np.asarray(v) for v in fields]
    keys = np.zeros(np.broadcast(*values).shape, np.uint64)
    for f, v in zip(KEY_FIELDS, values, strict=True):
        keys |= np.minimum(v.astype(np.uint64), np.uint64(f.mask)) << np.uint64(f.shift)
    return keys


def pack_columns(columns: Mapping[str, ArrayLike]) -> np.ndarray:
    """pack_keys of the key fields of a table (a dataset's columns, say), found by name."""
    return pack_keys(*(columns[name] for name in KEY_FIELD_NAMES))


def pack_key(cpu: int, cpu_idle: int, cpu_not_idle: int, src_load_q: int, dst_load_q: int) -> int:
    """One candidate's decision key."""
    return int(pack_keys(cpu, cpu_idle, cpu_not_idle, src_load_q, dst_load_q))


def key_fields(keys: ArrayLike) -> dict[str, np.ndarray]:
    """The key fields (uint64 arrays) of packed keys."""
    keys = np.asarray(keys, dtype=np.uint64)
    return {f.name: (keys >> np.uint64(f.shift)) & np.uint64(f.mask) for f in KEY_FIELDS}


def unpack_keys(keys: ArrayLike) -> np.ndarray:
    """Model input float32 [n, 10] for packed keys: exactly what the kernel quantized."""
    fields = key_fields(np.atleast_1d(np.asarray(keys, dtype=np.uint64)))
    x = np.zeros((len(fields["cpu"]), NR_FEATURES), dtype=np.float32)
    for i, f in enumerate(KEY_FIELDS):
        x[:, i] = fields[f.name].astype(np.float32)
        if f.scale != 1:
            x[:, i] /= f.scale
    return x


def fields_of_features(x: np.ndarray) -> dict[str, np.ndarray]:
    """The key fields (int64) back from model inputs [n, 10], for rules written on either."""
    return {f.name: np.rint(x[:, i] * f.scale).astype(np.int64) for i, f in enumerate(KEY_FIELDS)}


def feature_grid(nr_cpus: int, max_dom_cpus: int) -> np.ndarray:
    """Every packed key a machine with these CPUs and domain size can produce.

    Candidates have src_load_q > dst_load_q (the source domain is the busier one).
    """
    his = {"cpu": nr_cpus - 1, "cpu_idle": max_dom_cpus, "cpu_not_idle": max_dom_cpus}
    axes = [np.arange(his.get(f.name, f.hi) + 1, dtype=np.uint64) for f in KEY_FIELDS]
    grid = dict(zip(KEY_FIELD_NAMES, np.meshgrid(*axes, indexing="ij"), strict=True))
    keep = grid["src_load_q"] > grid["dst_load_q"]
    return pack_keys(*(grid[name][keep] for name in KEY_FIELD_NAMES))


# --- the dense decision grid: every key of a machine, one index each -------------------------


def grid_shape(nr_cpus: int, dom_cpus: int) -> tuple[int, ...]:
    """How many values each key field takes over a machine's grid, in KEY_FIELDS order: the
    mixed radix of mlsched_grid_index (bpf/mlsched_policy.h)."""
    count = min(dom_cpus, KEY_FIELD_MAX) + 1
    return nr_cpus, count, count, LOAD_SCALE + 1, LOAD_SCALE + 1


def grid_size(nr_cpus: int, dom_cpus: int) -> int:
    """Keys in the dense decision grid (mlsched_grid_size)."""
    return math.prod(grid_shape(nr_cpus, dom_cpus))


def grid_index(cpu: ArrayLike, cpu_idle: ArrayLike, cpu_not_idle: ArrayLike,
               src_load_q: ArrayLike, dst_load_q: ArrayLike, nr_cpus: int,
               dom_cpus: int) -> np.ndarray:
    """Each candidate's place in the grid, or -1 outside it (mlsched_grid_index), vectorised."""
    idx, inside = np.int64(0), np.bool_(True)
    for v, count in zip((cpu, cpu_idle, cpu_not_idle, src_load_q, dst_load_q),
                        grid_shape(nr_cpus, dom_cpus), strict=True):
        v = np.asarray(v, dtype=np.int64)
        idx, inside = idx * count + v, inside & (v >= 0) & (v < count)
    return np.where(inside, idx, -1)


def grid_indices(keys: ArrayLike, nr_cpus: int, dom_cpus: int) -> np.ndarray:
    """grid_index of packed keys."""
    return grid_index(*key_fields(keys).values(), nr_cpus, dom_cpus)


def grid_keys_at(idx: ArrayLike, nr_cpus: int, dom_cpus: int) -> np.ndarray:
    """The packed keys at grid indices idx."""
    fields = np.unravel_index(np.asarray(idx, dtype=np.int64), grid_shape(nr_cpus, dom_cpus))
    return pack_keys(*fields)


def grid_keys(nr_cpus: int, dom_cpus: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Packed keys of grid indices [start, stop), in index order (every key the machine can
    produce, on the wakeup path and the steal path alike)."""
    stop = grid_size(nr_cpus, dom_cpus) if stop is None else stop
    return grid_keys_at(np.arange(start, stop), nr_cpus, dom_cpus)
