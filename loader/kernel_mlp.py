"""--inference kernel: the fast path's Dense stack in the scheduler's Q16.16 fixed point.

QuantizedMlp.decide() is the exact integer mirror of mlp_decide() (bpf/mlsched_mlp.h): the
loader checks before enabling that the kernel agrees with the float model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loader import contract, schema
from loader.backends import NumpyModel
from loader.contract import MLP_MAX_LAYERS, MLP_MAX_UNITS, MlpAct, MlpOut
from loader.model_check import ModelError

FRAC = contract.MLP_FRAC_BITS
S32_MAX = (1 << 31) - 1
WEIGHT_LIMIT = 256 << FRAC  # with s32 activations the s64 sums cannot overflow
MIN_AGREEMENT = 0.999  # of the machine's keys, with the float model
SAMPLE_KEYS = 1 << 20  # keys checked when the machine's grid is larger


def _q(a: np.ndarray, limit: int) -> np.ndarray:
    return np.clip(np.rint(np.asarray(a, np.float64) * (1 << FRAC)), -limit, limit).astype(int)


class QuantizedMlp:
    """A Dense stack in Q16.16; ModelError (one line) when the kernel cannot run it."""

    def __init__(self, model: NumpyModel) -> None:
        layers, acts = model.layers, [la.activation for la in model.layers]
        what = "--inference kernel:"
        widths = [model.nr_inputs] + [la.bias.size for la in layers]
        if len(layers) > MLP_MAX_LAYERS:
            raise ModelError(f"{what} {len(layers)} Dense layers, the kernel runs at most "
                             f"{MLP_MAX_LAYERS}")
        if max(widths) > MLP_MAX_UNITS or widths[-1] != 1:
            raise ModelError(f"{what} layer widths {widths}: at most {MLP_MAX_UNITS} units, one "
                             "output")
        if bad := [a for a in acts[:-1] if a not in ("relu", "linear")]:
            raise ModelError(f"{what} hidden activation {bad[0]!r}: the kernel runs relu and "
                             "linear only")
        if acts[-1] not in ("sigmoid", "linear"):
            raise ModelError(f"{what} output activation {acts[-1]!r}: sigmoid or linear")
        self.weights = [_q(la.kernel, WEIGHT_LIMIT) for la in layers]  # int64 [n_in, n_out]
        self.biases = [_q(la.bias, S32_MAX) for la in layers]  # int64 [n_out]
        # The output layer's is LINEAR: its sigmoid is folded into the z > 0 test.
        self.acts = [MlpAct.RELU if a == "relu" else MlpAct.LINEAR for a in acts]
        self.out_rule = MlpOut.LOGIT if acts[-1] == "sigmoid" else MlpOut.LINEAR

    def decide(self, keys: np.ndarray) -> np.ndarray:
        """Migrate? for packed keys, with mlp_decide()'s integer arithmetic."""
        fields = schema.key_fields(keys)
        h = np.zeros((len(fields["cpu"]), self.weights[0].shape[0]), dtype=np.int64)
        for i, f in enumerate(schema.KEY_FIELDS):  # the model input field / scale, in Q16.16
            h[:, i] = (fields[f.name].astype(np.int64) << FRAC) // f.scale
        for w, b, act in zip(self.weights, self.biases, self.acts, strict=True):
            low = 0 if act == MlpAct.RELU else -S32_MAX - 1  # relu: a clip at 0
            h = np.clip((h @ w >> FRAC) + b, low, S32_MAX)
        return h[:, 0] > ((1 << FRAC) // 2 if self.out_rule == MlpOut.LINEAR else 0)

    def to_struct(self, generation: int) -> contract.Mlp:
        m = contract.Mlp(generation=generation, nr_layers=len(self.weights), out_rule=self.out_rule)
        weight, bias = np.ctypeslib.as_array(m.weight), np.ctypeslib.as_array(m.bias)
        for li, (w, b, act) in enumerate(zip(self.weights, self.biases, self.acts, strict=True)):
            (m.nr_in[li], m.nr_out[li]), m.act[li] = w.shape, int(act)
            weight[li, : w.shape[0], : w.shape[1]], bias[li, : len(b)] = w, b
        return m


def agreement(q: QuantizedMlp, model: NumpyModel, keys: np.ndarray) -> float:
    """Share of keys on which the fixed-point and the float network decide alike."""
    want = model.predict(schema.unpack_keys(keys)) > contract.MIGRATE_THRESHOLD
    return float(np.mean(q.decide(keys) == want)) if len(keys) else 1.0


class KernelBackend:
    """The model under --inference kernel, for the stats, and for the rare key that reaches
    user space while no weights serve (a reload's switch): the kernel's own answers."""

    name, kind = "kernel", contract.Backend.KERNEL

    def __init__(self, q: QuantizedMlp) -> None:
        self.q = q

    def predict(self, x: np.ndarray) -> np.ndarray:
        keys = schema.pack_columns(schema.fields_of_features(np.asarray(x, np.float64)))
        return self.q.decide(keys).astype(np.float32)


def prepare(path: Path, nr_cpus: int, dom_cpus: int) -> QuantizedMlp:
    """The fixed-point network of a checked model directory; ModelError (one line) when it
    agrees with the float model on fewer than MIN_AGREEMENT of the machine's keys (or of a
    deterministic sample of SAMPLE_KEYS of them)."""
    try:
        model = NumpyModel.load(path)
    except ModelError as e:
        raise ModelError(f"--inference kernel needs the verified numpy fast path: {e}") from None
    q, size = QuantizedMlp(model), schema.grid_size(nr_cpus, dom_cpus)
    idx = np.arange(size) if size <= SAMPLE_KEYS else np.unique(
        np.random.default_rng(0).integers(0, size, SAMPLE_KEYS))
    keys = schema.grid_keys(nr_cpus, dom_cpus, idx)
    if (share := agreement(q, model, keys)) < MIN_AGREEMENT:
        raise ModelError(f"--inference kernel: the fixed-point network agrees with the model on "
                         f"{share:.3%} of {len(keys)} keys, under {MIN_AGREEMENT:.1%}")
    return q
