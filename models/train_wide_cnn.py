"""An over-parameterised CNN on real data a package ships, for the pruning benchmark: wide
convolutions (1 -> 128 -> 256 channels, a residual block of two 256-channel convolutions,
BatchNorm and ReLU throughout, global average pooling, a linear classifier; 1.5 M
parameters) trained on scikit-learn's digits as 8x8 images. Far more channels than 1,797
digits need: what structured pruning should find and remove.

Same fixed split as the wide MLP (models/train_wide_mlp.py): train 60 %, calibration 20 %,
held-out test 20 %. Writes into the git-ignored corpus cache:
  .corpus/wide_cnn/model.onnx       input "x" [N, 1, 8, 8] float32 -> "probs" [N, 10]
  .corpus/wide_cnn/calib/NNNN.npz   one calibration sample (batch 8) per file
  .corpus/wide_cnn/test.npz         "x" and "label" of the held-out split

Run: python models/train_wide_cnn.py   (needs torch, scikit-learn)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_wide_mlp import accuracy, train_digits_model  # noqa: E402

import corpus  # noqa: E402

WIDTH = 256


def out_dir() -> Path:
    return corpus.corpus_dir() / "wide_cnn"


def build(epochs: int = 15) -> Path:
    """Train (if not already built) and return the model's path."""
    from torch import nn

    def unit(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*unit(WIDTH, WIDTH), nn.ReLU(), *unit(WIDTH, WIDTH))

        def forward(self, x):
            return (self.body(x) + x).relu()

    def body() -> nn.Module:
        return nn.Sequential(
            *unit(1, 128), nn.ReLU(), *unit(128, WIDTH), nn.ReLU(), Residual(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, 10),
        )  # fmt: skip

    return train_digits_model(out_dir(), body, (1, 8, 8), epochs, "wide CNN")


if __name__ == "__main__":
    path = build()
    print(f"wrote {path}; onnx test accuracy {accuracy(path, out_dir()):.4f}")
