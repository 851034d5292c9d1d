"""Convert a Keras model file (.h5 of Keras 2 or 3, or .keras) into a SavedModel for mlsched.

usage: mlsched-transfer --input MODEL.h5 --output DIR [--features NAME,...]
                             [--output-map threshold|sigmoid] [--strict]

A model file must not run code. Before Keras sees the file, its model config is read (h5py,
or the zip's config.json) and refused when it holds a Lambda layer, a Python function or a
custom (registered or non-Keras) object; then Keras loads it in safe mode with no custom
objects, so anything else that would need code fails there. The model is exported with
model.export() under the input key `features` (a model whose Input has another name is
wrapped), checked as the loader checks it (check_model_dir), and given verified fast-path
weights when it is a plain Dense stack (write_fastpath) — all in a scratch directory that
replaces DIR only when everything passed.

Models from elsewhere rarely take the contract's input or end in its sigmoid. A thin wrapper,
made of Dense layers so that the fast path still applies, goes inside the exported SavedModel:
- `--features cpu_idle,cpu_not_idle,...` names, in order, the contract feature each of the
  model's k inputs gets (loader/schema.py FEATURE_NAMES; the values as the loader computes
  them, loads 0..1, unscaled); a fixed 0/1 selection matrix [10, k] feeds it from the
  contract's `features` [?, 10], the other features unused: folded into the first layer of a
  Sequential model that starts with a Dense, else a Dense layer of its own in front. Without
  it the input must be [?, 10].
- `--output-map threshold`: the model's output y means migrate when y > 0.5 (a linear output
  trained as a 0/1 regression); a 1x1 Dense sigmoid(16 (y - 0.5)) is appended, which is > 0.5
  exactly when y is (for every float32 y: 16 and 0.5 are powers of two, so the subtraction is
  exact near 0.5 and the smallest float above 0.5 still maps above 0.5).
  `--output-map sigmoid`: y is a logit; sigmoid(y) is appended. A model whose output layer is
  not a sigmoid is refused unless one of the two is given.
What was wrapped is printed.

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

import numpy as np

from loader import cli, contract, schema
from loader.backends import import_tensorflow
from loader.model_check import KERAS_SUFFIXES, ModelError, ModelInfo
from model_dir.export_verified import (
    check_replaceable,
    export_verified,
    made_by,
    report_export,
    with_contract_input,
)
from model_dir.fastpath_verify import FastpathResult
from model_dir.tool import report_on_stdout, run_or_refuse

log = logging.getLogger("transfer")

EXAMPLES = """examples:
  mlsched-transfer --input old_model.h5 --output /tmp/m
  mlsched-transfer --input model.keras --output model_dir/model_path --strict
  mlsched-transfer --input research.h5 --output /tmp/m \
      --features cpu_idle,cpu_not_idle,src_dom_load,dst_dom_load --output-map threshold
  sudo mlsched-load --model /tmp/m                 # then use it
"""

REBUILD = "rebuild it from built-in Keras layers (Dense, ...) and save it again"
_FUNCTION_CLASSES = ("__lambda__", "function")
OUTPUT_MAPS = ("threshold", "sigmoid")
THRESHOLD_GAIN = 16.0  # sigmoid(16 (y - 0.5)): a power of two, see the module docstring


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


def parse_features(text: str) -> tuple[str, ...]:
    """argparse type of --features: contract feature names, comma-separated, each once."""
    names = tuple(t.strip() for t in text.split(","))
    unknown = [n for n in names if n not in schema.FEATURE_NAMES]
    if unknown:
        known = ", ".join(schema.FEATURE_NAMES)
        raise argparse.ArgumentTypeError(
            f"unknown feature {unknown[0]!r}; the contract's are {known}"
        )
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise argparse.ArgumentTypeError(f"{dups[0]} named twice")
    return names


def output_activation(model: Any) -> tuple[str, str]:
    """(activation, layer name) of the layer that makes the model's output ('?' if unknown)."""
    layer: Any = None
    try:
        layer = model.outputs[0]._keras_history.operation
    except (AttributeError, IndexError):
        layers = getattr(model, "layers", [])
        layer = layers[-1] if layers else None
    if layer is not None and hasattr(layer, "outputs") and hasattr(layer, "layers"):
        return output_activation(layer)  # a nested model: its own output layer
    if layer is None:
        return "?", "?"
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None) if act is not None else None
    if name is None:
        name = "linear" if type(layer).__name__ == "Dense" and act is None else "?"
    return name, str(getattr(layer, "name", "?"))


