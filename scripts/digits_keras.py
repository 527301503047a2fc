"""Train a small Keras CNN on scikit-learn's digits and export it with tf2onnx to models/digits/.

    bash scripts/fixtures/env.sh tf && .venvs/tf/bin/python scripts/train_digits.py keras

Writes ``keras_cnn.onnx`` + ``keras_cnn.sample.npz`` (first 4 test images, Keras outputs) and
its ``MANIFEST.json`` entry via ``common.save_fixture``, plus ``keras_cnn.calib.npz`` and
``keras_cnn.test.npz`` (images [N, 8, 8, 1] keyed by the ONNX input name, and ``labels``).
NHWC input ``input`` with a dynamic batch, opset 17. The test accuracy of Keras and of
onnxruntime on the exported file are printed and must agree. ``keras_cnn_seed1`` is the same
recipe from seed 1 (a member for model fusion): same split, so it reuses ``keras_cnn``'s
calib/test files. ``train_digits.py keras NAME...`` trains only those.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

import export_tf  # noqa: E402  (sets the TF environment before TensorFlow is imported)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from common import MODELS  # noqa: E402
from digits_data import split  # noqa: E402

NAME = "keras_cnn"
FRAMEWORK = "digits"
EPOCHS = 30
BATCH = 32
LEARNING_RATE = 3e-3
MIN_ACCURACY = 0.95
SAMPLE = 4
SEEDS = {NAME: 0, f"{NAME}_seed1": 1}
"""Every model this script makes, by name, with its training seed."""


def build_model() -> keras.Model:
    """Conv-BN-ReLU x2, MaxPool, depthwise-BN-ReLU, 1x1 conv, GAP, Dense 64, Dense 10 (logits)."""
    inp = keras.Input((8, 8, 1), name=export_tf.INPUT)
    x = export_tf.conv_bn_relu(inp, 16, "c1")
    x = export_tf.conv_bn_relu(x, 32, "c2")
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw_conv")(x)
    x = keras.layers.ReLU(name="dw_relu")(keras.layers.BatchNormalization(name="dw_bn")(x))
    x = keras.layers.Conv2D(32, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    return keras.Model(inp, keras.layers.Dense(10, name="fc2")(x), name="digits_cnn")


def train(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> keras.Model:
    """Seeded Adam training on NHWC images; returns the model (use it in inference mode)."""
    export_tf.seed_all(seed)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images, labels, batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=0)
    return model


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits [N, 10] against integer labels."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def ort_logits(path: Path, input_name: str, images: np.ndarray) -> np.ndarray:
    """Logits of the exported file in onnxruntime (CPU) for a whole batch."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: images})[0]


def save_split(path: Path, input_name: str, images: np.ndarray, labels: np.ndarray) -> None:
    """``np.savez`` of NHWC images keyed by the ONNX input name, plus ``labels``."""
    np.savez(path, **{input_name: images, "labels": labels})


def main(names: list[str] | None = None) -> None:
    """Train and export the models named (all of :data:`SEEDS` when none)."""
    unknown = sorted(set(names or []) - set(SEEDS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {list(SEEDS)}")
    for name, seed in SEEDS.items():
        if not names or name in names:
            build_and_export(name, seed)


def build_and_export(name: str, seed: int) -> None:
    """Train, export, save sample (and, for seed 0, calib/test splits), and check Keras vs
    onnxruntime accuracy."""
    (x_train, y_train), (x_calib, y_calib), (x_test, y_test) = (
        (images[..., None], labels) for images, labels in split()
    )
    model = train(x_train, y_train, seed)
    keras_acc = accuracy(export_tf.keras_outputs(model, x_test), y_test)
    if keras_acc < MIN_ACCURACY:
        raise AssertionError(f"{name}: Keras test accuracy {keras_acc:.4f} < {MIN_ACCURACY}")

    proto = export_tf.export_keras(model, (None, 8, 8, 1))
    input_name = proto.graph.input[0].name
    sample = x_test[:SAMPLE]
    notes: dict[str, object] = {
        "keras_test_accuracy": round(keras_acc, 4),
        "test_images": len(y_test),
        "training": f"Adam({LEARNING_RATE}), {EPOCHS} epochs, batch {BATCH}, seed {seed}",
        "input": "NHWC [N, 8, 8, 1] in [0, 1]; dynamic batch; sample = first 4 test images",
    }
    if name != NAME:
        notes["data"] = (
            f"same split as {NAME}: use {NAME}.calib.npz and {NAME}.test.npz (no files of its own)"
        )
    path = export_tf.save_and_check(
        FRAMEWORK, name, proto, sample, export_tf.keras_outputs(model, sample), json.dumps(notes)
    )
    if name == NAME:
        save_split(MODELS / FRAMEWORK / f"{NAME}.calib.npz", input_name, x_calib, y_calib)
        save_split(MODELS / FRAMEWORK / f"{NAME}.test.npz", input_name, x_test, y_test)

    onnx_acc = accuracy(ort_logits(path, input_name, x_test), y_test)
    print(
        f"{name}: test accuracy keras {keras_acc:.4f}, onnxruntime {onnx_acc:.4f} "
        f"({len(y_test)} images)"
    )
    if onnx_acc != keras_acc:
        raise AssertionError(f"onnxruntime accuracy {onnx_acc:.4f} != Keras {keras_acc:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
