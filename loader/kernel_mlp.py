"""--inference kernel: the model's Dense stack in the fixed point the scheduler evaluates.

quantize() turns the verified numpy fast path (the same weights TensorFlow runs) into
struct mlsched_mlp; QuantizedMlp.decide() is the exact integer mirror of mlp_decide() in
bpf/mlsched_mlp.h, so the loader can check, before enabling, that the kernel will agree with
the float model, and tests can check that the kernel computed what Python says.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from loader import contract, schema
from loader.fastpath import NumpyModel
from loader.model_check import ModelError

ONE = 1 << contract.MLP_FRAC_BITS
S32_MIN, S32_MAX = -(1 << 31), (1 << 31) - 1
# Weights beyond +-256 are clamped: with activations within s32 the s64 sums cannot overflow.
WEIGHT_LIMIT = 256 * ONE
MIN_AGREEMENT = 0.999  # of the grid's keys, with the float model, or --inference kernel refuses


@dataclass
class QuantizedMlp:
    weights: list[np.ndarray]  # int64 [n_in, n_out] per layer, Q16.16
    biases: list[np.ndarray]  # int64 [n_out]
    acts: list[contract.MlpAct]
    out_rule: contract.MlpOut

    def decide(self, keys: np.ndarray) -> np.ndarray:
        """Migrate? for packed keys, with mlp_decide()'s integer arithmetic."""
        keys = np.asarray(keys, dtype=np.uint64)
        f = np.uint64(contract.KEY_FIELD_MAX)
        h = np.zeros((len(keys), self.weights[0].shape[0]), dtype=np.int64)
        h[:, 0] = (keys >> np.uint64(contract.KEY_CPU_SHIFT)).astype(np.int64) << 16
        h[:, 1] = ((keys >> np.uint64(contract.KEY_IDLE_SHIFT)) & f).astype(np.int64) << 16
        h[:, 2] = ((keys >> np.uint64(contract.KEY_NOT_IDLE_SHIFT)) & f).astype(np.int64) << 16
        h[:, 3] = ((keys >> np.uint64(contract.KEY_SRC_SHIFT)) & f).astype(np.int64) << 12
        h[:, 4] = ((keys >> np.uint64(contract.KEY_DST_SHIFT)) & f).astype(np.int64) << 12
        for w, b, act in zip(self.weights, self.biases, self.acts, strict=True):
            h = np.clip((h @ w >> contract.MLP_FRAC_BITS) + b, S32_MIN, S32_MAX)
            if act == contract.MlpAct.RELU:
                np.maximum(h, 0, out=h)
        z = h[:, 0]
        if self.out_rule == contract.MlpOut.LINEAR:
            return z > ONE // 2
        return z > 0

    def to_struct(self, generation: int) -> contract.Mlp:
        m = contract.Mlp()
        m.generation = generation
        m.nr_layers = len(self.weights)
        m.out_rule = int(self.out_rule)
        for li, (w, b, act) in enumerate(zip(self.weights, self.biases, self.acts, strict=True)):
            m.nr_in[li], m.nr_out[li] = w.shape
            m.act[li] = int(act)
            full = np.zeros((contract.MLP_MAX_UNITS, contract.MLP_MAX_UNITS), np.int32)
            full[: w.shape[0], : w.shape[1]] = w
            ctypes.memmove(ctypes.addressof(m.weight[li]), full.tobytes(), full.nbytes)
            for j, v in enumerate(b.tolist()):
                m.bias[li][j] = v
        return m


def _q(a: np.ndarray, limit: int) -> np.ndarray:
    return np.clip(np.rint(np.asarray(a, np.float64) * ONE), -limit, limit).astype(np.int64)


