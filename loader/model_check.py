"""Check a model directory against the model contract, before attach and without TensorFlow.

saved_model.pb is read by protobuf with tensorboard's copy of TF's protos, and every file is
checked against mlsched_manifest.json (sha256 each, written by the model tools once TF loaded
the model): a damaged file is refused here, not found by TF after attach.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from loader import contract, schema

SIGNATURE_KEY = "serving_default"
FASTPATH_FILE, FASTPATH_VERSION = "assets/mlsched_fastpath.npz", 1
MANIFEST_FILE, MANIFEST_VERSION = "mlsched_manifest.json", 1
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
VERIFY = "run mlsched-verify"
T = TypeVar("T")
_SHARD = re.compile(r"variables\.data-\d{5}-of-\d{5}")


class ModelError(Exception):
    """A model the loader cannot use; str() is one line for the user, with the fix."""


class ModelInfo(NamedTuple):
    path: Path
    input_key: str
    output_key: str
    digest: str  # model_digest()
    fastpath_ok: bool  # verified fast-path weights for exactly these files
    fastpath_reason: str  # why not; "" when ok
    provenance: str  # how the model was made, one line (the manifest's "provenance")


@functools.cache
def saved_model_class() -> Any:
    """TF's SavedModel {int64 saved_model_schema_version = 1; repeated MetaGraphDef
    meta_graphs = 2}: tensorboard ships MetaGraphDef, not this wrapper."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from tensorboard.compat.proto import meta_graph_pb2

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="mlsched/saved_model.proto", package="mlsched",
                                               dependency=[meta_graph_pb2.DESCRIPTOR.name],
                                               syntax="proto3")
    proto.message_type.add(name="SavedModel", field=[
        field(name="saved_model_schema_version", number=1, type=field.TYPE_INT64),
        field(name="meta_graphs", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
              type_name=".tensorboard.MetaGraphDef")])
    file = descriptor_pool.Default().AddSerializedFile(proto.SerializeToString())
    return message_factory.GetMessageClass(file.message_types_by_name["SavedModel"])


def read_meta_graph(path: Path) -> Any:
    """The serving MetaGraphDef of path/saved_model.pb, chosen as tf.saved_model.load does: the
    only one, else the first tagged 'serve'."""
    from google.protobuf.message import DecodeError

    invalid = f"invalid SavedModel format at {path}: saved_model.pb:"
    try:
        graphs = saved_model_class().FromString((path / "saved_model.pb").read_bytes()).meta_graphs
    except DecodeError as e:
        raise ModelError(f"{invalid} not a SavedModel protobuf (corrupt or truncated)") from e
    serving = [g for g in graphs if len(graphs) == 1 or "serve" in g.meta_info_def.tags]
    if not serving:
        raise ModelError(f"{invalid} no meta graph tagged 'serve'")
    return serving[0]


def _check_tensor(path: Path, what: str, info: Any, width: int, fix: str) -> None:
    """ModelError unless a signature's tensor is float32 [?, width]."""
    from tensorboard.compat.proto import types_pb2

    if info.dtype != types_pb2.DT_FLOAT:
        names = types_pb2.DataType.DESCRIPTOR.values_by_number
        got = names[info.dtype].name[3:].lower() if info.dtype in names else f"dtype {info.dtype}"
        raise ModelError(f"{path}: expected float32 {what}, got {got} ({fix})")
    dims = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    got = "unknown rank" if dims is None else (
        f"[{', '.join('?' if d < 0 else str(d) for d in dims)}]")
    if got != f"[?, {width}]":
        if what == "input":
            narrow = dims is not None and len(dims) == 2 and 0 <= dims[1] < width
            fix = "pad with zeros" if narrow else (
                f"the contract is {width} features and a free batch dimension")
        raise ModelError(f"{path}: expected {what} shape [?, {width}], got {got} ({fix})")


