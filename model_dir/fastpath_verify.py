"""The fast path's TensorFlow side: read a SavedModel's Dense stack, verify numpy against TF.

write_fastpath() (host side, imports TensorFlow) reads the structure and the weights of a
SavedModel out of the graph TF itself runs, evaluates both TF and numpy (loader/backends.py's
NumpyModel, which the loader runs) on the whole quantized feature grid of a sizeable machine
plus random inputs, and only when every decision agrees writes assets/mlsched_fastpath.npz,
stamped with the digest of the model's files.

How the Dense stack is found: the `serving_default` concrete function is frozen with
convert_variables_to_constants_v2, which inlines the nested Keras call functions and turns
every variable read into a Const. From the output we walk the data path back to the input
placeholder, skipping Identity nodes. Only MatMul(x, const), BiasAdd/Add(x, const vector) and
Relu/Sigmoid/Tanh are allowed, in the order (MatMul [bias] [activation])+; any other op
(Mul of swish, Square, Cast, Reshape, a branch...) refuses the model. This is read from the
graph that TF executes, so it also works for models converted from .h5 and needs no metadata
written at export time; Keras' variable names and checkpoint keys carry no layer order.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loader import contract, schema
from loader.backends import DenseLayer, NumpyModel, import_tensorflow
from loader.model_check import (
    FASTPATH_FILE,
    FASTPATH_VERSION,
    SIGNATURE_KEY,
    ModelError,
    check_model_dir,
)
from model_dir.architecture import describe_stack

MAX_ABS_DIFF = 1e-5  # TF vs numpy, on probabilities
_ACT_OPS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}
_BIAS_OPS = ("BiasAdd", "Add", "AddV2")


class NotDenseStack(Exception):
    """The model's graph is not (MatMul [bias] [activation])+."""


def extract_dense_stack(graph_def: Any, input_name: str, output_name: str) -> list[DenseLayer]:
    """The Dense layers of a frozen GraphDef, input placeholder to output; NotDenseStack if not.

    input_name/output_name are node names (no ":0").
    """
    from tensorflow import make_ndarray

    nodes = {n.name: n for n in graph_def.node}

    def data_inputs(node: Any) -> list[str]:
        return [i for i in node.input if not i.startswith("^")]  # "^x" is a control edge

    def producer(ref: str) -> Any:
        name, _, index = ref.partition(":")
        if index not in ("", "0") or name not in nodes:
            raise NotDenseStack(f"unexpected tensor {ref}")
        node = nodes[name]
        while node.op == "Identity":
            node = producer(data_inputs(node)[0])
        return node

    def const(ref: str, ndim: int) -> np.ndarray | None:
        node = producer(ref)
        if node.op != "Const":
            return None
        value = make_ndarray(node.attr["value"].tensor)
        if value.ndim != ndim or value.dtype != np.float32:
            return None
        return value

    # Walk back from the output; steps come out in reverse order.
    steps: list[tuple[str, Any]] = []
    node = producer(output_name)
    while node.op != "Placeholder":
        ins = data_inputs(node)
        if node.op in _ACT_OPS:
            steps.append(("act", _ACT_OPS[node.op]))
            node = producer(ins[0])
        elif node.op in _BIAS_OPS and len(ins) == 2:
            if node.op == "BiasAdd" and node.attr["data_format"].s not in (b"", b"NHWC"):
                raise NotDenseStack(f"BiasAdd {node.name} is not NHWC")
            # BiasAdd(value, bias); an Add may hold the constant on either side
            bias, data = const(ins[1], 1), ins[0]
            if bias is None and node.op != "BiasAdd":
                bias, data = const(ins[0], 1), ins[1]
            if bias is None:
                raise NotDenseStack(f"{node.op} {node.name} does not add a constant vector")
            steps.append(("bias", bias))
            node = producer(data)
        elif node.op == "MatMul":
            kernel = const(ins[1], 2)
            if kernel is None or node.attr["transpose_a"].b:
                raise NotDenseStack(f"MatMul {node.name} is not input @ constant kernel")
            steps.append(("matmul", kernel.T if node.attr["transpose_b"].b else kernel))
            node = producer(ins[0])
        else:
            raise NotDenseStack(f"op {node.op} ({node.name}) is not part of a plain Dense stack")
    if node.name != input_name:
        raise NotDenseStack(f"the output does not depend on input {input_name}")

    layers: list[DenseLayer] = []
    steps.reverse()
    i = 0
    while i < len(steps):
        kind, kernel = steps[i]
        if kind != "matmul":
            raise NotDenseStack(f"a {kind} step where a MatMul should start a layer")
        width_in = layers[-1].kernel.shape[1] if layers else schema.NR_FEATURES
        if kernel.shape[0] != width_in:
            raise NotDenseStack(f"kernel {list(kernel.shape)} after width {width_in}")
        bias = np.zeros(kernel.shape[1], np.float32)
        activation = "linear"
        i += 1
        if i < len(steps) and steps[i][0] == "bias":
            bias = steps[i][1]
            if bias.shape != (kernel.shape[1],):
                raise NotDenseStack(f"bias {list(bias.shape)} for {kernel.shape[1]} units")
            i += 1
        if i < len(steps) and steps[i][0] == "act":
            activation = steps[i][1]
            i += 1
        layers.append(DenseLayer(kernel, bias, activation))
    if not layers or layers[-1].kernel.shape[1] != 1:
        raise NotDenseStack("the stack does not end in one unit")
    return layers


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FastpathResult:
    written: bool
    message: str  # one line: what was verified, or why nothing was written
    file: Path | None = None
    probe_rows: int = 0
    max_abs_diff: float | None = None


