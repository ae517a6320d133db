"""Train the small CNN shipped in models/ on scikit-learn's digits, export it to ONNX.

Real data a package ships (1,797 8x8 handwritten digits), a fixed seed and a fixed split, so
the committed ``digits_cnn.onnx`` can be rebuilt. Writes:
  models/digits_cnn.onnx   the model (input "image" [N,1,8,8] float32 -> "logits" [N,10])
  models/digits_test.npz   the held-out test split: "image" (the model input) and "label"

Run: python models/train_digits.py   (needs torch, scikit-learn, onnxscript)
     python models/train_digits.py --eval models/digits_cnn.onnx digits_small.onnx
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return train_test_split(
        images, digits.target.astype(np.int64), test_size=0.2, random_state=SEED
    )


def build_model():
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(epochs: int = 30) -> None:
    import torch

    x_train, x_test, y_train, y_test = load_split()
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"torch test accuracy: {acc:.4f} on {len(y_test)} held-out digits")
    out = HERE / "digits_cnn.onnx"
    export(model, x_test[:2], "image", "logits", out)
    np.savez(HERE / "digits_test.npz", image=x_test, label=y_test)
    print(f"onnx test accuracy: {accuracy(out):.4f}; wrote {out}")


def export(model, sample: np.ndarray, input_name: str, output_name: str, path: Path) -> None:
    """torch.onnx.export (dynamo) of a one-input model with a dynamic batch axis."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (torch.from_numpy(sample),),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes={"input": {0: batch}},
        dynamo=True,
        optimize=False,
    )
    program.save(str(path))


def accuracy(onnx_path: str | Path, data: str | Path = HERE / "digits_test.npz") -> float:
    """Top-1 accuracy of an ONNX digits model on the committed test split."""
    import onnxruntime as ort

    with np.load(data) as arrays:
        images, labels = arrays["image"], arrays["label"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float((logits.argmax(1) == labels).mean())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Train the digits CNN, or --eval ONNX files on its test split."
    )
    parser.add_argument(
        "--eval", nargs="+", metavar="MODEL", help="print test accuracy of these models"
    )
    args = parser.parse_args()
    if args.eval:
        for path in args.eval:
            print(f"{path}: test accuracy {accuracy(path):.4f}")
    else:
        train()
