"""Recurrent models: onnxruntime.quantization's quantize_dynamic vs onnxsqueeze, side by side
in one run: file size, speed against float and accuracy.

Models (built here): ``digits_crnn``, a conv + 2-layer bidirectional LSTM recogniser trained
on scikit-learn's digits (the images read column by column; accuracy on the 360 held-out
digits); ``speech_lstm`` and ``speech_gru``, 2-layer bidirectional encoders over 100 frames of
80 features (a speech front end's shape; PyTorch's initialisation, judged by cosine against
float on inputs the search did not see). onnxruntime has DynamicQuantizeLSTM but no quantized
GRU: the GRU row shows what happens to a recurrent layer no integer kernel covers.

Latency: one sample, interleaved rounds against float in the same window, median ratio.

    python tools/bench_recurrent.py [--rounds 40] [--out docs/benchmarks/recurrent.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from bench_quant import latency_ratio, session  # noqa: E402


def digits_crnn(folder: Path) -> tuple[Path, list[dict], list[dict], np.ndarray]:
    """The trained recogniser, its search data (train images), held-out feeds and labels."""
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target
    train, test = slice(0, 1437), slice(1437, None)
    nn = torch.nn

    class Crnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
            self.rnn = nn.LSTM(128, 128, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            f = self.conv(x)  # n, 16, 8 rows, 8 columns: a sequence of columns
            n, c, h, w = f.shape
            return self.head(self.rnn(f.permute(0, 3, 1, 2).reshape(n, w, c * h))[0].mean(1))

    model = Crnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for _ in range(25):
        for batch in torch.randperm(len(x)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()
    path = folder / "digits_crnn.onnx"
    _export(model, torch.from_numpy(images[:1]), path)
    search = [{"x": images[i : i + 1]} for i in range(0, 1437, 6)]  # 240 training images
    held_out = [{"x": images[i : i + 1]} for i in range(1437, len(images))]
    return path, search, held_out, labels[test]


def speech(folder: Path, cell: str) -> tuple[Path, list[dict], list[dict], None]:
    import torch

    torch.manual_seed(1)
    layer = getattr(torch.nn, cell)(80, 256, num_layers=2, bidirectional=True, batch_first=True)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = layer, torch.nn.Linear(512, 64)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    rng = np.random.default_rng(2)
    frames = [{"x": rng.standard_normal((1, 100, 80)).astype(np.float32)} for _ in range(48)]
    path = folder / f"speech_{cell.lower()}.onnx"
    _export(Encoder().eval(), torch.from_numpy(frames[0]["x"]), path)
    return path, frames[:32], frames[32:], None


def _export(module, sample, path: Path) -> None:
    import torch

    torch.onnx.export(
        module, (sample,), str(path), dynamo=False, opset_version=17,
        input_names=["x"], dynamic_axes={"x": {0: "n", 1: "t"}} if sample.ndim == 3 else None,
    )  # fmt: skip


def variants(src: Path, search: list[dict], folder: Path) -> dict[str, Path]:
    """float, onnxruntime's dynamic quantizer (its defaults), onnxsqueeze --quantize dynamic
    and onnxsqueeze's default (auto under the default budget), each from its own API."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnxsqueeze

    out = {"float": src}
    path = folder / f"{src.stem}_ort.onnx"
    quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8)
    out["onnxruntime quantize_dynamic"] = path
    for label, mode in (("onnxsqueeze --quantize dynamic", "dynamic"), ("onnxsqueeze default", "auto")):  # fmt: skip
        path = folder / f"{src.stem}_{mode}.onnx"
        report = onnxsqueeze.squeeze_file(src, path, data=search, quantize=mode, strict=False)
        q = report.quantization or {}
        shipped = q.get("mode") if q.get("applied") else "float"
        out[f"{label} (ships {shipped})"] = path
    return out


def outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    s = session(path)
    return [s.run(None, f)[0] for f in feeds]


def measure(src: Path, search, held_out, labels, folder: Path, rounds: int) -> list[dict]:
    import onnx

    reference = outputs(src, held_out)
    base = session(src)
    rows = []
    for label, path in variants(src, search, folder).items():
        got = outputs(path, held_out)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        row = {
            "variant": label,
            "size": path.stat().st_size / src.stat().st_size,
            "recurrent op": ", ".join(sorted(ops & {"LSTM", "GRU", "DynamicQuantizeLSTM"})),
        }
        ms, row["speed"] = latency_ratio(base, session(path), held_out[0], rounds * 5)
        row["ms"] = ms
        cosines = [_cosine(a, b) for a, b in zip(got, reference, strict=True)]
        row["cosine"] = (statistics.mean(cosines), min(cosines))
        if labels is not None:
            answers = np.array([g.argmax() for g in got])
            row["accuracy"] = float((answers == labels).mean())
            row["agreement"] = float((answers == [r.argmax() for r in reference]).mean())
        rows.append(row)
    return rows


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def render(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    from onnxsqueeze.run import cpu

    lines = [
        "# Recurrent models: onnxruntime's dynamic quantizer vs onnxsqueeze",
        "",
        f"`python tools/bench_recurrent.py --rounds {args.rounds}` ({platform.machine()}, "
        f"{cpu.describe()}; one process, every variant built by its own tool's API). size = "
        "file / float file; speed = float ms / variant ms, one sample, interleaved rounds; "
        "cosine = against float on held-out inputs (mean, min); digits: accuracy on the 360 "
        "held-out digits and agreement with float's answers.",
        "",
    ]
    for model, rows in results.items():
        lines += [f"## {model}", "", "| variant | recurrent op | size | speed vs float | ms | "
                  "cosine (mean / min) | accuracy | agreement |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
            agree = f"{r['agreement']:.4f}" if "agreement" in r else "-"
            lines.append(
                f"| {r['variant']} | {r['recurrent op']} | {r['size']:.3f}x | {r['speed']:.2f}x | "
                f"{r['ms']:.2f} | {r['cosine'][0]:.5f} / {r['cosine'][1]:.5f} | {acc} | {agree} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "recurrent.md")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        builders = {
            "digits_crnn (conv + 2x bi-LSTM 128, trained on digits)": digits_crnn,
            "speech_lstm (2x bi-LSTM 256, 100 frames)": lambda f: speech(f, "LSTM"),
            "speech_gru (2x bi-GRU 256, 100 frames)": lambda f: speech(f, "GRU"),
        }
        for name, build in builders.items():
            src, search, held_out, labels = build(folder)
            results[name] = measure(src, search, held_out, labels, folder, args.rounds)
            print(name, results[name], flush=True)
    args.out.write_text(render(results, args))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
