"""The BPF/Python contract: bpf/mlsched.h and the compiled object's BTF vs loader/contract.py.

Any change to one side without the other fails here.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from enum import IntEnum
from pathlib import Path

import numpy as np
import pytest

from loader import contract, schema

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "mlsched.h"
OBJ = ROOT / "bpf" / "mlsched.bpf.o"


def header_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define\s+MLSCHED_(\w+)\s+(.+?)\s*(?:/\*.*)?$",
                         HEADER.read_text(), re.M):
        expr = m.group(2).replace("u <<", " <<").replace("u)", ")")
        try:
            out[m.group(1)] = int(eval(expr, {}))  # plain integer expressions only
        except (SyntaxError, NameError):
            pass
    return out


@pytest.fixture(scope="module")
def btf() -> dict[str, tuple[str, int, list[tuple[str, int]]]]:
    """name -> (kind, size, [(member, offset_bits or value)]) from the object's BTF."""
    if not OBJ.exists():
        pytest.fail(f"{OBJ} missing: run `make bpf`")
    raw = subprocess.run(["bpftool", "btf", "dump", "file", str(OBJ), "format", "raw"],
                         check=True, capture_output=True, text=True).stdout
    types: dict[str, tuple[str, int, list[tuple[str, int]]]] = {}
    current: list[tuple[str, int]] | None = None
    for line in raw.splitlines():
        m = re.match(r"\[\d+\] (STRUCT|ENUM|DATASEC) '([^']*)' (?:encoding=\w+ )?size=(\d+)",
                     line)
        if m:
            current = []
            types[m.group(2)] = (m.group(1), int(m.group(3)), current)
            continue
        if not line.startswith("\t") or current is None:
            if not line.startswith("\t"):
                current = None
            continue
        if mm := re.match(r"\t'(\w+)' type_id=\d+ bits_offset=(\d+)", line):
            current.append((mm.group(1), int(mm.group(2))))
        elif mm := re.match(r"\t'(\w+)' val=(-?\d+)", line):
            current.append((mm.group(1), int(mm.group(2))))
        elif mm := re.match(r"\ttype_id=\d+ offset=\d+ size=\d+ \(VAR '(\w+)'\)", line):
            current.append((mm.group(1), 0))
    return types


@pytest.mark.parametrize("define,value", [
    ("MAX_CPUS", schema.MAX_CPUS),
    ("MAX_DOMS", contract.MAX_DOMS),
    ("LOAD_SCALE", schema.LOAD_SCALE),
    ("LOAD_FULL_PER_CPU", schema.LOAD_FULL_PER_CPU),
    *((f"KEY_{name}_SHIFT", field.shift) for name, field in zip(
        ("CPU", "IDLE", "NOT_IDLE", "SRC", "DST"), schema.KEY_FIELDS, strict=True)),
    ("KEY_FIELD_MAX", schema.KEY_FIELD_MAX),
    ("RINGBUF_DEFAULT_BYTES", contract.RINGBUF_DEFAULT_BYTES),
    ("HIST_BUCKETS", contract.HIST_BUCKETS),
    ("VTIME_MAX_LAG_SLICES", contract.VTIME_MAX_LAG_SLICES),
    ("EXPLORE_SCALE", contract.EXPLORE_SCALE),
    ("GRID_MAX_KEYS", contract.GRID_MAX_KEYS),
    ("GEN_SHIFT", contract.GEN_SHIFT),
    ("MLP_MAX_LAYERS", contract.MLP_MAX_LAYERS),
    ("MLP_MAX_UNITS", contract.MLP_MAX_UNITS),
    ("MLP_FRAC_BITS", contract.MLP_FRAC_BITS),
])
def test_header_defines_match(define: str, value: int) -> None:
    assert header_defines()[define] == value


@pytest.mark.parametrize("c_struct,py_struct", [
    ("mlsched_candidate", contract.Candidate),
    ("user_exit_info", contract.UserExitInfo),
    ("mlsched_dom_stat", contract.DomStat),
    ("mlsched_mlp", contract.Mlp),
])
def test_struct_layout_matches_btf(btf, c_struct: str, py_struct: type[ctypes.Structure]) -> None:
    kind, size, members = btf[c_struct]
    assert kind == "STRUCT"
    assert size == ctypes.sizeof(py_struct)
    py_members = [(name, getattr(py_struct, name).offset * 8) for name, _ in py_struct._fields_]
    assert members == py_members


def test_candidate_dtype_matches_struct() -> None:
    dtype = np.dtype([(name, np.uint64 if t is ctypes.c_uint64 else np.uint32)
                      for name, t in contract.Candidate._fields_])
    assert dtype.itemsize == ctypes.sizeof(contract.Candidate)
    for name, _ in contract.Candidate._fields_:
        assert dtype.fields[name][1] == getattr(contract.Candidate, name).offset


