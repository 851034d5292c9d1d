"""Model costs on the host: the numpy decide rate and the in-kernel inference time, per network.

usage: python -m tools.bench.kinfer [--json FILE] [--seconds S]

For the dummy (tests/models/dummy), the learned, bundled model (model_dir/model_path)
and a 10-64-64-1 network (random weights, seeded: the widest the kernel mode takes):
- numpy: NumpyModel.predict decisions/s at batch 1, 64 and 512 (the loader's fast path; pin the
  process to one CPU, as `make bench-model` does);
- kernel: the scheduler's own fixed-point code (bpf/mlsched_mlp.h's mlp_decide, wrapped by
  tools/bench/mlp_bench.bpf.c) run with BPF_PROG_TEST_RUN: the weights quantized by
  loader.kernel_mlp written to the weights map, then every key of the 4-vCPU grid (10,404)
  evaluated `--reps` times in one test run each; ns per inference, median and p99 over keys,
  and whether the BPF answer equals the Python mirror's on every key.
Needs root and build/bench/mlp_bench.bpf.o (make build/bench/mlp_bench.bpf.o).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loader import contract, kernel_mlp, libbpf, paths, schema
from loader.backends import DenseLayer, NumpyModel
from loader.bpfmaps import write_elem
from tools.bench.producer import prog_test_run

MLP_OBJ = paths.CHECKOUT / "build" / "bench" / "mlp_bench.bpf.o"
MODELS = {"dummy": paths.DUMMY_MODEL, "trained": paths.BUNDLED_MODEL}
GRID = (4, 2)  # the 4-vCPU VM in two domains
TARGET_RATE = 1e6  # issue 13: the 64-64 network, >= 1 M decisions/s at batch 64 on one core

EXAMPLES = """examples:
  taskset -c 0 python -m tools.bench.kinfer                 # a table
  taskset -c 0 python -m tools.bench.kinfer --json /tmp/kinfer.json --seconds 0.5
"""


class RunArgs(ctypes.Structure):
    """struct mlp_run_args of tools/bench/mlp_bench.bpf.c."""

    _fields_ = [("key", ctypes.c_uint64), ("slot", ctypes.c_uint32), ("gen", ctypes.c_uint32),
                ("reps", ctypes.c_uint32), ("result", ctypes.c_int32), ("ns", ctypes.c_uint64)]


def net_64_64(seed: int = 5) -> NumpyModel:
    rng = np.random.default_rng(seed)

    def dense(n_in: int, n_out: int, act: str) -> DenseLayer:
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        return DenseLayer(np.ascontiguousarray(w), np.zeros(n_out, np.float32), act)

    return NumpyModel([dense(10, 64, "relu"), dense(64, 64, "relu"), dense(64, 1, "sigmoid")])


def numpy_rate(model: NumpyModel, batch: int, seconds: float) -> float:
    x = np.asarray(schema.unpack_keys(schema.grid_keys(*GRID)), np.float32)
    reps = max(1, 4096 // batch)
    for i in range(5):
        model.predict(x[i * batch % len(x):][:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(reps):
            lo = (i * batch) % max(1, len(x) - batch)
            model.predict(x[lo:lo + batch])
        n += reps * batch
    return n / (time.perf_counter() - t0)


def kernel_cost(obj: libbpf.BpfObject, model: NumpyModel, reps: int) -> dict[str, Any]:
    q = kernel_mlp.QuantizedMlp(model)
    write_elem(obj.map_fd(contract.MAP_MLP_WEIGHTS), 1, q.to_struct(generation=3))
    fd = obj.prog_fd("mlp_run")
    keys = schema.grid_keys(*GRID)
    want = q.decide(keys).astype(int).tolist()
    got, ns = [], []
    for key in keys.tolist():
        a = RunArgs(key=key, slot=1, gen=3, reps=reps)
        prog_test_run(fd, a)
        got.append(a.result)
        ns.append(a.ns / reps)
    arr = np.array(ns)
    return {"keys": len(keys), "reps": reps, "ns_median": round(float(np.median(arr)), 1),
            "ns_p99": round(float(np.percentile(arr, 99)), 1),
            "agrees_with_mirror": got == want,
            "share_migrate": round(float(np.mean(np.array(got) == 1)), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.kinfer", description=__doc__,
                                 epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--seconds", type=float, default=1.0, help="per numpy figure (default: 1)")
    ap.add_argument("--reps", type=int, default=20, help="evaluations per key (default: 20)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("kinfer: must run as root (BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 2
    nets = {name: NumpyModel.load(p) for name, p in MODELS.items()}
    nets["64-64"] = net_64_64()
    obj = libbpf.BpfObject(str(MLP_OBJ))
    obj.load()
    out: dict[str, Any] = {"cpu_affinity": sorted(os.sched_getaffinity(0)), "nets": {}}
    try:
        for name, m in nets.items():
            shape = "-".join(str(layer.kernel.shape[1]) for layer in m.layers)
            r: dict[str, Any] = {"shape": f"10-{shape}"}
            r["numpy_per_s"] = {b: round(numpy_rate(m, b, args.seconds)) for b in (1, 64, 512)}
            r["kernel"] = kernel_cost(obj, m, args.reps)
            out["nets"][name] = r
            print(f"{name:8s} {r['shape']:12s} numpy b1 {r['numpy_per_s'][1]:>10,}/s  b64 "
                  f"{r['numpy_per_s'][64]:>10,}/s  b512 {r['numpy_per_s'][512]:>10,}/s | BPF "
                  f"{r['kernel']['ns_median']:,.0f} ns/inference (p99 "
                  f"{r['kernel']['ns_p99']:,.0f}), agrees with the mirror: "
                  f"{r['kernel']['agrees_with_mirror']}", flush=True)
    finally:
        obj.close()
    rate = out["nets"]["64-64"]["numpy_per_s"][64]
    out["target_64_64_b64"] = {"measured": rate, "target": TARGET_RATE, "met": rate >= TARGET_RATE}
    print(f"issue 13: 64-64 network, numpy batch 64: {rate:,}/s (target >= 1,000,000/s): "
          f"{'met' if rate >= TARGET_RATE else 'not met'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
