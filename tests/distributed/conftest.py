"""The digits CNN's data and an external-data copy of it, shared by the Ray tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """160 real digit images, one per .npz, as a user's calibration folder."""
    images = np.load(REPO / "models" / "digits_test.npz")["image"]
    folder = tmp_path_factory.mktemp("digits")
    for i in range(160):
        np.savez(folder / f"{i:04d}.npz", image=images[i : i + 1])
    return folder


@pytest.fixture(scope="module")
def digits_external(tmp_path_factory) -> Path:
    """The digits CNN with every weight in an external data file."""
    path = tmp_path_factory.mktemp("external") / "digits.onnx"
    onnx.save(
        onnx.load(DIGITS), path, save_as_external_data=True, location="digits.onnx.data",
        size_threshold=0,
    )  # fmt: skip
    return path
