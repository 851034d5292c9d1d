"""The BPF/Python contract, mirrored from bpf/mlsched.h.

tests/host/test_contract.py parses bpf/mlsched.h and the compiled object's BTF and fails when
this module and the C side drift. Change both together.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

import numpy as np

# The feature schema (key fields, shifts, scaling, model input), re-exported: one definition.
from loader.schema import (  # noqa: F401
    FEATURE_NAMES,
    KEY_CPU_SHIFT,
    KEY_DST_SHIFT,
    KEY_FIELD_MAX,
    KEY_IDLE_SHIFT,
    KEY_NOT_IDLE_SHIFT,
    KEY_SRC_SHIFT,
    LOAD_FULL_PER_CPU,
    LOAD_SCALE,
    MAX_CPUS,
    NR_FEATURES,
    feature_grid,
    grid_index,
    grid_keys,
    grid_size,
    pack_key,
    pack_keys,
    unpack_keys,
)

MAX_DOMS = 64
RINGBUF_DEFAULT_BYTES = 1 << 20

MODEL_INPUT_KEY = "features"
MIGRATE_THRESHOLD = 0.5  # sigmoid output > this means migrate

# Map names in bpf/mlsched.bpf.c.
MAP_CANDIDATES = "candidates"  # ring buffer of struct mlsched_candidate
MAP_DECISIONS = "decisions"  # u64 key -> u32 enum Decision
MAP_DECISION_GRID = "decision_grid"  # mmapable u64[] holding one GridCode byte per grid key
MAP_MLP_WEIGHTS = "mlp_weights"  # struct mlsched_mlp[2]: the in-kernel network, two slots
MAP_PENDING = "pending"  # u64 key -> u64 ns submitted (dedup of ring pushes)
MAP_COUNTERS = "counters"  # per-CPU u64[Counter]
MAP_LOADER_STATS = "loader_stats"  # u64[LoaderStat]
MAP_DOM_STATS = "dom_stats"  # struct mlsched_dom_stat[MAX_DOMS]
MAP_LATENCY_HIST = "latency_hist"  # u64[Hist * HIST_BUCKETS]
STRUCT_OPS_MAP = "mlsched_ops"
SCHED_NAME = "mlsched"

# Maps pinned for mlsched-stats, under PIN_DIR.
PIN_DIR = "/sys/fs/bpf/mlsched"
PINNED_MAPS = (
    MAP_COUNTERS,
    MAP_LOADER_STATS,
    MAP_DOM_STATS,
    MAP_LATENCY_HIST,
    MAP_DECISIONS,
    MAP_DECISION_GRID,
)


class Decision(IntEnum):
    KEEP = 0
    MIGRATE = 1


class GridCode(IntEnum):
    """A decision grid byte."""

    UNDECIDED = 0
    KEEP = 1
    MIGRATE = 2


GRID_MAX_KEYS = 1 << 26
GEN_SHIFT = 8  # decisions hash value: (generation << GEN_SHIFT) | Decision


class Source(IntEnum):
    """Who chose a candidate's action."""

    MODEL = 0
    FALLBACK = 1
    EXPLORE = 2


EXPLORE_SCALE = 65536  # Config.EXPLORE, Candidate.prob_q16: probabilities in 1/EXPLORE_SCALE
VTIME_MAX_LAG_SLICES = 4


class Path(IntEnum):
    """Where a candidate was built."""

    WAKEUP = 0
    STEAL = 1


class Fallback(IntEnum):
    KEEP = 0
    MIGRATE = 1
    HEURISTIC = 2


class Counter(IntEnum):
    SELECT = 0
    LOCAL = 1
    NO_CANDIDATE = 2
    CANDIDATES = 3
    HITS = 4
    MISSES = 5
    MIGRATE = 6
    KEEP = 7
    FALLBACK_MIGRATE = 8
    FALLBACK_KEEP = 9
    SUBMITTED = 10
    RB_DROPS = 11
    STEAL_CANDIDATES = 12
    MIGR_MODEL = 13
    MIGR_FALLBACK = 14
    MIGR_FORCED = 15
    MIGR_DOMAIN = 16
    RAN_CROSS = 17
    RAN_DOMAIN = 18
    PREEMPTS = 19
    RESTRICTED = 20
    EXPLORED = 21
    LOADER_WAKEUPS = 22
    KINFER = 23
    KINFER_NS = 24
    RB_WAKEUPS = 25
    RAN_CROSS_DECIDED = 26


NR_COUNTERS = len(Counter)


