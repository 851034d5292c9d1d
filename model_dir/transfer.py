"""Convert a Keras model file (.h5 of Keras 2 or 3, or .keras) into a SavedModel for mlsched.

usage: model_dir/transfer.py --input MODEL.h5 --output DIR [--strict]

A model file must not run code. Before Keras sees the file, its model config is read (h5py,
or the zip's config.json) and refused when it holds a Lambda layer, a Python function or a
custom (registered or non-Keras) object; then Keras loads it in safe mode with no custom
objects, so anything else that would need code fails there. The model is exported with
model.export() under the input key `features` (a model whose Input has another name is
wrapped), checked as the loader checks it (check_model_dir), and given verified fast-path
weights when it is a plain Dense stack (write_fastpath) — all in a scratch directory that
replaces DIR only when everything passed.

Exit status: 0 converted (the loader will use numpy when the fast path verified, else TF),
1 converted but no fast path and --strict, 2 refused (nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

from loader.backends import open_backend
from loader.fastpath import import_tensorflow
from loader.model_check import KERAS_SUFFIXES, ModelError, ModelInfo
from model_dir.export_verified import check_replaceable, export_verified, with_contract_input
from model_dir.fastpath_verify import FastpathResult

log = logging.getLogger("transfer")

EXAMPLES = """examples:
  model_dir/transfer.py --input old_model.h5 --output /tmp/m
  model_dir/transfer.py --input model.keras --output model_dir/model_path --strict
  sudo mlsched-load --model /tmp/m                 # then use it
"""

REBUILD = "rebuild it from built-in Keras layers (Dense, ...) and save it again"
_FUNCTION_CLASSES = ("__lambda__", "function")


def read_keras_config(path: Path) -> tuple[dict[str, Any], str]:
    """The model config of a Keras file and the Keras version that wrote it. ModelError."""
    if not path.is_file():
        raise ModelError(f"input not found at {path}")
    if path.suffix.lower() not in KERAS_SUFFIXES:
        raise ModelError(f"{path}: expected a Keras file ({', '.join(KERAS_SUFFIXES)})")
    if path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as z:
                raw: bytes | str = z.read("config.json")
                meta = (
                    json.loads(z.read("metadata.json")) if "metadata.json" in z.namelist() else {}
                )
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ModelError(f"{path}: not a .keras archive with a config.json ({e})") from None
        version = str(meta.get("keras_version", "?"))
    else:
        import h5py  # a Keras dependency; needs no TensorFlow

        try:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
                version = f.attrs.get("keras_version", "?")
        except OSError:
            raise ModelError(f"{path}: not an HDF5 file") from None
        if raw is None:
            raise ModelError(
                f"{path}: holds no model config (a weights-only file?); save the whole "
                "model: model.save('model.h5')"
            )
        version = version.decode() if isinstance(version, bytes) else str(version)
    try:
        config = json.loads(raw)
    except (ValueError, TypeError):
        raise ModelError(f"{path}: the model config is not JSON") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: the model config is not a JSON object")
    return config, version


def code_in_config(config: Any) -> str | None:
    """What in a Keras model config would run code stored in (or named by) the file, or None."""
    if isinstance(config, list):
        for item in config:
            found = code_in_config(item)
            if found:
                return found
        return None
    if not isinstance(config, dict):
        return None
    cls = config.get("class_name")
    inner = config.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    label = f"{cls} {name!r}" if name else repr(cls)
    if cls == "Lambda" or "function_type" in config:
        return f"a Lambda layer {name!r} (Python code)"
    if cls in _FUNCTION_CLASSES or config.get("registered_name") == "function":
        return f"a Python function {inner!r}" if isinstance(inner, str) else "a Python function"
    module = config.get("module")
    if isinstance(cls, str) and isinstance(module, str):
        if module != "keras" and not module.startswith("keras."):
            return f"a custom object {label} from module {module!r}"
    registered = config.get("registered_name")
    if isinstance(cls, str) and (">" in cls or (isinstance(registered, str) and ">" in registered)):
        return f"a custom object {label}"
    for value in config.values():
        found = code_in_config(value)
        if found:
            return found
    return None


def load_safely(path: Path) -> Any:
    """keras.models.load_model in safe mode, no custom objects, no compile. ModelError."""
    import_tensorflow()
    import keras

    try:
        with warnings.catch_warnings():  # Keras 3 lecturing about a Keras 2 file's layout
            warnings.simplefilter("ignore", UserWarning)
            return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises ValueError, TypeError, KeyError... for bad files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first.split(". ")[0].rstrip(".")[:200]  # Keras goes on to dump the config
        raise ModelError(f"{path}: Keras refused it in safe mode: {first} ({REBUILD})") from None


def transfer(source: Path, output: Path) -> tuple[ModelInfo, FastpathResult]:
    """Convert source into the SavedModel directory output; (ModelInfo, FastpathResult)."""
    config, version = read_keras_config(source)
    found = code_in_config(config)
    if found:
        raise ModelError(
            f"{source}: refused: it holds {found}, which would run code from the model file "
            f"({REBUILD})"
        )
    check_replaceable(output)
    log.info("%s: a Keras %s model file, no Lambda layer or custom object", source, version)
    model = load_safely(source)
    wrapped = with_contract_input(model)
    if wrapped is not model:
        log.info(
            "input %r renamed to 'features' (wrapped in a new keras.Input)", model.inputs[0].name
        )
    info, result = export_verified(wrapped, output)
    log.info("exported SavedModel to %s: contract ok (input %r)", output, info.input_key)
    log.info("%s", result.message)
    backend, reason = open_backend(info, "auto")
    log.info("loader backend (auto): %s", reason)
    return info, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a Keras .h5/.keras model file into a SavedModel for mlsched.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="MODEL.h5",
        help="Keras model file (.h5, .keras)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, metavar="DIR", help="SavedModel directory to write"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when no fast path could be verified"
    )
    args = parser.parse_args(argv)
    # The report on stdout; stderr holds nothing but a refusal, one line.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # "Assets written to: <tmp>"
    try:
        _, result = transfer(args.input, args.output)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if args.strict and not result.written else 0


if __name__ == "__main__":
    sys.exit(main())
