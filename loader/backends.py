"""Model backends: predict() over TensorFlow or over the verified numpy fast path.

NumpyModel runs assets/mlsched_fastpath.npz, a plain Dense stack that model_dir/fastpath_verify.py
writes only when numpy and TF agree on every decision of a probe grid, stamped with
model_digest(): open_backend() runs it while the stamp matches, so the VM never imports
TensorFlow (72 s under TCG).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Protocol

import numpy as np

from loader import contract
from loader import model_check as mc
from loader.model_check import ModelError, ModelInfo


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))  # never overflows: e / (1 + e) is the sigmoid of -|z|
    return np.where(z >= 0, 1.0, e) / (1.0 + e)


ACTIVATIONS = {"linear": lambda h: h, "relu": lambda h: np.maximum(h, 0.0),
               "sigmoid": _sigmoid, "tanh": np.tanh}


class Predictor(Protocol):
    """A backend: float32 [n, 10] features -> float32 [n] migrate probabilities."""

    name: str
    kind: contract.Backend

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def import_tensorflow() -> ModuleType:
    """Import TensorFlow late and quietly (its C++ INFO lines would bury ours)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ModelError(f"TensorFlow is not installed ({e}): pip install 'mlsched[tf]', or run "
                         "a model with verified fast-path weights (no TensorFlow needed)") from None
    return tf


class DenseLayer(NamedTuple):
    kernel: np.ndarray  # [in, out]: h @ kernel
    bias: np.ndarray  # [out]
    activation: str  # a key of ACTIVATIONS


class NumpyModel:
    """The numpy backend: a Dense stack, float32 [n, 10] -> float32 [n] probabilities."""

    name, kind = "numpy", contract.Backend.NUMPY

    def __init__(self, layers: list[DenseLayer]) -> None:
        self.layers = [DenseLayer(np.asarray(la.kernel, np.float32),
                                  np.asarray(la.bias, np.float32), la.activation) for la in layers]
        self.nr_inputs = width = self.layers[0].kernel.shape[0] if layers else 0
        for la in self.layers:  # a mismatch fails here, not in the first batch
            if la.kernel.shape != (width, la.bias.size) or la.activation not in ACTIVATIONS:
                raise ValueError(f"layer {la.kernel.shape} + {la.bias.shape} {la.activation!r} "
                                 f"after width {width}")
            width = la.bias.size
        if width != 1:
            raise ValueError("a Dense stack ending in one unit is needed")

    @classmethod
    def load(cls, path: str | Path, *, verified: bool = False) -> NumpyModel:
        """The network of a model directory's fast-path file; verified: only while it is stamped
        for this very model (checked here too, not only by check_model_dir)."""
        path = Path(path)
        if verified and (reason := mc.fastpath_reason(path, mc.model_digest(path))):
            raise ModelError(f"cannot use the numpy backend: {reason}")
        return mc.read_fastpath(path, lambda npz: cls(
            [DenseLayer(npz[f"kernel_{i}"], npz[f"bias_{i}"], str(act))
             for i, act in enumerate(npz["activations"])]))

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.nr_inputs:
            raise ValueError(f"expected input [n, {self.nr_inputs}], got {list(h.shape)}")
        for la in self.layers:
            h = ACTIVATIONS[la.activation](h @ la.kernel + la.bias)
        return h.reshape(-1)


class TFBackend:
    """The SavedModel's serving signature, run by TensorFlow."""

    name, kind = "tf", contract.Backend.TF

    def __init__(self, path: str | Path, input_key: str = contract.MODEL_INPUT_KEY,
                 output_key: str | None = None) -> None:
        self._tf = import_tensorflow()
        self._loaded = self._tf.saved_model.load(str(path))  # the signature holds it weakly
        self._sig = self._loaded.signatures[mc.SIGNATURE_KEY]
        self._input_key = input_key
        self._output_key = output_key or next(iter(self._sig.structured_outputs))

    def predict(self, x: np.ndarray) -> np.ndarray:
        # By keyword: a positional call of a signature is up to 13x slower.
        x = self._tf.constant(np.asarray(x, dtype=np.float32))
        return self._sig(**{self._input_key: x})[self._output_key].numpy().reshape(-1)


def choose_backend(info: ModelInfo, want: str = "auto") -> tuple[str, str]:
    """Which backend serves a checked model, "numpy" or "tf", and why: want "auto" (numpy while
    the fast path is verified for this model, else tf), "tf" or "numpy"."""
    if want not in ("auto", "tf", "numpy"):
        raise ValueError(f"backend must be auto, tf or numpy, not {want!r}")
    if want == "numpy" or want == "auto" and info.fastpath_ok:
        return "numpy", f"verified fast-path weights (digest {info.digest[:8]})"
    return "tf", "requested" if want == "tf" else info.fastpath_reason


def open_backend(info: ModelInfo, want: str = "auto") -> tuple[Predictor, str]:
    """The backend choose_backend() picks, loaded, and why in one line (numpy: ModelError if
    the fast path is not verified)."""
    kind, why = choose_backend(info, want)
    if kind == "numpy":
        return NumpyModel.load(info.path, verified=True), f"numpy: {why}"
    return TFBackend(info.path, info.input_key, info.output_key), f"tf: {why}"
