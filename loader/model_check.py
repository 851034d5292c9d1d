"""Check a model directory against the model contract, without TensorFlow.

The loader attaches the scheduler before it imports TensorFlow (72 s under TCG), yet a bad
model must be refused before attach. So this module reads saved_model.pb with a small
protobuf wire-format decoder, checks the `serving_default` signature and the variables files,
and tells whether a verified fast-path weights file (see loader/fastpath.py) matches them.

Field numbers (checked against the descriptors of TF 2.21's saved_model_pb2/meta_graph_pb2/
tensor_shape_pb2; tests/host/test_model.py compares this decoder with TF's own parse):
  SavedModel.meta_graphs = 2            MetaGraphDef.meta_info_def = 1, signature_def = 5
  MetaInfoDef.tags = 4                  map entries: key = 1, value = 2
  SignatureDef.inputs = 1, outputs = 2  TensorInfo.dtype = 2, tensor_shape = 3
  TensorShapeProto.dim = 2, unknown_rank = 3                     Dim.size = 1 (-1 = unknown)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loader import contract
from loader.checkpoint_index import CheckpointError, verify_checkpoint
from loader.protowire import read_varint

SIGNATURE_KEY = "serving_default"
SERVE_TAG = "serve"
FASTPATH_FILE = "assets/mlsched_fastpath.npz"
FASTPATH_VERSION = 1
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")

# tensorflow/core/framework/types.proto, the ones a model is likely to use.
DTYPE_NAMES = {
    0: "invalid",
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "string",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    19: "float16",
    20: "resource",
    21: "variant",
}
DT_FLOAT = 1

_SHARD_RE = re.compile(r"^variables\.data-(\d{5})-of-(\d{5})$")


class ModelError(Exception):
    """A model the loader cannot use; str() is one line for the user, with the fix."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: int  # a tensorflow DataType enum value
    shape: tuple[int, ...] | None  # -1 for an unknown dimension; None for an unknown rank

    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, f"dtype {self.dtype}")

    def shape_str(self) -> str:
        if self.shape is None:
            return "unknown rank"
        return "[" + ", ".join("?" if d < 0 else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Signature:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    input_key: str
    output_key: str
    digest: str  # sha256 (hex) of saved_model.pb and the variables files, see model_digest()
    fastpath_ok: bool  # a fast-path file is present and was verified for exactly these files
    fastpath_reason: str  # why the fast path is not usable; "" when it is

    @property
    def fastpath_file(self) -> Path:
        return self.path / FASTPATH_FILE


class DecodeError(ValueError):
    """saved_model.pb is not the protobuf we expect."""


# --- protobuf wire format -------------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    return read_varint(buf, pos, DecodeError)


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of every field of one message, in file order."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise DecodeError("field number 0")
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):  # fixed64, fixed32: no field we read uses them
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise DecodeError("truncated fixed-width field")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise DecodeError("truncated length-delimited field")
            value = buf[pos : pos + size]
            pos += size
        else:  # groups (3, 4) are proto2-only; TensorFlow's protos have none
            raise DecodeError(f"unsupported wire type {wire}")
        yield field, wire, value


def _messages(buf: memoryview, number: int) -> Iterator[memoryview]:
    for field, wire, value in _fields(buf):
        if field == number:
            if wire != 2 or not isinstance(value, memoryview):
                raise DecodeError(f"field {number} is not a message")
            yield value


def _varint_field(buf: memoryview, number: int, default: int = 0) -> int:
    result = default
    for field, wire, value in _fields(buf):
        if field == number:
            if wire != 0 or not isinstance(value, int):
                raise DecodeError(f"field {number} is not a varint")
            result = value  # proto3: the last one wins
    return result


def _string(buf: memoryview) -> str:
    try:
        return bytes(buf).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("string is not UTF-8") from e