class LoaderStat(IntEnum):
    BATCHES = 0
    RECORDS = 1
    DECISIONS = 2
    MODEL_ERRORS = 3
    BATCH_NS_SUM = 4
    BATCH_NS_MAX = 5
    MODEL_READY = 6
    BACKEND = 7
    START_NS = 8
    LOADER_PID = 9
    EV_LAT_NS_SUM = 10
    TABLE_ENTRIES = 11
    RESTARTS = 12
    RELOADS = 13
    RELOAD_FAILURES = 14
    MODEL_DIGEST = 15
    GRID_KEYS = 16
    GRID_DECIDED = 17


NR_LOADER_STATS = len(LoaderStat)


HIST_BUCKETS = 40


class Hist(IntEnum):
    """Rows of the latency_hist map; bucket b counts latencies in [2^b, 2^(b+1)) ns."""

    BATCH = 0
    EVENT = 1


NR_HISTS = len(Hist)


def hist_bucket(ns: np.ndarray) -> np.ndarray:
    """Histogram bucket of each latency in ns (log2, clamped to the last bucket)."""
    ns = np.maximum(np.asarray(ns, dtype=np.int64), 1)
    return np.minimum(np.floor(np.log2(ns)).astype(np.int64), HIST_BUCKETS - 1)


class Backend(IntEnum):
    NONE = 0
    TF = 1
    NUMPY = 2
    KERNEL = 3


# The settings the loader writes before load: const volatile in bpf/mlsched.bpf.c (.rodata).
SETTINGS = (
    "nr_cpus", "nr_doms", "cpu_dom", "fallback_policy", "slice_ns", "slice_min_ns", "starve_ns",
    "ring_wake_bytes", "ring_max_wait_ns", "resubmit_ns", "collect", "explore", "grid_cpus",
    "grid_dom_cpus", "kernel_inference", "loader_tid",
)
MODEL_GEN_VAR = "model_gen"  # .bss u32: the serving model's generation, bumped on a reload
# scx's exit info (UEI_DEFINE(uei)): struct user_exit_info in .data, the dump in its own section.
UEI_VAR, UEI_DUMP_VAR, UEI_DUMP_LEN_VAR = "uei", "uei_dump", "uei_dump_len"
UEI_DUMP_SECTION = ".data.uei_dump"
UEI_DUMP_LEN = 32768  # scx's UEI_DUMP_DFL_LEN


class Candidate(ctypes.Structure):
    """struct mlsched_candidate."""

    _fields_ = [
        ("key", ctypes.c_uint64),
        ("ts_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("cpu_idle", ctypes.c_uint32),
        ("cpu_not_idle", ctypes.c_uint32),
        ("src_dom", ctypes.c_uint32),
        ("dst_dom", ctypes.c_uint32),
        ("src_load_q", ctypes.c_uint32),
        ("dst_load_q", ctypes.c_uint32),
        ("action", ctypes.c_uint32),
        ("source", ctypes.c_uint32),
        ("path", ctypes.c_uint32),
        ("prob_q16", ctypes.c_uint32),
    ]


class UserExitInfo(ctypes.Structure):
    """struct user_exit_info of the kernel's scx headers (user_exit_info_common.h)."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("exit_cpu", ctypes.c_int32),
        ("exit_code", ctypes.c_int64),
        ("reason", ctypes.c_char * 128),
        ("msg", ctypes.c_char * 1024),
    ]


MLP_MAX_LAYERS = 3
MLP_MAX_UNITS = 64
MLP_FRAC_BITS = 16


class MlpAct(IntEnum):
    LINEAR = 0
    RELU = 1


class MlpOut(IntEnum):
    LOGIT = 0  # the final sigmoid dropped: migrate when z > 0
    LINEAR = 1  # a linear output: migrate when z > 0.5


class Mlp(ctypes.Structure):
    """struct mlsched_mlp."""

    _fields_ = [
        ("generation", ctypes.c_uint32),
        ("nr_layers", ctypes.c_uint32),
        ("out_rule", ctypes.c_uint32),
        ("nr_in", ctypes.c_uint32 * MLP_MAX_LAYERS),
        ("nr_out", ctypes.c_uint32 * MLP_MAX_LAYERS),
        ("act", ctypes.c_uint32 * MLP_MAX_LAYERS),
        ("weight", ctypes.c_int32 * MLP_MAX_UNITS * MLP_MAX_UNITS * MLP_MAX_LAYERS),
        ("bias", ctypes.c_int32 * MLP_MAX_UNITS * MLP_MAX_LAYERS),
    ]


class DomStat(ctypes.Structure):
    """struct mlsched_dom_stat."""

    _fields_ = [
        ("nr_cpus", ctypes.c_uint32),
        ("load_q", ctypes.c_uint32),
        ("queued", ctypes.c_uint64),
    ]


CANDIDATE_DTYPE = np.dtype(
    [(name, np.uint64 if t is ctypes.c_uint64 else np.uint32) for name, t in Candidate._fields_]
)
