"""The verified fast path: a plain Dense stack run in numpy instead of TensorFlow.

write_fastpath() (host side, imports TensorFlow) reads the structure and the weights of a
SavedModel out of the graph TF itself runs, evaluates both TF and numpy on the whole quantized
feature grid of a sizeable machine plus random inputs, and only when every decision agrees
writes assets/mlsched_fastpath.npz, stamped with the digest of the model's files.
NumpyModel (loader side, no TensorFlow) runs that file. check_model_dir() accepts the file
only while the digest still matches, so a model changed behind the manifest's back (see
loader/model_check.py) falls back to TF, never to stale weights.

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
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from loader import contract
from loader.model_check import (
    FASTPATH_FILE,
    FASTPATH_VERSION,
    SIGNATURE_KEY,
    ModelError,
    check_model_dir,
)

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")
MAX_ABS_DIFF = 1e-5  # TF vs numpy, on probabilities
_ACT_OPS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}
_BIAS_OPS = ("BiasAdd", "Add", "AddV2")


def import_tensorflow() -> ModuleType:
    """Import TensorFlow late and quietly (its C++ INFO lines would bury ours)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


@dataclass(frozen=True)
class DenseLayer:
    kernel: np.ndarray  # float32 [in, out], C-contiguous: h @ kernel
    bias: np.ndarray  # float32 [out]
    activation: str  # one of ACTIVATIONS


class NotDenseStack(Exception):
    """The model's graph is not (MatMul [bias] [activation])+."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive number never overflows; e/(1+e) is sigmoid for z < 0
    e = np.exp(-np.abs(z))
    p = 1.0 / (1.0 + e)
    return np.where(z >= 0, p, e * p)


class NumpyModel:
    """A Dense stack in numpy: predict(float32 [n, 10]) -> float32 [n] probabilities."""

    def __init__(self, layers: list[DenseLayer], meta: dict[str, Any] | None = None) -> None:
        if not layers or layers[-1].kernel.shape[1] != 1:
            raise ValueError("a Dense stack ending in one unit is needed")
        self.layers = [
            DenseLayer(
                np.ascontiguousarray(layer.kernel, dtype=np.float32),
                np.ascontiguousarray(layer.bias, dtype=np.float32),
                layer.activation,
            )
            for layer in layers
        ]
        width = self.nr_inputs = self.layers[0].kernel.shape[0]
        for layer in self.layers:  # a shape mismatch fails here, not in the first batch
            if layer.kernel.ndim != 2 or layer.kernel.shape[0] != width:
                raise ValueError(f"kernel {list(layer.kernel.shape)} after width {width}")
            width = layer.kernel.shape[1]
            if layer.bias.shape != (width,):
                raise ValueError(f"bias {list(layer.bias.shape)} for {width} units")
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path) -> NumpyModel:
        """Load a fast-path file, or the one inside a model directory. No TensorFlow."""
        path = Path(path)
        if path.is_dir():
            path = path / FASTPATH_FILE
        try:
            with np.load(path, allow_pickle=False) as npz:
                if int(npz["version"]) != FASTPATH_VERSION:
                    raise ValueError(f"format v{int(npz['version'])}, not v{FASTPATH_VERSION}")
                acts = [str(a) for a in npz["activations"]]
                layers = [
                    DenseLayer(npz[f"kernel_{i}"], npz[f"bias_{i}"], act)
                    for i, act in enumerate(acts)
                ]
                meta = {k: npz[k].item() for k in npz.files if npz[k].ndim == 0}
            model = cls(layers, meta)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise ModelError(
                f"fast-path weights at {path} unreadable ({e}; run model_dir/verify_model.py)"
            ) from e
        if any(a not in ACTIVATIONS for a in acts):
            raise ModelError(f"fast-path weights at {path} use an unknown activation: {acts}")
        return model

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.nr_inputs:
            raise ValueError(f"expected input [n, {self.nr_inputs}], got {list(h.shape)}")
        for layer in self.layers:
            h = h @ layer.kernel  # a new array: the caller's x is never written
            h += layer.bias
            if layer.activation == "relu":
                np.maximum(h, 0.0, out=h)
            elif layer.activation == "tanh":
                np.tanh(h, out=h)
            elif layer.activation == "sigmoid":
                h = _sigmoid(h)
        return h.reshape(-1)

    def describe(self) -> str:
        dims = [str(self.nr_inputs)] + [
            f"{layer.kernel.shape[1]} {layer.activation}" for layer in self.layers
        ]
        return " -> ".join(dims)


# --- extraction from the frozen TF graph ----------------------------------------------------


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
        width_in = layers[-1].kernel.shape[1] if layers else contract.NR_FEATURES
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
    """The quantized grid of one machine size, then random realistic and off-grid rows."""
    grid = contract.unpack_keys(contract.feature_grid(nr_cpus, max_dom_cpus))
    rng = np.random.default_rng(seed)
    rand = np.zeros((nr_random, contract.NR_FEATURES), np.float32)
    half = nr_random // 2
    # Quantized like the kernel would, on machines up to MAX_CPUS...
    rand[:half, 0] = rng.integers(0, contract.MAX_CPUS, half)
    rand[:half, 1:3] = rng.integers(0, 65, (half, 2))
    rand[:half, 3:5] = rng.integers(0, contract.LOAD_SCALE + 1, (half, 2)) / contract.LOAD_SCALE
    # ...and continuous values, a little outside the ranges too: the math must agree anywhere.
    rest = nr_random - half
    rand[half:, 0] = rng.uniform(-1, contract.MAX_CPUS, rest)
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
    file = info.fastpath_file
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
        f"fast path verified: {model.describe()}, {len(x)} probe rows "
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
    p = predict(contract.unpack_keys(contract.feature_grid(nr_cpus, max_dom_cpus)))
    migrate = int(np.count_nonzero(p > contract.MIGRATE_THRESHOLD))
    return migrate, len(p) - migrate