def _map_entries(buf: memoryview, number: int) -> Iterator[tuple[str, memoryview]]:
    """map<string, Message> field: (key, value message) pairs."""
    for entry in _messages(buf, number):
        key = ""
        value = memoryview(b"")
        for field, wire, item in _fields(entry):
            if field in (1, 2) and (wire != 2 or not isinstance(item, memoryview)):
                raise DecodeError("map entry field is not length-delimited")
            if field == 1:
                key = _string(item)  # type: ignore[arg-type]
            elif field == 2:
                value = item  # type: ignore[assignment]
        yield key, value


def _tensor_spec(buf: memoryview) -> TensorSpec:
    dtype = _varint_field(buf, 2)
    shape: tuple[int, ...] | None = ()
    for shape_buf in _messages(buf, 3):
        if _varint_field(shape_buf, 3):
            shape = None
            continue
        dims = []
        for dim in _messages(shape_buf, 2):
            size = _varint_field(dim, 1)
            dims.append(size - (1 << 64) if size >= 1 << 63 else size)  # int64 two's complement
        shape = tuple(dims)
    return TensorSpec(dtype, shape)


def _tags(meta_graph: memoryview) -> list[str]:
    tags: list[str] = []
    for info in _messages(meta_graph, 1):
        for field, wire, value in _fields(info):
            if field == 4 and wire == 2 and isinstance(value, memoryview):
                tags.append(_string(value))
    return tags


def parse_signatures(data: bytes) -> dict[str, Signature]:
    """The signatures of a saved_model.pb's serving meta graph; DecodeError when malformed.

    Like tf.saved_model.load: the only meta graph, or else the one tagged "serve".
    """
    buf = memoryview(data)
    meta_graphs = list(_messages(buf, 2))
    if not meta_graphs:
        raise DecodeError("no meta graph")
    if len(meta_graphs) > 1:
        meta_graphs = [m for m in meta_graphs if SERVE_TAG in _tags(m)]
        if not meta_graphs:
            raise DecodeError(f"several meta graphs and none tagged {SERVE_TAG!r}")
    signatures = {}
    for name, sig in _map_entries(meta_graphs[0], 5):
        signatures[name] = Signature(
            inputs={k: _tensor_spec(v) for k, v in _map_entries(sig, 1)},
            outputs={k: _tensor_spec(v) for k, v in _map_entries(sig, 2)},
        )
    return signatures


# --- the model directory --------------------------------------------------------------------


def variables_files(path: Path) -> list[Path]:
    """variables.index and every data shard; ModelError when one is missing."""
    var_dir = path / "variables"
    missing = ModelError(f"missing variables at {var_dir} (re-export the model: model.export(DIR))")
    index = var_dir / "variables.index"
    if not index.is_file():
        raise missing
    shards = sorted(p for p in var_dir.iterdir() if _SHARD_RE.match(p.name))
    if not shards:
        raise missing
    total = int(_SHARD_RE.match(shards[0].name).group(2))  # type: ignore[union-attr]
    names = {p.name for p in shards}
    if any(f"variables.data-{i:05d}-of-{total:05d}" not in names for i in range(total)):
        raise missing
    return [index, *shards]


