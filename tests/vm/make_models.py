"""Build the models the VM tests need but cannot build themselves (TF imports slowly there).

Run on the host by `make vm-test` before the VM boots:

    python -m tests.vm.make_models build/test-models

- `nan_half`: a valid SavedModel that outputs NaN whenever src_dom_load >= 0.5 and a sigmoid
  otherwise, so it fails mid-run, only on busy-machine batches.
- `raise_half`: the same network with `tf.debugging.check_numerics`, so the backend raises
  an exception on those batches instead of returning NaN.
- `width5`: input [?, 5], which the loader must refuse before attaching.
- `always_migrate`, `always_keep`: Dense stacks whose output is a constant (a bias of ±8 into
  the sigmoid), exported with their verified numpy fast path: hot-reload tests switch
  between them and see the counters flip.
- `corrupt_variables`: the bundled model with one flipped bit in its variables data, which the
  loader must refuse before attaching: its mlsched_manifest.json no longer matches.

The two half-broken models get a manifest (written by the model tools' own write_manifest),
or the loader would refuse them for lacking one.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from loader import contract, schema
from loader.backends import import_tensorflow
from model_dir.export_verified import write_manifest

BUNDLED = Path(__file__).resolve().parents[2] / "model_dir" / "model_path"


def build(out: Path, name: str, raise_on_nan: bool) -> Path:
    tf = import_tensorflow()

    class HalfBroken(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.linspace(-1.0, 1.0, schema.NR_FEATURES)[:, None])

        @tf.function(input_signature=[
            tf.TensorSpec([None, schema.NR_FEATURES], tf.float32, name="features")])
        def serve(self, features):
            p = tf.sigmoid(tf.matmul(features, self.w))
            busy = features[:, 3:4] >= 0.5
            p = tf.where(busy, tf.constant(float("nan")), p)
            if raise_on_nan:
                p = tf.debugging.check_numerics(p, "model output")
            return {"output_0": p}

    path = out / name
    if path.exists():
        shutil.rmtree(path)
    model = HalfBroken()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})
    write_manifest(path)
    return path


def build_width5(out: Path) -> Path:
    """A SavedModel whose input is [?, 5]: the loader must refuse it."""
    tf = import_tensorflow()

    class Narrow(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones([5, 1]))

        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="features")])
        def serve(self, features):
            return {"output_0": tf.sigmoid(tf.matmul(features, self.w))}

    path = out / "width5"
    if path.exists():
        shutil.rmtree(path)
    model = Narrow()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})
    return path


def build_constant(out: Path, name: str, migrate: bool) -> Path:
    """10 -> 1 sigmoid with zero weights: always the same decision, numpy fast path verified."""
    import keras
    import numpy as np

    from model_dir.export_verified import export_verified, made_by

    inputs = keras.Input(shape=(schema.NR_FEATURES,), name=contract.MODEL_INPUT_KEY)
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([np.zeros((schema.NR_FEATURES, 1), np.float32),
                       np.array([8.0 if migrate else -8.0], np.float32)])
    path = out / name
    if path.exists():
        shutil.rmtree(path)
    export_verified(model, path, made_by("tests.vm.make_models", f"constant: always "
                                         f"{'migrate' if migrate else 'keep'}", trained=False))
    return path


def build_corrupt_variables(out: Path) -> Path:
    """The bundled model, one bit of its variables flipped after its manifest was written."""
    path = out / "corrupt_variables"
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(BUNDLED, path)
    data = path / "variables" / "variables.data-00000-of-00001"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to write the models into")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, raising in (("nan_half", False), ("raise_half", True)):
        print(f"make_models: {build(args.out, name, raising)}")
    print(f"make_models: {build_width5(args.out)}")
    print(f"make_models: {build_corrupt_variables(args.out)}")
    print(f"make_models: {build_constant(args.out, 'always_migrate', True)}")
    print(f"make_models: {build_constant(args.out, 'always_keep', False)}")


if __name__ == "__main__":
    main()
