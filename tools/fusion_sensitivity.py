"""How far one weight-scaling fusion alone moves a model's outputs.

Issue 3 asks for both a node count at most the peers' and outputs within 1e-6 relative of
the original. The exact preset (`--preset exact`, no float reassociation) is bit-identical;
the peers reach their counts on PP-OCR by folding BatchNormalization (and similar per-channel
affine ops) into the Conv before it, which scales weights and so rounds differently. This
script takes the exact preset's graph and applies each such fold **alone** (fuse-batchnorm
with ``nodes=(name,)``, the default preset's own arithmetic), then measures the largest
output change relative to the largest output (onnxruntime with graph rewrites and weight
prepacking off on both sides, the real probe inputs). If a single fold already moves a model
beyond 1e-6, no node count that needs folds can meet 1e-6 on that model.

    python tools/fusion_sensitivity.py [--models ppocr_det ppocr_rec ppocr_cls]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
sys.path.insert(0, str(REPO / "tools"))
import bench_simplify  # noqa: E402

from onnxsqueeze.run import cpu  # noqa: E402

import corpus  # noqa: E402

BAR = 1e-6
#: The ops fuse-batchnorm folds into the Conv/Gemm before them.
AFFINE = ("BatchNormalization", "Mul", "Add")


def plain_outputs(model: onnx.ModelProto | Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = bench_simplify.session(source, exact=True)
    return [session.run(None, feed) for feed in feeds]


def output_scale(outputs: list[list[np.ndarray]]) -> float:
    return max(max(float(np.abs(x).max()) for run in outputs for x in run), 1e-30)


def relative_change(reference: list[list[np.ndarray]], other: list[list[np.ndarray]]) -> float:
    worst = max(
        float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
        for r, o in zip(reference, other, strict=True)
        for a, b in zip(r, o, strict=True)
    )
    return worst / output_scale(reference)


def single_folds(exact: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """``exact`` with one affine node folded by fuse-batchnorm (reassociating), for each node
    the pass folds: the same arithmetic the default preset uses."""
    from onnxsqueeze.passes.fuse_batchnorm import FuseBatchnormPass

    for node in exact.graph.node:
        if node.op_type not in AFFINE or not node.name:
            continue
        model = ir.serde.deserialize_model(exact)
        if FuseBatchnormPass(nodes=(node.name,))(model).stats["nodes_removed"]:
            yield ir.serde.serialize_model(model)


def measure(name: str) -> dict | None:
    from onnxsqueeze.api import squeeze

    entry = corpus.get(name)
    if not entry.available():
        print(f"{name}: not built, skipped", flush=True)
        return None
    feeds = [dict(np.load(p)) for p in sorted(entry.probe_dir.glob("*.npz"))]
    exact = squeeze(onnx.load(str(entry.path)), preset="exact", quantize="none").model
    reference = plain_outputs(entry.path, feeds)
    changes = [
        relative_change(reference, plain_outputs(folded, feeds)) for folded in single_folds(exact)
    ]
    peers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tool in ("onnxsim", "onnxslim"):
            result = bench_simplify.run_tool(tool, entry.path, Path(tmp, f"{tool}.onnx"))
            peers[tool] = result.get("nodes")
    return {
        "name": name,
        "exact_nodes": bench_simplify.count_nodes(exact.graph),
        "exact_change": relative_change(reference, plain_outputs(exact, feeds)),
        "peers": peers,
        "changes": changes,
        "deployed": bench_simplify.max_abs_diff(entry.path, entry.path, feeds, exact=False)
        / output_scale(reference),
    }


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# One fold at a time: how far each weight-scaling fusion alone moves the outputs",
        "",
        f"`python tools/fusion_sensitivity.py --models {' '.join(args.models)}` ({cpu.describe()}). "
        "Each BatchNormalization / constant Mul / constant Add that fuse-batchnorm folds into the "
        "Conv/Gemm before it is folded **alone** (the pass, `nodes=(name,)`), on the exact "
        "preset's graph; change = max abs "
        "output difference / max abs output, onnxruntime with graph rewrites and prepacking off "
        "on both sides, real probe inputs. ORT optimizer = the original itself run with "
        "onnxruntime's default optimizations against the plain run (same measure). Issue 3's bar "
        f"is {BAR:g}.",
        "",
        "| model | exact preset nodes | exact change | peers' nodes (onnxsim / onnxslim) | folds | "
        "single-fold change min / median / max | folds within 1e-6 alone | ORT optimizer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ch = row["changes"]
        spread = f"{min(ch):.1e} / {statistics.median(ch):.1e} / {max(ch):.1e}" if ch else "-"
        peers = " / ".join(str(row["peers"].get(t, "-")) for t in ("onnxsim", "onnxslim"))
        lines.append(
            f"| {row['name']} | {row['exact_nodes']} | {row['exact_change']:.1e} | {peers} | "
            f"{len(ch)} | {spread} | {sum(c <= BAR for c in ch)} | {row['deployed']:.1e} |"
        )
    lines += [
        "",
        "Reading: where the exact preset's node count is above the smaller peer's and not one "
        "fold stays within 1e-6 alone, both parts of the bar cannot hold at once on that model "
        "(folds' changes do not cancel reliably; onnxslim's own folding moves the same model "
        "too, see simplify.md).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocr_det", "ppocr_rec", "ppocr_cls"])
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "benchmarks" / "fusion_sensitivity.md"
    )
    args = parser.parse_args()
    rows = [r for r in (measure(name) for name in args.models) if r is not None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, args))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
