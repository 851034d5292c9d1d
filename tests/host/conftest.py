"""Shared host-test fixtures: small real models built once per session with TensorFlow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loader import schema
from loader.backends import import_tensorflow
from model_dir import create_dummy_model


@pytest.fixture(scope="session")
def tf():
    return import_tensorflow()


@pytest.fixture(scope="session")
def models(tmp_path_factory, tf) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def dummy(models) -> Path:
    """The dummy model made by the tool itself (export, fast path, check). Do not modify."""
    create_dummy_model.create(models / "dummy", seed=0)
    return models / "dummy"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _module_model(tf, path: Path, width: int, dtype) -> Path:
    """A SavedModel with one `features` input [?, width] of dtype, written with tf.Module."""

    class Model(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones([width, 1]))

        @tf.function(input_signature=[tf.TensorSpec([None, width], dtype, name="features")])
        def serve(self, features):
            x = tf.cast(features, tf.float32)
            return {"output_0": tf.sigmoid(tf.matmul(x, self.w))}

    model = Model()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})
    return path


def _keras_model(path: Path, kind: str, seed: int = 1) -> Path:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(schema.NR_FEATURES,), name="features")
    if kind == "swish":
        x = keras.layers.Dense(8, activation="swish")(inputs)
    elif kind == "square":
        x = keras.ops.square(keras.layers.Dense(8, activation="relu")(inputs))
    else:
        x = keras.layers.Dense(8, activation=kind)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    keras.Model(inputs, outputs).export(str(path), verbose=False)
    return path


@pytest.fixture(scope="session")
def width5(tf, models) -> Path:
    return _module_model(tf, models / "width5", 5, tf.float32)


@pytest.fixture(scope="session")
def int32(tf, models) -> Path:
    return _module_model(tf, models / "int32", schema.NR_FEATURES, tf.int32)


@pytest.fixture(scope="session", params=["swish", "square"])
def not_dense(request, models, tf) -> Path:
    return _keras_model(models / request.param, request.param)


@pytest.fixture(scope="session")
def tanh_stack(models, tf) -> Path:
    """A plain Dense stack exported without a fast path (tanh hidden layer)."""
    return _keras_model(models / "tanh", "tanh")