# Each Python enum and the prefix its BTF enum's values have after MLSCHED_; the BTF enum is
# named mlsched_ and the Python name in snake case (LoaderStat: mlsched_loader_stat).
ENUM_PREFIXES = {
    contract.Counter: "CNT_", contract.LoaderStat: "LS_",
    contract.Backend: "BACKEND_", contract.Fallback: "FALLBACK_", contract.Decision: "",
    contract.Hist: "HIST_", contract.Source: "SRC_", contract.Path: "PATH_",
    contract.GridCode: "GRID_", contract.MlpAct: "MLP_", contract.MlpOut: "MLP_OUT_",
}


@pytest.mark.parametrize("py_enum", ENUM_PREFIXES, ids=lambda e: e.__name__)
def test_enum_matches_btf(btf, py_enum: type[IntEnum]) -> None:
    c_enum = "mlsched_" + re.sub(r"(?<!^)(?=[A-Z])", "_", py_enum.__name__).lower()
    prefix = "MLSCHED_" + ENUM_PREFIXES[py_enum]
    kind, _, values = btf[c_enum]
    assert kind == "ENUM"
    c_side = {
        name.removeprefix(prefix): v for name, v in values if not name.startswith("MLSCHED_NR_")
    }
    assert c_side == {e.name: e.value for e in py_enum}


@pytest.mark.parametrize("section,names", [
    (".rodata", contract.SETTINGS + (contract.UEI_DUMP_LEN_VAR,)),
    (".bss", (contract.MODEL_GEN_VAR,)),
    (".data", (contract.UEI_VAR,)),
    (contract.UEI_DUMP_SECTION, (contract.UEI_DUMP_VAR,)),
])
def test_loader_variables_are_in_their_sections(btf, section: str, names: tuple[str, ...]) -> None:
    variables = {name for name, _ in btf[section][2]}
    assert set(names) <= variables, set(names) - variables


def test_map_names_match_btf(btf) -> None:
    _, _, variables = btf[".maps"]
    names = {name for name, _ in variables}
    for attr in dir(contract):
        if attr.startswith("MAP_"):
            assert getattr(contract, attr) in names, attr
    assert set(contract.PINNED_MAPS) <= names


def test_key_packing_round_trip() -> None:
    key = schema.pack_key(cpu=3, cpu_idle=2, cpu_not_idle=5, src_load_q=12, dst_load_q=4)
    x = schema.unpack_keys(np.array([key], dtype=np.uint64))
    assert x.dtype == np.float32 and x.shape == (1, schema.NR_FEATURES)
    assert x[0, :5].tolist() == [3.0, 2.0, 5.0, 12 / schema.LOAD_SCALE, 4 / schema.LOAD_SCALE]
    assert not x[0, 5:].any()


def test_feature_grid_holds_only_candidates() -> None:
    keys = schema.feature_grid(nr_cpus=2, max_dom_cpus=1)
    x = schema.unpack_keys(keys)
    assert len(np.unique(keys)) == len(keys)
    assert np.all(x[:, 3] > x[:, 4])  # the source is the busier domain
    s = schema.LOAD_SCALE
    assert len(keys) == 2 * 2 * 2 * (s + 1) * s // 2


def test_settings_reach_the_objects_rodata() -> None:
    """settings() gives every contract.SETTINGS name, and write_settings() puts each value into
    the opened object's .rodata where the kernel will read it (no load: this runs anywhere)."""
    from loader import libbpf
    from loader.domains import DomainPlan
    from loader.scheduler import settings, write_settings

    plan = DomainPlan([[0, 2], [1, 3]], "two domains of two")
    config = settings(plan, contract.Fallback.KEEP, 5_000_000, 7, 8_000_000, 9, 32, 11, (4, 2),
                      kernel_inference=True)
    assert set(config) == set(contract.SETTINGS)
    assert config["slice_min_ns"] == 5_000_000  # clamped to the slice
    obj = libbpf.BpfObject(str(OBJ))
    try:
        write_settings(obj, config)
        got = {name: obj.var(".rodata", name).value for name in config if name != "cpu_dom"}
        got["cpu_dom"] = obj.var(".rodata", "cpu_dom", ctypes.c_uint32 * 4)[:]
        obj.set_value_size(contract.UEI_DUMP_SECTION, contract.UEI_DUMP_LEN)
        assert obj.initial_value(contract.UEI_DUMP_SECTION)[1] == contract.UEI_DUMP_LEN
    finally:
        obj.close()
    assert got == config | {"cpu_dom": [0, 1, 0, 1]}