def model_digest(path: Path) -> str:
    """sha256 over saved_model.pb (the graph: an activation) and the variables, each prefixed by
    name and size: it names the model a fast-path file was verified for."""
    var_dir = path / "variables"
    shards = sorted(p for p in var_dir.glob("variables.data-*") if _SHARD.fullmatch(p.name))
    total = int(shards[0].name[-5:]) if shards else 1  # no shard: the first one is missing
    names = {f"variables.data-{i:05d}-of-{total:05d}" for i in range(total)}
    if not (var_dir / "variables.index").is_file() or not names <= {p.name for p in shards}:
        raise ModelError(f"missing variables at {var_dir} (re-export the model: model.export(DIR))")
    h = hashlib.sha256()
    for file in [path / "saved_model.pb", var_dir / "variables.index", *shards]:
        rel, data = file.relative_to(path).as_posix().encode(), file.read_bytes()
        h.update(len(rel).to_bytes(4, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def file_digests(path: Path) -> dict[str, str]:
    """sha256 of every file under path but the manifest, by relative POSIX path: the manifest."""
    return {f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f != path / MANIFEST_FILE}


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The manifest's "provenance" object (export_verified.made_by()), or None."""
    try:
        p = json.loads((path / MANIFEST_FILE).read_bytes()).get("provenance")
    except (OSError, ValueError, AttributeError):
        return None
    return p if isinstance(p, dict) else None


def provenance(path: Path) -> str:
    """The manifest's provenance as one line: what made the model, when, from what, and how it
    was judged; a warning when the weights are untrained or nothing says where they came from."""
    p = read_provenance(path)
    if p is None:
        return "no provenance in its manifest: made by hand or by an older tool"
    made = ", ".join(str(p[k]) for k in ("tool", "date") if p.get(k))
    line = f"{p.get('summary', 'no summary')} ({made})" if made else str(p.get("summary", ""))
    return line if p.get("trained", True) else f"UNTRAINED, random weights: {line}"


def verify_manifest(path: Path) -> None:
    """ModelError unless the directory holds exactly the files its manifest lists, unchanged."""
    fix, file = f"{VERIFY} {path}", path / MANIFEST_FILE
    if not file.is_file():
        raise ModelError(f"{path}: no {MANIFEST_FILE}, so damaged files cannot be detected before"
                         f" attach ({fix}: it loads the model with TensorFlow, then writes one)")
    try:
        manifest = json.loads(file.read_bytes())
        version, listed = manifest["version"], manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: {MANIFEST_FILE} unreadable ({type(e).__name__}; {fix})") from e
    if version != MANIFEST_VERSION:
        raise ModelError(f"{path}: {MANIFEST_FILE} is format v{version}, not v{MANIFEST_VERSION} "
                         f"({fix})")
    try:
        found = file_digests(path)
    except OSError as e:
        raise ModelError(f"{path}: {e.filename} unreadable ({e.strerror})") from e
    changed = [rel for rel in listed.keys() & found.keys() if listed[rel] != found[rel]]
    problems = []
    for rels, what in ((changed, "changed"), (listed.keys() - found.keys(), "missing"),
                       (found.keys() - listed.keys(), "not listed")):
        if rels:
            more = f" and {len(rels) - 3} more" if len(rels) > 3 else ""
            problems.append(f"{', '.join(sorted(rels)[:3])}{more} {what}")
    if problems:
        raise ModelError(f"corrupt model at {path}: {'; '.join(problems)} since {MANIFEST_FILE} "
                         f"was written (damaged, or modified after export: re-export the model, "
                         f"or {fix})")


def read_fastpath(path: Path, parse: Callable[[Any], T]) -> T:
    """parse(npz) of a model directory's fast-path file; ModelError on any damage."""
    import numpy as np  # here: keeps this module's import cheap

    file = path / FASTPATH_FILE
    try:
        with np.load(file, allow_pickle=False) as npz:
            if int(npz["version"]) != FASTPATH_VERSION:
                raise ValueError(f"format v{int(npz['version'])}, not v{FASTPATH_VERSION}")
            return parse(npz)
    except Exception as e:
        raise ModelError(f"fast-path weights at {file} unreadable ({e}; {VERIFY})") from e


def fastpath_reason(path: Path, digest: str) -> str:
    """Why the fast-path weights cannot serve the model of this digest; "" when they can."""
    if not (path / FASTPATH_FILE).is_file():
        return f"no verified fast-path weights ({VERIFY} {path})"
    try:
        if read_fastpath(path, lambda npz: str(npz["digest"])) == digest:
            return ""
    except ModelError as e:  # damage to the file only costs the fast path
        return str(e)
    return f"fast-path weights are stale: the model changed after verification ({VERIFY} {path})"


def check_model_dir(path: str | Path, *, manifest: bool = True) -> ModelInfo:
    """Validate a SavedModel directory against the model contract; ModelError if unusable.
    manifest=False: only for the model tools, about to (re)write the manifest."""
    path, fix = Path(path), "export with model.export(DIR)"
    if not path.exists():
        raise ModelError(f"model not found at {path} (make one: mlsched-export --output DIR)")
    pb = path / "saved_model.pb"
    found = [path] if path.is_file() else [] if pb.is_file() else sorted(path.glob("*"))
    if keras := [p for p in found if p.suffix.lower() in KERAS_SUFFIXES]:
        raise ModelError(f"{keras[0]} is a Keras file, not a SavedModel directory (convert it: "
                         f"mlsched-transfer --input {keras[0]} --output DIR)")
    if not pb.is_file():
        what = "no saved_model.pb" if path.is_dir() else "not a directory"
        raise ModelError(f"invalid SavedModel format at {path}: {what} ({fix})")
    sigs = read_meta_graph(path).signature_def
    if (sig := sigs.get(SIGNATURE_KEY)) is None:
        raise ModelError(f"{path}: no {SIGNATURE_KEY!r} signature (found: "
                         f"{', '.join(sorted(sigs)) or 'none'}; {fix})")
    if len(sig.inputs) != 1 or len(sig.outputs) != 1:
        raise ModelError(f"{path}: expected 1 input and 1 output, got {len(sig.inputs)} and "
                         f"{len(sig.outputs)} (the contract is features "
                         f"[?, {schema.NR_FEATURES}] -> [?, 1])")
    (input_key, inp), (output_key, out) = *sig.inputs.items(), *sig.outputs.items()
    _check_tensor(path, "input", inp, schema.NR_FEATURES, "build the model on a float32 "
                  f"keras.Input named {contract.MODEL_INPUT_KEY!r}")
    _check_tensor(path, "output", out, 1, "end with Dense(1, activation='sigmoid')")
    digest = model_digest(path)
    if manifest:
        verify_manifest(path)
    reason = fastpath_reason(path, digest)
    return ModelInfo(path, input_key, output_key, digest, not reason, reason, provenance(path))
