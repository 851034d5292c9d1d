"""Check a model directory against the model contract, before attach and without TensorFlow.

The loader attaches the scheduler before it imports TensorFlow (72 s under TCG), yet a bad
model must be refused before attach. So:
- saved_model.pb is parsed by protobuf with TensorFlow's own message definitions, as
  tensorboard ships them (tensorboard.compat.proto, no TF import). tensorboard has
  MetaGraphDef but not the SavedModel wrapper around it, so that one message is declared here
  (public descriptor_pb2 + message_factory API; tests/host/test_model.py compares it with TF's).
- every file is checked against mlsched_manifest.json, the sha256 of each file of the
  directory, which the model tools write once TensorFlow has loaded the model (and checked the
  variables' own crc32c). A damaged file is refused here, not found by TF after attach.
- it tells whether a verified fast-path weights file (see loader/fastpath.py) matches the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader import contract

SIGNATURE_KEY = "serving_default"
SERVE_TAG = "serve"
FASTPATH_FILE = "assets/mlsched_fastpath.npz"
FASTPATH_VERSION = 1
MANIFEST_FILE = "mlsched_manifest.json"
MANIFEST_FORMAT = "mlsched model manifest"
MANIFEST_VERSION = 1
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
DT_FLOAT = 1  # tensorflow/core/framework/types.proto

_SHARD_RE = re.compile(r"^variables\.data-(\d{5})-of-(\d{5})$")


class ModelError(Exception):
    """A model the loader cannot use; str() is one line for the user, with the fix."""


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


# --- saved_model.pb -------------------------------------------------------------------------


@functools.cache
def saved_model_class() -> Any:
    """The SavedModel message class: {int64 saved_model_schema_version = 1; repeated
    tensorboard.MetaGraphDef meta_graphs = 2}, as in tensorflow/core/protobuf/saved_model.proto.

    Imported here, not at the top, so that importing this module stays cheap.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from tensorboard.compat.proto import meta_graph_pb2

    field = descriptor_pb2.FieldDescriptorProto
    message = descriptor_pb2.DescriptorProto(name="SavedModel")
    message.field.add(name="saved_model_schema_version", number=1, type=field.TYPE_INT64)
    message.field.add(
        name="meta_graphs",
        number=2,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".tensorboard.MetaGraphDef",
    )
    file = descriptor_pb2.FileDescriptorProto(
        name="mlsched/saved_model.proto",
        package="mlsched",
        syntax="proto3",
        dependency=[meta_graph_pb2.DESCRIPTOR.name],
        message_type=[message],
    )
    pool = descriptor_pool.Default()
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mlsched.SavedModel"))


def read_meta_graph(data: bytes) -> Any:
    """The serving MetaGraphDef of saved_model.pb's contents; ValueError when malformed.

    Like tf.saved_model.load: the only meta graph, or else the one tagged "serve".
    """
    from google.protobuf.message import DecodeError

    try:
        meta_graphs = list(saved_model_class().FromString(data).meta_graphs)
    except DecodeError as e:
        raise ValueError("not a SavedModel protobuf (corrupt or truncated)") from e
    if not meta_graphs:
        raise ValueError("no meta graph")
    if len(meta_graphs) > 1:
        meta_graphs = [m for m in meta_graphs if SERVE_TAG in m.meta_info_def.tags]
        if not meta_graphs:
            raise ValueError(f"several meta graphs and none tagged {SERVE_TAG!r}")
    return meta_graphs[0]


def _shape(info: Any) -> tuple[int, ...] | None:
    """A TensorInfo's shape, -1 for an unknown dimension; None for an unknown rank."""
    shape = info.tensor_shape
    return None if shape.unknown_rank else tuple(d.size for d in shape.dim)


