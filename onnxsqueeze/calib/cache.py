"""The result of calibration: one observer per tensor, savable, loadable and mergeable.

A cache file is an .npz (no pickle): ``meta`` holds JSON (format version, tensor names,
observer kinds, sample count, the model's input names), and each observer's arrays and
scalars are stored under ``<index>.<field>``. Saving goes through a temporary file and a
rename, so an interrupted run never leaves half a cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from onnxsqueeze.calib.observers import Observer, from_state
from onnxsqueeze.core.errors import CalibrationError
from onnxsqueeze.core.scratch import scratch_file
from onnxsqueeze.quant.qmath import QParams

FORMAT = "onnxsqueeze-calibration/1"


class Calibration:
    """Observers by tensor name, plus what produced them."""

    def __init__(
        self,
        observers: Mapping[str, Observer] | None = None,
        *,
        samples: int = 0,
        inputs: Iterable[str] = (),
        skipped: Mapping[str, str] | None = None,
    ) -> None:
        self.observers: dict[str, Observer] = dict(observers or {})
        self.samples = samples
        self.inputs = list(inputs)
        #: tensor name -> why it has no observer (inside a subgraph, not float, ...).
        self.skipped: dict[str, str] = dict(skipped or {})

    def __contains__(self, name: str) -> bool:
        return name in self.observers

    def __len__(self) -> int:
        return len(self.observers)

    def range(self, name: str, method: str = "minmax", **options: Any) -> tuple[float, float]:
        return self._get(name).range(method, name=name, **options)

    def qparams(
        self,
        name: str,
        dtype: str = "uint8",
        symmetric: bool = False,
        method: str = "minmax",
        **options: Any,
    ) -> QParams:
        return self._get(name).qparams(dtype, symmetric, method, name=name, **options)

    def ranges(self, method: str = "minmax", **options: Any) -> dict[str, tuple[float, float]]:
        """Every tensor with finite data; tensors without any are left out (see nonfinite).

        The searches run in threads: their kernels release the GIL, and the KL search is
        the costly part of entropy calibration (O(bins^2) per tensor).
        """
        names = [name for name, obs in self.observers.items() if obs.finite]

        def one(name: str) -> tuple[float, float]:
            return self.observers[name].range(method, name=name, **options)

        if method == "minmax" or len(names) < 8:
            return {name: one(name) for name in names}
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return dict(zip(names, pool.map(one, names), strict=True))

    def nonfinite(self) -> dict[str, dict[str, int]]:
        """Tensors that held NaN or +-inf, with the counts (attention masks, broken inputs)."""
        return {
            name: {"nan": o.nan, "+inf": o.pos_inf, "-inf": o.neg_inf, "finite": o.finite}
            for name, o in self.observers.items()
            if o.nonfinite
        }

    def merge(self, other: Calibration) -> Calibration:
        """Combine statistics computed on other samples (shards, a resumed run)."""
        if other.inputs and self.inputs and other.inputs != self.inputs:
            raise CalibrationError(
                f"cannot merge calibrations of different models (inputs {other.inputs} vs {self.inputs})"
            )
        for name, obs in other.observers.items():
            if name in self.observers:
                self.observers[name].merge(obs)
            else:
                self.observers[name] = obs
        self.samples += other.samples
        self.inputs = self.inputs or other.inputs
        self.skipped.update({k: v for k, v in other.skipped.items() if k not in self.observers})
        return self

    def _get(self, name: str) -> Observer:
        try:
            return self.observers[name]
        except KeyError:
            reason = self.skipped.get(name, "not calibrated")
            raise CalibrationError(
                f"tensor '{name}' has no calibration statistics ({reason})"
            ) from None

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise CalibrationError(f"{path}: directory '{parent}' does not exist")
        names = list(self.observers)
        arrays: dict[str, np.ndarray] = {}
        kinds = []
        for index, name in enumerate(names):
            state = self.observers[name].state()
            kinds.append(state["kind"])
            for key, value in state.items():
                if key != "kind":
                    arrays[f"{index}.{key}"] = np.asarray(value)
        meta = {
            "format": FORMAT,
            "names": names,
            "kinds": kinds,
            "samples": self.samples,
            "inputs": self.inputs,
            "skipped": self.skipped,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        fd, tmp = scratch_file("calib", parent, ".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: calibration cache not found")
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(bytes(archive["meta"]).decode())
                if meta.get("format") != FORMAT:
                    raise CalibrationError(
                        f"{path}: not an onnxsqueeze calibration cache ({meta.get('format')})"
                    )
                fields: dict[str, list[str]] = {}
                for key in archive.files:
                    index, _, field = key.partition(".")
                    if field:
                        fields.setdefault(index, []).append(field)
                observers = {}
                pairs = zip(meta["names"], meta["kinds"], strict=True)
                for index, (name, kind) in enumerate(pairs):
                    state: dict[str, Any] = {"kind": kind}
                    for field in fields.get(str(index), []):
                        value = archive[f"{index}.{field}"]
                        state[field] = value if value.ndim else value.item()
                    observers[name] = from_state(state)
        except CalibrationError:
            raise
        except Exception as exc:
            raise CalibrationError(f"{path}: cannot read calibration cache ({exc})") from exc
        return cls(
            observers, samples=int(meta["samples"]), inputs=meta["inputs"], skipped=meta["skipped"]
        )