def probe_inputs(nr_cpus: int, max_dom_cpus: int, nr_random: int, seed: int = 0) -> np.ndarray:
    """The quantized grid of one machine size, then random realistic and off-grid rows.

    model_export.py moves a model's decision boundary off exactly these rows: change them and
    models verified before may fail verification again.
    """
    grid = schema.unpack_keys(schema.feature_grid(nr_cpus, max_dom_cpus))
    rng = np.random.default_rng(seed)
    rand = np.zeros((nr_random, schema.NR_FEATURES), np.float32)
    half = nr_random // 2
    # Quantized like the kernel would, on machines up to MAX_CPUS...
    rand[:half, 0] = rng.integers(0, schema.MAX_CPUS, half)
    rand[:half, 1:3] = rng.integers(0, 65, (half, 2))
    rand[:half, 3:5] = rng.integers(0, schema.LOAD_SCALE + 1, (half, 2)) / schema.LOAD_SCALE
    # ...and continuous values, a little outside the ranges too: the math must agree anywhere.
    rest = nr_random - half
    rand[half:, 0] = rng.uniform(-1, schema.MAX_CPUS, rest)
    rand[half:, 1:3] = rng.uniform(-1, 70, (rest, 2))
    rand[half:, 3:5] = rng.uniform(-0.1, 1.1, (rest, 2))
    return np.concatenate([grid, rand])


