"""Corpus models and their squeezed forms on every execution provider, side by side in one run,
through ``onnxsqueeze bench`` (interleaved rounds, ratios against the fp32 original).

Per model: the fp32 original, onnxsqueeze's default output (``--squeezed``, or made here),
onnxruntime.quantization's ``quantize_dynamic`` of it (the peer, made here), and onnxsqueeze
``--quantize fp16`` verified on the first GPU provider present (made here). Providers that
this onnxruntime lacks are reported as such, so the same command runs on a CPU machine.

    python tools/bench_eps.py --model minilm=.corpus/minilm/all-MiniLM-L6-v2.onnx \
        --data minilm=.corpus/minilm/probe --providers cpu,cuda,tensorrt --batch 1,8 \
        --out docs/benchmarks/providers.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from onnxsqueeze.api import squeeze_file
from onnxsqueeze.cli.bench import bench_table
from onnxsqueeze.run.bench import bench


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def _gpu_name() -> str:
    import subprocess

    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return done.stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def variants(
    name: str, model: Path, data: str | None, squeezed: str | None, providers: list[str], tmp: Path
) -> tuple[list[tuple[str, Path]], list[str]]:
    """The models to bench for one corpus model, and a line per variant on how it was made."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = [(f"{name} fp32", model)]
    notes = []
    if squeezed:
        out.append((f"{name} onnxsqueeze default", Path(squeezed)))
        notes.append(f"{name} onnxsqueeze default: given ({squeezed})")
    else:
        path = tmp / f"{name}_default.onnx"
        start = time.perf_counter()
        report = squeeze_file(str(model), str(path), data=data)
        out.append((f"{name} onnxsqueeze default", path))
        notes.append(
            f"{name} onnxsqueeze default: {time.perf_counter() - start:.0f} s, "
            f"{report.as_dict().get('quantization', {}).get('mode', '?')}"
        )
    peer = tmp / f"{name}_ort_dynamic.onnx"
    try:
        quantize_dynamic(str(model), str(peer), weight_type=QuantType.QInt8)
        out.append((f"{name} onnxruntime quantize_dynamic", peer))
    except Exception as exc:  # the peer's failure is a result too
        notes.append(f"{name} onnxruntime quantize_dynamic: failed ({type(exc).__name__}: {exc})")
    gpu = [p for p in providers if p in ("cuda", "tensorrt")]
    available = {p.lower().removesuffix("executionprovider") for p in ort.get_available_providers()}
    target = next((p for p in gpu if p in available), "cpu")
    fp16 = tmp / f"{name}_fp16.onnx"
    start = time.perf_counter()
    try:
        report = squeeze_file(str(model), str(fp16), data=data, quantize="fp16", providers=[target])
        out.append((f"{name} onnxsqueeze fp16", fp16))
        notes.append(
            f"{name} onnxsqueeze fp16: verified on {target} in "
            f"{time.perf_counter() - start:.0f} s ({report.verification_status})"
        )
    except Exception as exc:  # said in the table's notes, not hidden
        notes.append(f"{name} onnxsqueeze fp16: not made ({exc})")
    return out, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH")
    parser.add_argument("--data", action="append", default=[], help="NAME=PATH")
    parser.add_argument("--squeezed", action="append", default=[], help="NAME=PATH")
    parser.add_argument("--providers", default="cpu,cuda,tensorrt")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="docs/benchmarks/providers.md")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    providers = args.providers.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    models, data, squeezed = _pairs(args.model), _pairs(args.data), _pairs(args.squeezed)
    lines = [
        "# Execution providers: originals and squeezed models side by side",
        "",
        f"`python tools/bench_eps.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.node()}, GPU: {_gpu_name()}, onnxruntime {ort.__version__} "
        f"({', '.join(ort.get_available_providers())}). Latencies are medians of all timed "
        f"runs of {args.rounds} interleaved rounds (the models alternate inside each round); "
        "speed is the fp32 original's p50 over the row's p50 on the same provider and batch; "
        "load ms, RAM and GPU MiB are measured in a fresh process per model after the "
        "provider was started on a one-node model.",
        "",
    ]
    everything = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models.items():
            made, notes = variants(
                name, Path(path), data.get(name), squeezed.get(name), providers, Path(tmp)
            )
            report = bench(
                [str(p) for _, p in made],
                providers=providers,
                batches=batches,
                data=data.get(name),
                rounds=args.rounds,
            )
            labels = {str(p): label for label, p in made}
            for row in report.results:
                row.model = labels[row.model]
            everything.append(report.as_dict())
            lines += [f"## {name}", "", "```", bench_table(report), "```", ""]
            lines += [f"- {note}" for note in notes]
            lines += [f"- warning: {w}" for w in report.warnings] + [""]
            print("\n".join(lines[-(len(notes) + 8) :]), flush=True)
            Path(args.out).write_text("\n".join(lines))  # each model's rows as soon as they are in
    Path(args.out).write_text("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
