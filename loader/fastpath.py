"""The verified fast path: a plain Dense stack run in numpy instead of TensorFlow.

NumpyModel runs assets/mlsched_fastpath.npz, which model_dir/fastpath_verify.py writes (with
TensorFlow, on the host) only when numpy and TF agree on every decision of a probe grid, stamped
with the digest of the model's files. check_model_dir() (loader/model_check.py) accepts the file
only while the digest still matches, so a model changed behind the manifest's back falls back to
TF, never to stale weights. Nothing here imports TensorFlow but import_tensorflow().
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from loader.model_check import FASTPATH_FILE, FASTPATH_VERSION, ModelError

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")


def import_tensorflow() -> ModuleType:
    """Import TensorFlow late and quietly (its C++ INFO lines would bury ours)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ModelError(f"TensorFlow is not installed ({e}): pip install 'mlsched[tf]', or run "
                         "a model with verified fast-path weights (no TensorFlow needed)") from None
    return tf


@dataclass(frozen=True)
class DenseLayer:
    kernel: np.ndarray  # float32 [in, out], C-contiguous: h @ kernel
    bias: np.ndarray  # float32 [out]
    activation: str  # one of ACTIVATIONS


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
