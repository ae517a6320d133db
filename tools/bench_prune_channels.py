"""Structured (channel) pruning on real models, side by side with onnxsim 0.8's, in one run.

For each model (after onnxsqueeze's lossless preset, which both tools then start from) and
each ratio R (the share of each prunable layer's / channel group's output channels removed):

- onnxsim ``apply_structured_pruning`` (L2 filter norms) and ``apply_structured_wanda_pruning``
  (||W|| x ||X|| on the same calibration samples), at sparsity R;
- onnxsqueeze prune-channels at ratio R: magnitude without data, and with the calibration
  samples (data-aware importance, the least-squares refit of the consumers, then their
  sequential refit on what really reaches them);

and what the API ships with ``prune="auto"`` (the budgeted search: per-group ratios, kept only
if faster). Columns: multiply-adds per sample (at the latency input's shape) and .onnx file
against the unpruned model, zlib -9 of the file likewise, CPU latency ratio (unpruned ms /
pruned ms, medians of alternating rounds), and the task metrics of tools/quant_tasks.py on
held-out samples.

    pip install onnxsim==0.8.1
    python tools/bench_prune_channels.py [--models wide_cnn,ppocr_cls,ppocr_det] [--calib 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

import onnx
import onnx_ir as ir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import quant_tasks  # noqa: E402
from bench_factorize import session_of, simplified  # noqa: E402
from bench_quant import latency_ratio  # noqa: E402

import onnxsqueeze  # noqa: E402
from onnxsqueeze.calib.gram import gram_matrices  # noqa: E402
from onnxsqueeze.core.flops import total_macs  # noqa: E402
from onnxsqueeze.passes.prune_channels import PruneChannelsPass  # noqa: E402
from onnxsqueeze.run import cpu  # noqa: E402

RATIOS = (0.25, 0.5)


def _onnxsim(proto: onnx.ModelProto, ratio: float, calib: list[dict], wanda: bool):
    from onnxsim import pruning

    if wanda:
        out = pruning.apply_structured_wanda_pruning(proto, calibration_data=calib, sparsity=ratio)
    else:
        out = pruning.apply_structured_pruning(proto, sparsity=ratio)
    # its value_info keeps the unpruned channel counts (onnx's shape inference then fails
    # on the file): dropped, so that multiply-adds are counted on the real shapes
    del out.graph.value_info[:]
    return out


def measure(label, ratio, model: ir.Model, base, reference, task, args, extra="") -> dict:
    data = ir.serde.serialize_model(model).SerializeToString()
    cand = session_of(model)
    outputs = quant_tasks.run_task(cand, task)
    _, speed = latency_ratio(base["session"], cand, task.latency_feed, args.runs)
    row = {
        "tool": label,
        "ratio": ratio,
        "macs": total_macs(model, task.latency_feed) / base["macs"],
        "file": len(data) / base["bytes"],
        "zlib": len(zlib.compress(data, 9)) / base["zlib"],
        "speed": speed,
        "note": extra,
        **task.score(reference, outputs),
    }
    print(task.name, row, flush=True)
    return row


def bench(name: str, args, tmp: Path) -> list[dict]:
    task = quant_tasks.get(name, args.calib)
    model = simplified(quant_tasks.model_path(name))
    proto = ir.serde.serialize_model(model)
    data = proto.SerializeToString()
    base = {
        "session": session_of(model),
        "macs": total_macs(model, task.latency_feed),
        "bytes": len(data),
        "zlib": len(zlib.compress(data, 9)),
    }
    reference = quant_tasks.run_task(base["session"], task)
    calib = task.calib[: args.calib]
    grams = gram_matrices(model, calib, ones=True)
    rows = []
    for ratio in RATIOS:
        for label, wanda in (("onnxsim L2", False), ("onnxsim Wanda", True)):
            try:
                pruned = ir.serde.deserialize_model(_onnxsim(proto, ratio, calib, wanda))
            except Exception as exc:  # a peer's failure is a result too
                rows.append({"tool": label, "ratio": ratio, "note": f"failed: {exc}"[:120]})
                continue
            rows.append(measure(label, ratio, pruned, base, reference, task, args))
        for label, g in (("onnxsqueeze magnitude", None), ("onnxsqueeze refit", grams)):
            pruned = model.clone()
            feeds = calib if g is not None else None  # the sequential refit too
            stats = PruneChannelsPass(ratio=ratio, grams=g, feeds=feeds)(pruned).stats
            note = f"{stats['channels_removed']} channels"
            rows.append(measure(label, ratio, pruned, base, reference, task, args, note))
    dest = tmp / f"{name}_auto.onnx"
    started = time.perf_counter()
    report = onnxsqueeze.squeeze_file(
        _path_of(model, tmp / f"{name}.onnx"), dest, data=calib, prune="auto", quantize="none",
        strict=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    record = report.pruning or {}
    note = (
        f"{record.get('channels_removed')} channels, search {seconds:.0f} s"
        if record.get("applied")
        else f"declined: {record.get('reason')}"
    )
    shipped = ir.serde.deserialize_model(onnx.load(str(dest)))
    rows.append(measure("onnxsqueeze --prune auto", "auto", shipped, base, reference, task, args,
                        note))  # fmt: skip
    return rows


def _path_of(model: ir.Model, path: Path) -> Path:
    onnx.save(ir.serde.serialize_model(model), str(path))
    return path


def render(results: dict, args) -> str:
    lines = [
        "# Structured pruning: onnxsqueeze prune-channels vs onnxsim 0.8, side by side",
        "",
        f"`python tools/bench_prune_channels.py --models {args.models} --calib {args.calib}` on "
        f"{cpu.describe()}, onnxsim {_version('onnxsim')}. Both start from "
        "onnxsqueeze's lossless preset; ratio = share of each layer's (onnxsim) or channel "
        "group's (onnxsqueeze) channels removed. macs = multiply-adds per sample at the latency "
        "input's shape, file and zlib (-9) = pruned / unpruned, speed = unpruned ms / pruned ms "
        "(medians of alternating rounds, batch 1), task metrics on held-out samples. "
        "`--prune auto` is what the API ships: per-group ratios within the default budget "
        "(cosine 0.997, class agreement 0.99), refitted on the calibration samples, kept only "
        "if faster.",
    ]
    for name, rows in results.items():
        metrics = [k for k in rows[-1] if k not in ("tool", "ratio", "macs", "file", "zlib",
                                                     "speed", "note")]  # fmt: skip
        lines += ["", f"## {name}", ""]
        head = ["ratio", "tool", "macs", "file", "zlib", "speed", *metrics, "note"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for row in rows:
            cells = [str(row.get("ratio")), row["tool"]]
            for key in head[2:]:
                value = row.get(key, "")
                cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="wide_cnn,ppocr_cls,ppocr_det")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "prune_channels.md"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = bench(name, args, Path(tmp))
    Path(args.out).write_text(render(results, args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