def quantize(model: NumpyModel) -> QuantizedMlp:
    """The fixed-point network; ModelError (one line) when the kernel cannot run this stack."""
    layers = model.layers
    if len(layers) > contract.MLP_MAX_LAYERS:
        raise ModelError(f"--inference kernel: {len(layers)} Dense layers, the kernel runs at "
                         f"most {contract.MLP_MAX_LAYERS}")
    widths = [layers[0].kernel.shape[0]] + [la.kernel.shape[1] for la in layers]
    if max(widths) > contract.MLP_MAX_UNITS or layers[-1].kernel.shape[1] != 1:
        raise ModelError(f"--inference kernel: layer widths {widths}: at most "
                         f"{contract.MLP_MAX_UNITS} units, one output")
    acts = []
    for la in layers[:-1]:
        if la.activation not in ("relu", "linear"):
            raise ModelError(f"--inference kernel: hidden activation {la.activation!r}: the "
                             "kernel runs relu and linear only")
        acts.append(contract.MlpAct.RELU if la.activation == "relu" else contract.MlpAct.LINEAR)
    last = layers[-1].activation
    if last not in ("sigmoid", "linear"):
        raise ModelError(f"--inference kernel: output activation {last!r}: sigmoid or linear")
    acts.append(contract.MlpAct.LINEAR)  # the sigmoid itself is folded into the z > 0 test
    return QuantizedMlp(
        weights=[_q(la.kernel, WEIGHT_LIMIT) for la in layers],
        biases=[_q(la.bias, S32_MAX) for la in layers],
        acts=acts,
        out_rule=contract.MlpOut.LOGIT if last == "sigmoid" else contract.MlpOut.LINEAR,
    )


def agreement(q: QuantizedMlp, model: NumpyModel, keys: np.ndarray) -> float:
    """Share of keys on which the fixed-point and the float network decide alike."""
    if not len(keys):
        return 1.0
    want = model.predict(contract.unpack_keys(keys)).reshape(-1) > contract.MIGRATE_THRESHOLD
    return float(np.mean(q.decide(keys) == want))


class KernelBackend:
    """What the stats call the model under --inference kernel (it runs in the scheduler)."""

    name = "kernel"
    kind = contract.Backend.KERNEL

    def __init__(self, q: QuantizedMlp) -> None:
        self.q = q

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The kernel's own answers (1.0 migrate, 0.0 keep), for the rare key that reaches user
        space while no weights serve (a reload's switch)."""
        x = np.rint(np.asarray(x, dtype=np.float64) * [1, 1, 1, contract.LOAD_SCALE,
                                                        contract.LOAD_SCALE, 0, 0, 0, 0, 0])
        return self.q.decide(contract.pack_keys(*x[:, :5].T)).astype(np.float32)


SAMPLE_KEYS = 1 << 20  # keys checked when the machine's grid is larger than this


def machine_keys(nr_cpus: int, dom_cpus: int) -> np.ndarray:
    """Every key this machine can produce, or a deterministic sample of SAMPLE_KEYS of them."""
    size = contract.grid_size(nr_cpus, dom_cpus)
    if size <= SAMPLE_KEYS:
        return contract.grid_keys(nr_cpus, dom_cpus)
    idx = np.unique(np.random.default_rng(0).integers(0, size, SAMPLE_KEYS))
    return schema.grid_keys_at(idx, nr_cpus, dom_cpus)


def prepare(path: object, nr_cpus: int, dom_cpus: int) -> QuantizedMlp:
    """The fixed-point network of a checked model directory, refused (ModelError, one line)
    when it agrees with the float model on fewer than MIN_AGREEMENT of the machine's keys."""
    try:
        model = NumpyModel.load(path)  # type: ignore[arg-type]
    except ModelError as e:
        raise ModelError(f"--inference kernel needs the verified numpy fast path: {e}") from None
    q = quantize(model)
    keys = machine_keys(nr_cpus, dom_cpus)
    share = agreement(q, model, keys)
    if share < MIN_AGREEMENT:
        raise ModelError(f"--inference kernel: the fixed-point network agrees with the model on "
                         f"{share:.3%} of {len(keys)} keys, under {MIN_AGREEMENT:.1%}")
    return q
