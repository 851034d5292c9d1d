"""Model backends: the same predict() over TensorFlow or over the verified numpy fast path.

open_backend() is called after the scheduler is attached. It picks numpy whenever the model
directory carries fast-path weights verified for exactly its current files, so in the VM the
loader never imports TensorFlow (72 s under TCG); otherwise it imports TF here, lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from loader import contract
from loader.fastpath import NumpyModel, import_tensorflow
from loader.model_check import SIGNATURE_KEY, ModelError, ModelInfo, model_digest

BACKEND_CHOICES = ("auto", "tf", "numpy")


class Predictor(Protocol):
    name: str
    kind: contract.Backend

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, 10] features -> float32 [n] migrate probabilities."""
        ...


class TFBackend:
    name = "tf"
    kind = contract.Backend.TF

    def __init__(
        self,
        path: str | Path,
        input_key: str = contract.MODEL_INPUT_KEY,
        output_key: str | None = None,
    ) -> None:
        tf = import_tensorflow()
        self._tf = tf
        # Keep the loaded object: the signature holds its variables only weakly.
        self._loaded = tf.saved_model.load(str(path))
        self._sig = self._loaded.signatures[SIGNATURE_KEY]
        self._input_key = input_key
        self._output_key = output_key or next(iter(self._sig.structured_outputs))

    def predict(self, x: np.ndarray) -> np.ndarray:
        # By keyword: a positional call of a signature is up to 13x slower.
        x = self._tf.constant(np.asarray(x, dtype=np.float32))
        out = self._sig(**{self._input_key: x})[self._output_key]
        return out.numpy().reshape(-1)


class NumpyBackend:
    name = "numpy"
    kind = contract.Backend.NUMPY

    def __init__(self, path: str | Path) -> None:
        self.model = NumpyModel.load(path)
        # Checked again here, not only in check_model_dir: never run weights of another model.
        if self.model.meta.get("digest") != model_digest(Path(path)):
            raise ModelError(
                f"fast-path weights in {path} are stale: the model changed after verification "
                f"(run model_dir/verify_model.py {path})"
            )

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)


def open_backend(info: ModelInfo, want: str = "auto") -> tuple[Predictor, str]:
    """The backend for a checked model and one line saying why it was chosen.

    want: "auto" (numpy when verified fast-path weights match the model, else tf), "tf", or
    "numpy" (ModelError when the fast path is not verified for this model).
    """
    if want not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, not {want!r}")
    if want == "tf":
        return TFBackend(info.path, info.input_key, info.output_key), "tf: requested"
    if info.fastpath_ok:
        backend = NumpyBackend(info.path)
        return backend, f"numpy: verified fast-path weights (digest {info.digest[:8]})"
    if want == "numpy":
        raise ModelError(f"cannot use the numpy backend: {info.fastpath_reason}")
    return TFBackend(info.path, info.input_key, info.output_key), f"tf: {info.fastpath_reason}"
