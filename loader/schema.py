"""The feature schema: a candidate's key fields, how the kernel packs them, what the model sees.

KEY_FIELDS is the one table (field name, place in the 64-bit decision key, range, model input);
the decision key (mlsched_pack_key), the model input, every key a machine can produce and the
dense grid's layout (mlsched_grid_index) are derived from it. The C side is bpf/mlsched.h and
mlsched_policy.h; tests/host/test_contract.py and test_policy.py check the two agree.
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
    mask: int  # all ones over its width in the key; a larger value is clamped to it
    hi: int  # largest value a candidate carries (lowest: 0)
    feature: str  # model input name
    scale: int  # model input = field / scale


KEY_FIELDS = (
    KeyField("cpu", 32, 0xFFFF_FFFF, MAX_CPUS - 1, "cpu", 1),
    KeyField("cpu_idle", 24, KEY_FIELD_MAX, KEY_FIELD_MAX, "cpu_idle", 1),
    KeyField("cpu_not_idle", 16, KEY_FIELD_MAX, KEY_FIELD_MAX, "cpu_not_idle", 1),
    KeyField("src_load_q", 8, KEY_FIELD_MAX, LOAD_SCALE, "src_dom_load", LOAD_SCALE),
    KeyField("dst_load_q", 0, KEY_FIELD_MAX, LOAD_SCALE, "dst_dom_load", LOAD_SCALE),
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
    values = [np.asarray(v) for v in fields]
    keys = np.zeros(np.broadcast(*values).shape, np.uint64)
    for f, v in zip(KEY_FIELDS, values, strict=True):
        keys |= np.minimum(v.astype(np.uint64), np.uint64(f.mask)) << np.uint64(f.shift)
    return keys


def pack_columns(columns: Mapping[str, ArrayLike]) -> np.ndarray:
    """pack_keys of the key fields of a table (a dataset's columns, say), found by name."""
    return pack_keys(*(columns[f.name] for f in KEY_FIELDS))


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
    x[:, : len(KEY_FIELDS)] = np.column_stack([fields[f.name] / f.scale for f in KEY_FIELDS])
    return x


def fields_of_features(x: np.ndarray) -> dict[str, np.ndarray]:
    """The key fields (int64) back from model inputs [n, 10], for rules written on either."""
    return {f.name: np.rint(x[:, i] * f.scale).astype(np.int64) for i, f in enumerate(KEY_FIELDS)}


# --- the dense decision grid: every key of a machine, one index each (mlsched_grid_index) ------


def grid_shape(nr_cpus: int, dom_cpus: int) -> tuple[int, ...]:
    """How many values each key field takes over a machine's grid, in KEY_FIELDS order: the
    grid is their mixed radix."""
    count = min(dom_cpus, KEY_FIELD_MAX) + 1
    return nr_cpus, count, count, LOAD_SCALE + 1, LOAD_SCALE + 1


def grid_size(nr_cpus: int, dom_cpus: int) -> int:
    """Keys in the dense decision grid (mlsched_grid_size)."""
    return math.prod(grid_shape(nr_cpus, dom_cpus))


def grid_indices(keys: ArrayLike, nr_cpus: int, dom_cpus: int) -> np.ndarray:
    """Each packed key's place in the grid, or -1 outside it (mlsched_grid_index), vectorised."""
    idx, inside = np.int64(0), np.bool_(True)
    for v, count in zip(key_fields(keys).values(), grid_shape(nr_cpus, dom_cpus), strict=True):
        v = v.astype(np.int64)
        idx, inside = idx * count + v, inside & (v < count)
    return np.where(inside, idx, -1)


def grid_keys(nr_cpus: int, dom_cpus: int, idx: ArrayLike | None = None) -> np.ndarray:
    """The packed keys at grid indices idx; by default every key in index order (all the keys
    the machine can produce, on the wakeup path and the steal path alike)."""
    shape = grid_shape(nr_cpus, dom_cpus)
    idx = np.arange(math.prod(shape)) if idx is None else np.asarray(idx, dtype=np.int64)
    return pack_keys(*np.unravel_index(idx, shape))


def feature_grid(nr_cpus: int, max_dom_cpus: int) -> np.ndarray:
    """The grid's wakeup candidates: its keys whose source domain is the busier one
    (src_load_q > dst_load_q), in grid order."""
    keys = grid_keys(nr_cpus, max_dom_cpus)
    fields = key_fields(keys)
    return keys[fields["src_load_q"] > fields["dst_load_q"]]
