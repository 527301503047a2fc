"""Train a small CNN and a one-layer transformer encoder on digits and export them (legacy).

    bash scripts/fixtures/env.sh torch && .venvs/torch/bin/python scripts/train_digits.py torch

Writes ``models/digits/torch_cnn`` and ``torch_encoder`` (``.onnx``, ``.sample.npz``, manifest
entry via ``common.save_fixture``) plus ``<name>.calib.npz`` and ``<name>.test.npz``: the model's
input array under its input name and ``labels``. The same recipes from other seeds
(``torch_cnn_seed1..3``, ``torch_encoder_seed1..2``: members for model fusion) share seed 0's
split, so they reuse its calib/test files. ``train_digits.py torch NAME...`` trains only those. Both models take a dynamic batch axis ``N``.
Trained deterministically on CPU in a few seconds; onnxruntime must agree with torch on the test
split (outputs within 1e-4, identical accuracy).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import digits_data  # noqa: E402
from common import MODELS, save_fixture  # noqa: E402
from export_torch import check_with_ort, export_legacy, randomize, seed_all, versions  # noqa: E402

FRAMEWORK = "digits"
DYNAMIC_BATCH = {"input": {0: "N"}, "output": {0: "N"}}
SAMPLE_SIZE = 4


class DigitsCNN(nn.Module):
    """[N,1,8,8] -> two Conv-BN-ReLU, MaxPool, Conv-ReLU, GAP, Linear-ReLU-Linear -> [N,10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitsEncoder(nn.Module):
    """[N,8,8]: image rows as 8 tokens -> Linear(8->32) + learned positions -> encoder layer
    -> mean over tokens -> Linear(32->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 8, 32))
        self.layer = nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x) + self.pos).mean(dim=1))


@dataclass(frozen=True)
class Spec:
    """How to build, shape the input for, train and export one digits model."""

    name: str
    factory: Callable[[], nn.Module]
    shape: Callable[[np.ndarray], np.ndarray]
    epochs: int
    lr: float
    opset: int
    min_accuracy: float
    seed: int = 0

    @property
    def split_name(self) -> str:
        """The model whose calib/test files this one reads: seeds share seed 0's split files."""
        return self.name.split("_seed")[0]


def cnn_spec(seed: int = 0) -> Spec:
    """The digits CNN trained from ``seed`` (named ``torch_cnn_seed<k>`` past seed 0)."""
    name = "torch_cnn" if seed == 0 else f"torch_cnn_seed{seed}"
    return Spec(name, DigitsCNN, lambda images: images[:, None], 30, 3e-3, 20, 0.95, seed)


def encoder_spec(seed: int = 0) -> Spec:
    """The digits encoder trained from ``seed`` (named ``torch_encoder_seed<k>`` past seed 0)."""
    name = "torch_encoder" if seed == 0 else f"torch_encoder_seed{seed}"
    return Spec(name, DigitsEncoder, lambda images: images, 60, 2e-3, 17, 0.90, seed)


SEEDS = (1, 2, 3)
"""Extra seeds of each architecture (same split, same recipe): members for model fusion."""

SPECS = (
    cnn_spec(),
    encoder_spec(),
    *(cnn_spec(s) for s in SEEDS),
    *(encoder_spec(s) for s in SEEDS[:2]),
)


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int = 0
) -> nn.Module:
    """Adam on cross-entropy, mini-batches of 64 in a seeded order; returns the model in eval."""
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[idx]), labels[idx])
            loss.backward()
            optimizer.step()
    return model.eval()


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Torch logits for a batch, eval mode, no grad."""
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of argmax predictions equal to the labels."""
    return float(np.mean(logits.argmax(axis=1) == labels))


def ort_predict(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime (CPU) logits for a batch."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def save_split(name: str, kind: str, x: np.ndarray, labels: np.ndarray) -> None:
    """``models/digits/<name>.<kind>.npz`` with ``input`` (model-shaped) and ``labels``."""
    np.savez(MODELS / FRAMEWORK / f"{name}.{kind}.npz", input=x, labels=labels)


def build_and_export(spec: Spec, splits: tuple[tuple[np.ndarray, np.ndarray], ...]) -> dict:
    """Train, export (legacy, dynamic batch), check in ORT, write sample/calib/test files."""
    (train_x, train_y), (calib_x, calib_y), (test_x, test_y) = (
        (spec.shape(images), labels) for images, labels in splits
    )
    seed_all(spec.seed)
    model = train(randomize(spec.factory()), train_x, train_y, spec.epochs, spec.lr, spec.seed)
    torch_logits = predict(model, test_x)
    torch_acc = accuracy(torch_logits, test_y)
    if torch_acc < spec.min_accuracy:
        raise AssertionError(f"{spec.name}: test accuracy {torch_acc:.3f} < {spec.min_accuracy}")

    sample = test_x[:SAMPLE_SIZE]
    onnx_model = export_legacy(
        model, torch.from_numpy(sample), opset_version=spec.opset, dynamic_axes=DYNAMIC_BATCH
    )
    notes = {
        "torch_test_accuracy": round(torch_acc, 4),
        "train": f"Adam lr={spec.lr}, {spec.epochs} epochs, batch 64, seed {spec.seed}",
        "input": f"[N,{','.join(map(str, test_x.shape[1:]))}] float32 in [0,1]",
    }
    if spec.split_name != spec.name:
        notes["data"] = (
            f"same split as {spec.split_name}: use {spec.split_name}.calib.npz and "
            f"{spec.split_name}.test.npz (no files of its own)"
        )
    path = save_fixture(
        FRAMEWORK,
        spec.name,
        onnx_model,
        {"input": sample},
        {"output": predict(model, sample)},
        exporter=f"torch.onnx.export(dynamo=False, opset_version={spec.opset}, dynamic_axes)",
        versions=versions(),
        notes=json.dumps(notes),
    )
    sample_diff = check_with_ort(path, {"input": sample}, predict(model, sample))
    test_diff = check_with_ort(path, {"input": test_x}, torch_logits)
    ort_acc = accuracy(ort_predict(path, test_x), test_y)
    if ort_acc != torch_acc:
        raise AssertionError(f"{spec.name}: ORT accuracy {ort_acc} != torch {torch_acc}")
    if spec.split_name == spec.name:
        save_split(spec.name, "calib", calib_x, calib_y)
        save_split(spec.name, "test", test_x, test_y)
    return {
        "name": spec.name,
        "torch_acc": torch_acc,
        "ort_acc": ort_acc,
        "max_diff": max(sample_diff, test_diff),
        "nodes": len(onnx_model.graph.node),
    }


def main(names: list[str] | None = None) -> None:
    """Train and export the digits models named (all when none); print accuracies (torch vs
    onnxruntime). An unknown name is an error listing the known ones."""
    specs = [s for s in SPECS if not names or s.name in names]
    unknown = sorted(set(names or []) - {s.name for s in SPECS})
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {[s.name for s in SPECS]}")
    torch.set_num_threads(1)
    splits = digits_data.split()
    (MODELS / FRAMEWORK).mkdir(parents=True, exist_ok=True)
    rows = [build_and_export(spec, splits) for spec in specs]
    print(f"{'name':<15}{'nodes':>6}{'torch acc':>11}{'ort acc':>9}  max|ort-torch|")
    for r in rows:
        print(
            f"{r['name']:<15}{r['nodes']:>6}{r['torch_acc']:>11.4f}{r['ort_acc']:>9.4f}"
            f"  {r['max_diff']:.2e}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
