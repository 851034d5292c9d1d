"""Build the models the VM tests need but cannot build themselves (TF imports slowly there).

Run on the host by `make vm-test` before the VM boots:

    python -m tests.vm.make_models build/test-models

- `nan_half`: a valid SavedModel that outputs NaN whenever src_dom_load >= 0.5 and a sigmoid
  otherwise, so it fails mid-run, only on busy-machine batches.
- `raise_half`: the same network with `tf.debugging.check_numerics`, so the backend raises
  an exception on those batches instead of returning NaN.
- `width5`: input [?, 5], which the loader must refuse before attaching.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from loader import contract
from loader.fastpath import import_tensorflow


def build(out: Path, name: str, raise_on_nan: bool) -> Path:
    tf = import_tensorflow()

    class HalfBroken(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.linspace(-1.0, 1.0, contract.NR_FEATURES)[:, None])

        @tf.function(input_signature=[
            tf.TensorSpec([None, contract.NR_FEATURES], tf.float32, name="features")])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to write the models into")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, raising in (("nan_half", False), ("raise_half", True)):
        print(f"make_models: {build(args.out, name, raising)}")
    print(f"make_models: {build_width5(args.out)}")


if __name__ == "__main__":
    main()