def _shape_str(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "unknown rank"
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def _dtype_str(dtype: int) -> str:
    from tensorboard.compat.proto import types_pb2

    try:
        return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()
    except ValueError:
        return f"dtype {dtype}"


def _expect_shape(path: Path, what: str, info: Any, width: int, fix: str) -> None:
    shape = _shape(info)
    if shape is None or len(shape) != 2 or shape[0] >= 0 or shape[1] != width:
        raise ModelError(
            f"{path}: expected {what} shape [?, {width}], got {_shape_str(shape)} ({fix})"
        )


# --- the files ------------------------------------------------------------------------------


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

    The fast-path file carries it: it names the model the weights were verified for.
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


def file_digests(path: Path) -> dict[str, str]:
    """sha256 (hex) of every file under path but the manifest, by relative POSIX path, sorted.

    What mlsched_manifest.json records (model_dir/export_verified.py writes it) and the check
    compares.
    """
    digests = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path).as_posix()
        if rel == MANIFEST_FILE or not file.is_file():
            continue
        with open(file, "rb") as f:
            digests[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def _names(rels: list[str]) -> str:
    return ", ".join(rels[:3]) + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")


def verify_manifest(path: Path) -> None:
    """ModelError unless the directory holds exactly the files its manifest lists, unchanged."""
    fix = f"run model_dir/verify_model.py {path}"
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise ModelError(
            f"{path}: no {MANIFEST_FILE}, so damaged files cannot be detected before attach "
            f"({fix}: it loads the model with TensorFlow, then writes one)"
        )
    try:
        manifest = json.loads(file.read_bytes())
        version, listed = manifest["version"], manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: {MANIFEST_FILE} unreadable ({type(e).__name__}; {fix})") from e
    if version != MANIFEST_VERSION:
        raise ModelError(
            f"{path}: {MANIFEST_FILE} is format v{version}, not v{MANIFEST_VERSION} ({fix})"
        )
    try:
        found = file_digests(path)
    except OSError as e:
        raise ModelError(f"{path}: {e.filename} unreadable ({e.strerror})") from e
    problems = []
    changed = sorted(k for k in listed.keys() & found.keys() if listed[k] != found[k])
    for rels, what in (
        (changed, "changed"),
        (sorted(listed.keys() - found.keys()), "missing"),
        (sorted(found.keys() - listed.keys()), "not listed"),
    ):
        if rels:
            problems.append(f"{_names(rels)} {what}")
    if problems:
        raise ModelError(
            f"corrupt model at {path}: {'; '.join(problems)} since {MANIFEST_FILE} was written "
            f"(damaged, or modified after export: re-export the model, or {fix})"
        )


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


# --- the check ------------------------------------------------------------------------------


def _find_saved_model(path: Path) -> Path:
    """path/saved_model.pb, or ModelError saying what path is instead."""
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
    return pb


def check_model_dir(path: str | Path, *, manifest: bool = True) -> ModelInfo:
    """Validate a SavedModel directory against the model contract; ModelError if unusable.

    manifest=False skips mlsched_manifest.json: only for the model tools, which
    check a model they are about to (re)write the manifest of.
    """
    path = Path(path)
    pb = _find_saved_model(path)
    try:
        meta_graph = read_meta_graph(pb.read_bytes())
    except ValueError as e:
        raise ModelError(f"invalid SavedModel format at {path}: saved_model.pb: {e}") from e

    sig = meta_graph.signature_def.get(SIGNATURE_KEY)
    if sig is None:
        found = ", ".join(sorted(meta_graph.signature_def)) or "none"
        raise ModelError(
            f"{path}: no {SIGNATURE_KEY!r} signature (found: {found}; "
            "export with model.export(DIR))"
        )
    if len(sig.inputs) != 1 or len(sig.outputs) != 1:
        raise ModelError(
            f"{path}: expected 1 input and 1 output, got {len(sig.inputs)} and {len(sig.outputs)}"
            f" (the contract is features [?, {contract.NR_FEATURES}] -> [?, 1])"
        )
    (input_key, in_info), (output_key, out_info) = *sig.inputs.items(), *sig.outputs.items()
    if in_info.dtype != DT_FLOAT:
        raise ModelError(
            f"{path}: expected float32 input, got {_dtype_str(in_info.dtype)} "
            f"(build the model on a float32 keras.Input named {contract.MODEL_INPUT_KEY!r})"
        )
    in_shape = _shape(in_info)
    width = in_shape[1] if in_shape is not None and len(in_shape) == 2 else -1
    if 0 <= width < contract.NR_FEATURES:
        fix = "pad with zeros"
    else:
        fix = f"the contract is {contract.NR_FEATURES} features and a free batch dimension"
    _expect_shape(path, "input", in_info, contract.NR_FEATURES, fix)
    if out_info.dtype != DT_FLOAT:
        raise ModelError(
            f"{path}: expected float32 output, got {_dtype_str(out_info.dtype)} "
            "(end with Dense(1, activation='sigmoid'))"
        )
    _expect_shape(path, "output", out_info, 1, "end with Dense(1, activation='sigmoid')")

    digest = model_digest(path)  # also raises "missing variables"
    if manifest:
        verify_manifest(path)
    ok, reason = _fastpath_status(path, digest)
    return ModelInfo(path, input_key, output_key, digest, ok, reason)
