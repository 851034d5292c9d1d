"""Export a Keras model as a SavedModel the loader accepts, verified, all or nothing.

Used by model_dir/model_export.py, model_dir/transfer.py and model_dir/create_dummy_model.py:
export_verified() writes the directory, report_export() logs what every one of them reports
(the contract, the fast path, the backend the loader will choose). The model is exported next to
the output directory, checked there as the loader checks it (check_model_dir, no TF), given
verified fast-path weights when it is a plain Dense stack (write_fastpath, TF), its manifest
written (write_manifest), and only then moved into place. A model that fails the contract
leaves nothing behind, and an existing output is only ever replaced when it is plainly an old
SavedModel (or an empty directory).

write_manifest() is the one writer of mlsched_manifest.json: every tool that makes or changes
a model directory calls it last (this module and verify_model.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loader import contract, schema
from loader.backends import Predictor, open_backend
from loader.model_check import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    ModelError,
    ModelInfo,
    check_model_dir,
    file_digests,
    read_provenance,
)
from model_dir.fastpath_verify import FastpathResult, write_fastpath

if TYPE_CHECKING:
    import keras

MANIFEST_FORMAT = "mlsched model manifest"
log = logging.getLogger("export_verified")


def check_replaceable(output: Path) -> None:
    """ModelError unless output is absent, an empty directory, or an old SavedModel."""
    if not output.exists():
        return
    if output.is_dir() and ((output / "saved_model.pb").exists() or not any(output.iterdir())):
        return
    raise ModelError(f"{output} exists and is not a SavedModel; not replacing it")


def made_by(tool: str, summary: str, trained: bool = True, **facts: Any) -> dict[str, Any]:
    """A manifest's provenance: the tool, its command line, when (UTC), a one-line summary the
    loader logs at start, whether the weights were trained, and any facts (data, figures)."""
    return {"tool": tool, "command": " ".join([tool, *sys.argv[1:]]), "trained": trained,
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"), "summary": summary, **facts}


def write_manifest(path: Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write path/mlsched_manifest.json: the sha256 of every other file of the directory, and the
    model's provenance (made_by(); None keeps the one the manifest already holds, if any).

    Call it last, once TensorFlow has loaded the model (write_fastpath does, and TF checks the
    variables' crc32c as it restores them): the loader then refuses, before attach, any file
    that changed since. Written then renamed, so a loader never reads half a manifest.
    """
    path = Path(path)
    file = path / MANIFEST_FILE
    if provenance is None:
        provenance = read_provenance(path)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "files": file_digests(path),
    }
    if provenance:
        manifest["provenance"] = provenance
    tmp = file.with_name(f".{MANIFEST_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, file)
    return file


def with_contract_input(model: keras.Model) -> keras.Model:
    """The model, called on a keras.Input named `features` when its own input has another name.

    model.export() names the signature's input after the Input layer; a file from elsewhere
    often has `input_1` or `dense_input`. Only a single [?, 10] float32 input is wrapped: any
    other shape is left for check_model_dir to refuse with its own message.
    """
    import keras

    if len(model.inputs) != 1:
        return model
    spec = model.inputs[0]
    name = getattr(spec, "name", "")
    if name == contract.MODEL_INPUT_KEY:
        return model
    if tuple(spec.shape) != (None, schema.NR_FEATURES) or str(spec.dtype) != "float32":
        return model
    inputs = keras.Input(shape=(schema.NR_FEATURES,), name=contract.MODEL_INPUT_KEY)
    return keras.Model(inputs, model(inputs), name=f"{model.name}_features")


def export_verified(model: keras.Model, output: Path, provenance: dict[str, Any]
                    ) -> tuple[ModelInfo, FastpathResult]:
    """Export, check, verify the fast path, then put the directory at output.

    Raises ModelError when the exported model breaks the contract (nothing is written then).
    """
    output = Path(output)
    check_replaceable(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    try:
        model.export(str(tmp), verbose=False)
        info = check_model_dir(tmp, manifest=False)
        if info.input_key != contract.MODEL_INPUT_KEY:
            raise ModelError(
                f"exported input key is {info.input_key!r}, not {contract.MODEL_INPUT_KEY!r} "
                f"(name the keras.Input {contract.MODEL_INPUT_KEY!r})"
            )
        result = write_fastpath(tmp)
        write_manifest(tmp, provenance)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the model is shipped and read by others
        # The digest and the manifest cover paths relative to the directory: a rename keeps
        # them valid.
        old = None
        if output.exists():
            check_replaceable(output)
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
        tmp.rename(output)
        if old is not None:
            shutil.rmtree(old)
    except ModelError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Name the directory the user asked for, not the scratch one.
        raise ModelError(str(e).replace(str(tmp), str(output))) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = check_model_dir(output)  # what the loader will see
    if info.fastpath_ok != result.written:
        raise ModelError(f"{output}: the fast-path status changed when the directory was moved")
    return info, result


def report_export(info: ModelInfo, result: FastpathResult, require_fastpath: bool = False,
                  hint: str = "") -> Predictor:
    """Log an export_verified() result; the backend the loader will choose (auto) for it.

    With require_fastpath, a fast path that did not verify is a ModelError (hint appended).
    """
    log.info("exported SavedModel to %s: contract ok (input %r)", info.path, info.input_key)
    log.info("%s", result.message)
    if require_fastpath and not result.written:
        raise ModelError(f"{info.path}: the fast path did not verify: {result.message}"
                         + (f"; {hint}" if hint else ""))
    backend, reason = open_backend(info, "auto")
    log.info("loader backend (auto): %s", reason)
    return backend
