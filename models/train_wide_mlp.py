"""An over-parameterised dense model on real data a package ships, for the factorization
benchmark: a wide MLP (64 -> 2048 -> 2048 -> 10, 4.35 M parameters, softmax output) trained
on scikit-learn's digits (1,797 8x8 handwritten digits; 64 features), where low rank is real:
the hidden activations of 64 input features span few directions.

Fixed seed, fixed split: train 60 %, calibration 20 % (what onnxsqueeze's --data sees),
held-out test 20 % (never shown to it). Writes into the git-ignored corpus cache:
  .corpus/wide_mlp/model.onnx       input "x" [N, 64] float32 -> "probs" [N, 10]
  .corpus/wide_mlp/calib/NNNN.npz   one calibration sample (batch 8) per file
  .corpus/wide_mlp/test.npz         "x" and "label" of the held-out split

Run: python models/train_wide_mlp.py   (needs torch, scikit-learn)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import export  # noqa: E402

import corpus  # noqa: E402

SEED = 0
WIDTH = 2048


def out_dir() -> Path:
    return corpus.corpus_dir() / "wide_mlp"


def load_split() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=SEED)
    x_calib, x_test, y_calib, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=SEED
    )
    return x_train, y_train, x_calib, y_calib, x_test, y_test


def build(epochs: int = 40) -> Path:
    """Train (if not already built) and return the model's path."""
    from torch import nn

    def body() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
            nn.Linear(WIDTH, 10),
        )  # fmt: skip

    return train_digits_model(out_dir(), body, (64,), epochs, "wide MLP")


def train_digits_model(folder: Path, make_body, shape: tuple[int, ...], epochs: int, label: str):
    """Train ``make_body()`` (+ softmax) on the digits split, each image reshaped to
    ``shape``; write the model, calibration samples (batch 8) and the held-out split into
    ``folder`` (once: an existing build is reused). Returns the model's path."""
    path = folder / "model.onnx"
    if path.is_file() and (folder / "test.npz").is_file():
        return path
    import torch
    from torch import nn

    x_train, y_train, x_calib, _, x_test, y_test = load_split()
    x_train, x_calib, x_test = (a.reshape(-1, *shape) for a in (x_train, x_calib, x_test))
    torch.manual_seed(SEED)
    body = make_body()
    opt = torch.optim.Adam(body.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        body.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(body(xt[idx]), yt[idx]).backward()
            opt.step()
    body.eval()
    model = nn.Sequential(body, nn.Softmax(dim=-1))
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"{label}: {sum(p.numel() for p in body.parameters())} parameters, "
          f"torch test accuracy {acc:.4f} on {len(y_test)} held-out digits")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    calib = folder / "calib"
    calib.mkdir(exist_ok=True)
    for index in range(0, len(x_calib) - 7, 8):
        np.savez(calib / f"{index // 8:04d}.npz", x=x_calib[index : index + 8])
    np.savez(folder / "test.npz", x=x_test, label=y_test)
    export(model, x_test[:2], "x", "probs", path)
    return path


def accuracy(onnx_path: str | Path, folder: Path | None = None) -> float:
    """Top-1 accuracy of a digits ONNX model (the wide MLP's by default) on the held-out
    split written next to it."""
    import onnxruntime as ort

    with np.load((folder or out_dir()) / "test.npz") as arrays:
        x, labels = arrays["x"], arrays["label"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"x": x})[0].argmax(1) == labels).mean())


if __name__ == "__main__":
    print(f"wrote {build()}; onnx test accuracy {accuracy(out_dir() / 'model.onnx'):.4f}")