def selection_matrix(features: tuple[str, ...]) -> np.ndarray:
    """[10, k] float32: column j has a single 1 in the row of the contract feature it takes."""
    s = np.zeros((schema.NR_FEATURES, len(features)), np.float32)
    for j, name in enumerate(features):
        s[schema.FEATURE_NAMES.index(name), j] = 1.0
    return s


def output_map_weights(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Kernel [1, 1] and bias [1] of the appended sigmoid Dense unit for an --output-map."""
    if kind == "threshold":
        return np.array([[THRESHOLD_GAIN]], np.float32), np.array(
            [-THRESHOLD_GAIN * contract.MIGRATE_THRESHOLD], np.float32)
    if kind == "sigmoid":
        return np.ones((1, 1), np.float32), np.zeros(1, np.float32)
    raise ValueError(f"output map must be one of {', '.join(OUTPUT_MAPS)}, not {kind!r}")


def _select_inputs(model: Any, inputs: Any, features: tuple[str, ...]) -> Any:
    """The model on the contract's inputs: the selection matrix folded into its first layer
    when the model is a Sequential starting with a Dense (x @ (S @ W) adds only exact zeros to
    x_sel @ W: one layer less, for the fast path and --inference kernel alike), else a fixed
    Dense selection layer in front of it."""
    import keras

    select = selection_matrix(features)
    layers = list(getattr(model, "layers", []))
    if isinstance(model, keras.Sequential) and layers and type(layers[0]) is keras.layers.Dense:
        first, rest = layers[0], layers[1:]
        weights = first.get_weights()
        folded = keras.layers.Dense(first.units, activation=first.activation,
                                    use_bias=first.use_bias, name=f"{first.name}_on_features")
        x = folded(inputs)
        folded.set_weights([select @ weights[0], *weights[1:]])
        log.info("inputs: folded into its first layer %r: kernel %s -> %s, zero rows for the "
                 "unused features", first.name, list(weights[0].shape),
                 [schema.NR_FEATURES, first.units])
        for layer in rest:
            x = layer(x)
        return x
    selector = keras.layers.Dense(len(features), use_bias=False, trainable=False,
                                  name="mlsched_select_inputs")
    x = selector(inputs)
    selector.set_weights([select])
    log.info("inputs: a fixed selection layer [%d, %d] in front of it", schema.NR_FEATURES,
             len(features))
    return model(x)


def wrap(model: Any, features: tuple[str, ...] | None, output_map: str | None) -> Any:
    """The model inside the contract: `features` [?, 10] in, > 0.5 = migrate out.

    Logs what was done; ModelError when the model cannot be mapped as asked.
    """
    import keras

    width = None
    if len(model.inputs) == 1 and len(model.inputs[0].shape) == 2:
        width = model.inputs[0].shape[-1]
    if features is None and width not in (None, schema.NR_FEATURES):
        raise ModelError(
            f"its input is [?, {width}], the contract's is [?, {schema.NR_FEATURES}]: say "
            f"which contract feature each of its {width} inputs is with --features NAME,... "
            f"(of {', '.join(schema.FEATURE_NAMES)})"
        )
    if features is not None and width != len(features):
        shape = f"[?, {width}]" if width is not None else "not one [?, k] tensor"
        raise ModelError(
            f"--features names {len(features)} inputs, but the model's input is {shape}"
        )
    act, layer = output_activation(model)
    if output_map is None and act != "sigmoid":
        raise ModelError(
            f"its output layer {layer!r} is {act}, not a sigmoid: say how its output y maps to "
            "migrate with --output-map threshold (y > 0.5 means migrate) or --output-map "
            "sigmoid (y is a logit)"
        )
    if output_map == "sigmoid" and act == "sigmoid":
        raise ModelError(
            f"its output layer {layer!r} is already a sigmoid; --output-map sigmoid would "
            "squash it twice (leave --output-map out)"
        )
    if output_map == "threshold" and act == "sigmoid":
        log.info("output: layer %r is a sigmoid already; > 0.5 means migrate as it is, not "
                 "wrapped", layer)
        output_map = None
    if features is None and output_map is None:
        return with_contract_input(model)

    inputs = keras.Input(shape=(schema.NR_FEATURES,), name=contract.MODEL_INPUT_KEY)
    if features is not None:
        unused = [n for n in schema.FEATURE_NAMES if n not in features]
        log.info(
            "inputs: its %d inputs get the contract features %s (as the loader computes "
            "them: loads 0..1, counts as they are); unused: %s",
            len(features),
            ", ".join(f"{j} <- {n}" for j, n in enumerate(features)),
            ", ".join(unused) or "none",
        )
        y = _select_inputs(model, inputs, features)
    else:
        y = model(inputs)
    if output_map is not None:
        head = keras.layers.Dense(1, activation="sigmoid", trainable=False,
                                  name=f"mlsched_output_{output_map}")
        y = head(y)
        head.set_weights(list(output_map_weights(output_map)))
        how = (f"sigmoid({THRESHOLD_GAIN:g} (y - 0.5)), > 0.5 exactly when y > 0.5"
               if output_map == "threshold" else "sigmoid(y), > 0.5 exactly when y > 0")
        log.info("output: layer %r is %s; appended %s", layer, act, how)
    return keras.Model(inputs, y, name=f"{model.name}_mlsched")


def transfer(
    source: Path,
    output: Path,
    features: tuple[str, ...] | None = None,
    output_map: str | None = None,
) -> tuple[ModelInfo, FastpathResult]:
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
    try:
        wrapped = wrap(model, features, output_map)
    except ModelError as e:
        raise ModelError(f"{source}: {e}") from None
    if wrapped is not model and features is None and output_map is None:
        log.info(
            "input %r renamed to 'features' (wrapped in a new keras.Input)", model.inputs[0].name
        )
    info, result = export_verified(wrapped, output, made_by(
        "mlsched-transfer", f"converted from {source}", source=str(source)))
    report_export(info, result)
    return info, result


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("mlsched-transfer", "Convert a Keras .h5/.keras model file into a "
                        "SavedModel for mlsched.", EXAMPLES)
    add = parser.add_argument
    add("--input", type=Path, required=True, metavar="MODEL.h5", help="Keras .h5 or .keras file")
    add("--output", type=Path, required=True, metavar="DIR", help="SavedModel directory to write")
    add("--features", type=parse_features, metavar="NAME,...",
        help="the contract feature each of the model's inputs gets, in order (the others are "
        f"unused): of {', '.join(schema.FEATURE_NAMES)}")
    add("--output-map", choices=OUTPUT_MAPS,
        help="how an output that is not a sigmoid maps to migrate: threshold (> 0.5 means "
        "migrate) or sigmoid (the output is a logit)")
    add("--strict", action="store_true", help="exit 1 when no fast path could be verified")
    args = parser.parse_args(argv)
    report_on_stdout()

    def work() -> int:
        _, result = transfer(args.input, args.output, args.features, args.output_map)
        return 1 if args.strict and not result.written else 0

    return run_or_refuse(work)


if __name__ == "__main__":
    sys.exit(main())