def model_digest(path: Path) -> str:
    """sha256 over saved_model.pb and the variables files, each prefixed by name and size.

    saved_model.pb is included because the fast path mirrors the graph too: a re-export with
    another activation and the same weights leaves the variables files byte-identical.
    """
    h = hashlib.sha256()
    for file in [path / "saved_model.pb", *variables_files(path)]:
        rel = file.relative_to(path).as_posix().encode()
        h.update(len(rel).to_bytes(4, "little") + rel + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _fastpath_status(path: Path, digest: str) -> tuple[bool, str]:
    verify = f"run model_dir/verify_model.py {path}"
    file = path / FASTPATH_FILE
    if not file.is_file():
        return False, f"no verified fast-path weights ({verify})"
    import numpy as np  # here, not at the top: keeps this module's import cheap

    try:
        with np.load(file, allow_pickle=False) as npz:
            version = int(npz["version"])
            verified_digest = str(npz["digest"])
    except Exception as e:  # any damage to the file only costs the fast path
        return False, f"fast-path weights unreadable ({type(e).__name__}; {verify})"
    if version != FASTPATH_VERSION:
        return False, f"fast-path weights are format v{version}, not v{FASTPATH_VERSION} ({verify})"
    if verified_digest != digest:
        return (
            False,
            f"fast-path weights are stale: the model changed after verification ({verify})",
        )
    return True, ""


def _expect_shape(path: Path, what: str, spec: TensorSpec, width: int, fix: str) -> None:
    shape = spec.shape
    if shape is None or len(shape) != 2 or shape[0] >= 0 or shape[1] != width:
        raise ModelError(
            f"{path}: expected {what} shape [?, {width}], got {spec.shape_str()} ({fix})"
        )


def check_model_dir(path: str | Path) -> ModelInfo:
    """Validate a SavedModel directory against the model contract; ModelError if unusable."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found at {path} (run model_dir/create_dummy_model.py)")
    if path.suffix.lower() in KERAS_SUFFIXES and path.is_file():
        raise ModelError(
            f"{path} is a Keras file, not a SavedModel directory "
            f"(convert it: model_dir/transfer.py --input {path} --output DIR)"
        )
    if not path.is_dir():
        raise ModelError(
            f"invalid SavedModel format at {path}: not a directory (export with model.export(DIR))"
        )
    pb = path / "saved_model.pb"
    keras_files = sorted(p for p in path.iterdir() if p.suffix.lower() in KERAS_SUFFIXES)
    if not pb.is_file() and keras_files:  # a directory holding a Keras file: say so
        raise ModelError(
            f"{keras_files[0]} is a Keras file, not a SavedModel directory "
            f"(convert it: model_dir/transfer.py --input {keras_files[0]} --output DIR)"
        )
    if not pb.is_file():
        raise ModelError(
            f"invalid SavedModel format at {path}: no saved_model.pb "
            "(export with model.export(DIR))"
        )
    try:
        signatures = parse_signatures(pb.read_bytes())
    except DecodeError as e:
        raise ModelError(f"invalid SavedModel format at {path}: saved_model.pb: {e}") from e

    sig = signatures.get(SIGNATURE_KEY)
    if sig is None:
        found = ", ".join(sorted(signatures)) or "none"
        raise ModelError(
            f"{path}: no {SIGNATURE_KEY!r} signature (found: {found}; "
            "export with model.export(DIR))"
        )
    if len(sig.inputs) != 1 or len(sig.outputs) != 1:
        raise ModelError(
            f"{path}: expected 1 input and 1 output, got {len(sig.inputs)} and {len(sig.outputs)}"
            f" (the contract is features [?, {contract.NR_FEATURES}] -> [?, 1])"
        )
    (input_key, in_spec), (output_key, out_spec) = *sig.inputs.items(), *sig.outputs.items()
    if in_spec.dtype != DT_FLOAT:
        raise ModelError(
            f"{path}: expected float32 input, got {in_spec.dtype_name()} "
            f"(build the model on a float32 keras.Input named {contract.MODEL_INPUT_KEY!r})"
        )
    width = in_spec.shape[1] if in_spec.shape is not None and len(in_spec.shape) == 2 else -1
    if 0 <= width < contract.NR_FEATURES:
        fix = "pad with zeros"
    else:
        fix = f"the contract is {contract.NR_FEATURES} features and a free batch dimension"
    _expect_shape(path, "input", in_spec, contract.NR_FEATURES, fix)
    if out_spec.dtype != DT_FLOAT:
        raise ModelError(
            f"{path}: expected float32 output, got {out_spec.dtype_name()} "
            "(end with Dense(1, activation='sigmoid'))"
        )
    _expect_shape(path, "output", out_spec, 1, "end with Dense(1, activation='sigmoid')")

    digest = model_digest(path)  # also raises "missing variables"
    try:  # the stored checksums: TF would only find damaged variables after attach
        verify_checkpoint(path / "variables")
    except CheckpointError as e:
        raise ModelError(f"corrupt variables at {path}/variables: {e} (re-export the model)") from e
    ok, reason = _fastpath_status(path, digest)
    return ModelInfo(path, input_key, output_key, digest, ok, reason)
