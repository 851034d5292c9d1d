"""The BPF/Python contract, mirrored from bpf/mlsched.h; the feature schema is loader/schema.py.

tests/host/test_contract.py parses bpf/mlsched.h and the compiled object's BTF and fails when
this module and the C side drift. Change both together.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

import numpy as np

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
PINNED_MAPS = (MAP_COUNTERS, MAP_LOADER_STATS, MAP_DOM_STATS, MAP_LATENCY_HIST, MAP_DECISIONS,
               MAP_DECISION_GRID)

# The enums of bpf/mlsched.h, in order from 0 (tests/host/test_contract.py checks the BTF).
Decision = IntEnum("Decision", "KEEP MIGRATE", start=0)
GridCode = IntEnum("GridCode", "UNDECIDED KEEP MIGRATE", start=0)  # a decision grid byte
Source = IntEnum("Source", "MODEL FALLBACK EXPLORE", start=0)  # who chose a candidate's action
Path = IntEnum("Path", "WAKEUP STEAL", start=0)  # where a candidate was built
Fallback = IntEnum("Fallback", "KEEP MIGRATE HEURISTIC", start=0)
Backend = IntEnum("Backend", "NONE TF NUMPY KERNEL", start=0)
# Rows of the latency_hist map; bucket b counts latencies in [2^b, 2^(b+1)) ns.
Hist = IntEnum("Hist", "BATCH EVENT", start=0)
Counter = IntEnum("Counter", """
    SELECT LOCAL NO_CANDIDATE CANDIDATES HITS MISSES MIGRATE KEEP FALLBACK_MIGRATE
    FALLBACK_KEEP SUBMITTED RB_DROPS STEAL_CANDIDATES MIGR_MODEL MIGR_FALLBACK
    MIGR_FORCED MIGR_DOMAIN RAN_CROSS RAN_DOMAIN PREEMPTS RESTRICTED EXPLORED
    LOADER_WAKEUPS KINFER KINFER_NS RB_WAKEUPS RAN_CROSS_DECIDED
""", start=0)
LoaderStat = IntEnum("LoaderStat", """
    BATCHES RECORDS DECISIONS MODEL_ERRORS BATCH_NS_SUM BATCH_NS_MAX MODEL_READY
    BACKEND START_NS LOADER_PID EV_LAT_NS_SUM TABLE_ENTRIES RESTARTS RELOADS
    RELOAD_FAILURES MODEL_DIGEST GRID_KEYS GRID_DECIDED
""", start=0)
NR_COUNTERS, NR_LOADER_STATS, NR_HISTS = len(Counter), len(LoaderStat), len(Hist)

GRID_MAX_KEYS = 1 << 26
GEN_SHIFT = 8  # decisions hash value: (generation << GEN_SHIFT) | Decision
EXPLORE_SCALE = 65536  # the explore setting, Candidate.prob_q16: probabilities in 1/65536
VTIME_MAX_LAG_SLICES = 4
HIST_BUCKETS = 40


def hist_bucket(ns: np.ndarray) -> np.ndarray:
    """Histogram bucket of each latency in ns (log2, clamped to the last bucket)."""
    ns = np.maximum(np.asarray(ns, dtype=np.int64), 1)
    return np.minimum(np.floor(np.log2(ns)).astype(np.int64), HIST_BUCKETS - 1)


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

MLP_MAX_LAYERS, MLP_MAX_UNITS, MLP_FRAC_BITS = 3, 64, 16  # struct mlsched_mlp: weights in Q16.16
MlpAct = IntEnum("MlpAct", "LINEAR RELU", start=0)
# LOGIT: the final sigmoid dropped, migrate when z > 0; LINEAR: migrate when z > 0.5.
MlpOut = IntEnum("MlpOut", "LOGIT LINEAR", start=0)


def struct_fields(names: str, ctype: type) -> list[tuple[str, type]]:
    """ctypes _fields_ of consecutive members of one C type, named in declaration order."""
    return [(name, ctype) for name in names.split()]


class Candidate(ctypes.Structure):
    """struct mlsched_candidate."""

    _fields_ = [
        *struct_fields("key ts_ns", ctypes.c_uint64),
        *struct_fields("pid cpu cpu_idle cpu_not_idle src_dom dst_dom src_load_q dst_load_q "
                       "action source path prob_q16", ctypes.c_uint32),
    ]


class UserExitInfo(ctypes.Structure):
    """struct user_exit_info of the kernel's scx headers (user_exit_info_common.h)."""

    _fields_ = [*struct_fields("kind exit_cpu", ctypes.c_int32), ("exit_code", ctypes.c_int64),
                ("reason", ctypes.c_char * 128), ("msg", ctypes.c_char * 1024)]


class Mlp(ctypes.Structure):
    """struct mlsched_mlp."""

    _fields_ = [
        *struct_fields("generation nr_layers out_rule", ctypes.c_uint32),
        *struct_fields("nr_in nr_out act", ctypes.c_uint32 * MLP_MAX_LAYERS),
        ("weight", ctypes.c_int32 * MLP_MAX_UNITS * MLP_MAX_UNITS * MLP_MAX_LAYERS),
        ("bias", ctypes.c_int32 * MLP_MAX_UNITS * MLP_MAX_LAYERS),
    ]


class DomStat(ctypes.Structure):
    """struct mlsched_dom_stat."""

    _fields_ = [*struct_fields("nr_cpus load_q", ctypes.c_uint32), ("queued", ctypes.c_uint64)]