def _save_npz(file: Path, arrays: dict[str, np.ndarray]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a loader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".fastpath-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the model is shipped and read by others
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise


def write_fastpath(
    model_dir: str | Path,
    nr_cpus_probe: int = 32,
    max_dom_cpus_probe: int = 8,
    nr_random: int = 32768,
    seed: int = 0,
) -> FastpathResult:
    """Verify a plain Dense stack against TF and write its fast-path file (needs TensorFlow).

    Raises ModelError when the directory fails check_model_dir (its manifest aside: the
    caller writes it afterwards, see model_dir/export_verified.py) or TF cannot load it.
    Otherwise returns a result;
    when the model is not a Dense stack or numpy disagrees with TF, nothing is written (and an
    older fast-path file is removed).
    """
    info = check_model_dir(model_dir, manifest=False)  # the caller writes the manifest next
    file = info.path / FASTPATH_FILE
    removed = ""
    if file.exists():
        file.unlink()  # verified for another model, or about to be re-verified
        removed = " (removed the old fast-path file)"

    tf = import_tensorflow()
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    try:  # keep `loaded`: the signature only weakly holds the variables
        loaded = tf.saved_model.load(str(info.path))
    except Exception as e:  # damaged variables (TF checks their crc32c), a broken graph...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(
            f"TensorFlow cannot load {info.path}: {type(e).__name__}: {first} (re-export it)"
        ) from e
    sig = loaded.signatures[SIGNATURE_KEY]
    try:
        try:
            frozen = convert_variables_to_constants_v2(sig)
        except Exception as e:  # control flow, tables...: certainly not a plain Dense stack
            raise NotDenseStack(f"TF cannot freeze its graph ({type(e).__name__})") from e
        if len(frozen.inputs) != 1 or len(frozen.outputs) != 1:
            raise NotDenseStack("the frozen signature has more than one input or output")
        layers = extract_dense_stack(
            frozen.graph.as_graph_def(),
            frozen.inputs[0].name.split(":")[0],
            frozen.outputs[0].name.split(":")[0],
        )
    except NotDenseStack as e:
        return FastpathResult(
            False, f"not a plain Dense stack: {e}; the loader will use TF" + removed
        )
    model = NumpyModel(layers)

    x = probe_inputs(nr_cpus_probe, max_dom_cpus_probe, nr_random, seed)
    want = np.concatenate(
        [
            sig(**{info.input_key: tf.constant(chunk)})[info.output_key].numpy().ravel()
            for chunk in np.array_split(x, -(-len(x) // 65536))  # bounded TF batches
        ]
    )
    got = model.predict(x)
    diff = float(np.max(np.abs(want - got)))
    flipped = int(
        np.count_nonzero((want > contract.MIGRATE_THRESHOLD) != (got > contract.MIGRATE_THRESHOLD))
    )
    if flipped or not diff <= MAX_ABS_DIFF:  # "not <=" also catches NaN
        return FastpathResult(
            False,
            f"numpy disagrees with TF: {flipped} of {len(x)} decisions differ, max abs diff "
            f"{diff:.3g} (limit {MAX_ABS_DIFF:g}); the loader will use TF" + removed,
            probe_rows=len(x),
            max_abs_diff=diff,
        )

    arrays: dict[str, np.ndarray] = {
        "version": np.array(FASTPATH_VERSION),
        # Taken before TF read the files: a model changed meanwhile looks stale, never verified.
        "digest": np.array(info.digest),
        "input_key": np.array(info.input_key),
        "output_key": np.array(info.output_key),
        "activations": np.array([layer.activation for layer in model.layers]),
        "probe_rows": np.array(len(x)),
        "probe_grid": np.array(f"{nr_cpus_probe}x{max_dom_cpus_probe}"),
        "max_abs_diff": np.array(diff),
        "tf_version": np.array(tf.__version__),
    }
    for i, layer in enumerate(model.layers):
        arrays[f"kernel_{i}"] = layer.kernel
        arrays[f"bias_{i}"] = layer.bias
    _save_npz(file, arrays)
    return FastpathResult(
        True,
        f"fast path verified: {describe_stack(model)}, {len(x)} probe rows "
        f"(grid {nr_cpus_probe} CPUs x {max_dom_cpus_probe} per domain + {nr_random} random), "
        f"decisions identical, max abs diff {diff:.2g}",
        file=file,
        probe_rows=len(x),
        max_abs_diff=diff,
    )


def grid_decisions(
    predict: Callable[[np.ndarray], np.ndarray], nr_cpus: int, max_dom_cpus: int
) -> tuple[int, int]:
    """(migrate, keep) counts of a model over every key of one machine's feature grid."""
    p = predict(schema.unpack_keys(schema.feature_grid(nr_cpus, max_dom_cpus)))
    migrate = int(np.count_nonzero(p > contract.MIGRATE_THRESHOLD))
    return migrate, len(p) - migrate
