"""Write the Keras 2 .h5 test files (keras2_dense.h5, keras2_lambda.h5) with tf_keras.

The project's venv has Keras 3 only. tf_keras (Keras 2) installs without pulling the full
`tensorflow` package when pip is told not to follow dependencies; it then runs on the venv's
tensorflow-cpu. The files are committed, so this runs only to change them:

    .venv/bin/pip install --no-deps --target /tmp/tfk tf-keras==2.21.0
    PYTHONPATH=/tmp/tfk .venv/bin/python tests/host/data/make_keras2_h5.py

keras2_dense.h5: a Sequential Dense stack (input named `dense_input`, as Keras 2 names it),
with 16 probe inputs and tf_keras' own outputs stored as root attributes `probe_x`/`probe_y`.
keras2_lambda.h5: a model with a Lambda layer, which transfer.py must refuse.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tf_keras  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    tf_keras.utils.set_random_seed(2)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Dense(8, activation="relu", input_shape=(10,)),
            tf_keras.layers.Dense(4, activation="tanh"),
            tf_keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (16, 10)).astype(np.float32)
    x[:, 5:] = 0  # reserved features
    y = model.predict(x, verbose=0)
    dense = HERE / "keras2_dense.h5"
    model.save(dense, save_format="h5")
    with h5py.File(dense, "a") as f:
        f.attrs["probe_x"] = x
        f.attrs["probe_y"] = y

    inputs = tf_keras.Input(shape=(10,), name="features")
    doubled = tf_keras.layers.Lambda(lambda t: t * 2.0, name="doubled")(inputs)
    outputs = tf_keras.layers.Dense(1, activation="sigmoid")(doubled)
    tf_keras.Model(inputs, outputs).save(HERE / "keras2_lambda.h5", save_format="h5")
    print(f"tf_keras {tf_keras.__version__}: wrote {dense.name}, keras2_lambda.h5")


if __name__ == "__main__":
    main()
