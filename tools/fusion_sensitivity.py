"""How far one weight-scaling fusion alone moves a model's outputs.

Issue 3 asks for both a node count at most the peers' and outputs within 1e-6 relative of
the original. The exact preset (`--preset exact`, no float reassociation) is bit-identical;
the peers reach their counts on PP-OCR by folding BatchNormalization (and similar per-channel
affine ops) into the Conv before it, which scales weights and so rounds differently. This
script takes the exact preset's graph and applies each such fold **alone** (computed in
float64, stored in the weight's dtype, as fuse-batchnorm does), then measures the largest
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
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
sys.path.insert(0, str(REPO / "tools"))
import bench_simplify  # noqa: E402

from onnxsqueeze import cpu  # noqa: E402

import corpus  # noqa: E402

BAR = 1e-6
CONVS = ("Conv", "ConvTranspose")


def plain_outputs(model: onnx.ModelProto | Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def relative_change(reference: list[list[np.ndarray]], other: list[list[np.ndarray]]) -> float:
    scale = max(float(np.abs(x).max()) for run in reference for x in run)
    worst = max(
        float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
        for r, o in zip(reference, other, strict=True)
        for a, b in zip(r, o, strict=True)
    )
    return worst / max(scale, 1e-30)


def fold_candidates(graph: onnx.GraphProto) -> list[int]:
    """Indices of BN / constant Mul / constant Add (onto a Conv with a bias: without one the
    fold is exact) nodes that read a Conv's output alone."""
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    initializers = {t.name for t in graph.initializer}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("BatchNormalization", "Mul", "Add"):
            continue
        sources = [i for i in node.input if i in producer and producer[i].op_type in CONVS]
        if not sources or readers.get(sources[0]) != 1:
            continue
        conv = producer[sources[0]]
        others = [i for i in node.input[1:] if i != sources[0]] or [
            i for i in node.input if i != sources[0]
        ]
        if conv.input[1] not in initializers or not all(i in initializers for i in others):
            continue
        has_bias = len(conv.input) > 2 and conv.input[2] in initializers
        if node.op_type == "Add" and not has_bias:
            continue
        found.append(index)
    return found


def fold_one(model: onnx.ModelProto, index: int) -> onnx.ModelProto | None:
    """A copy of ``model`` with node ``index`` folded into the Conv before it."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    node = graph.node[index]
    producer = {out: n for n in graph.node for out in n.output}
    source = next(i for i in node.input if i in producer and producer[i].op_type in CONVS)
    conv = producer[source]
    weight = values[conv.input[1]].astype(np.float64)
    channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1]
    if conv.op_type == "ConvTranspose":
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        channels *= group
        if group != 1:
            return None
    has_bias = len(conv.input) > 2 and conv.input[2] in values
    bias = values[conv.input[2]].astype(np.float64) if has_bias else np.zeros(channels)
    if node.op_type == "BatchNormalization":
        gamma, beta, mean, var = (values[i].astype(np.float64) for i in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
    else:
        const = values[next(i for i in node.input if i != source)].astype(np.float64)
        padded = (1,) * (weight.ndim - const.ndim) + const.shape  # as broadcast on the output
        if const.size != 1 and (padded[1] != channels or np.prod(padded) != channels):
            return None  # not one number per output channel
        const = np.broadcast_to(const.reshape(-1), (channels,))
        if node.op_type == "Mul":
            scale, shift = const, np.zeros(channels)
        else:
            scale, shift = np.ones(channels), const
    axis = (
        (-1,) + (1,) * (weight.ndim - 1)
        if conv.op_type == "Conv"
        else (1, -1) + (1,) * (weight.ndim - 2)
    )
    dtype = values[conv.input[1]].dtype
    new_weight = (weight * scale.reshape(axis)).astype(dtype)
    new_bias = (bias * scale + shift).astype(dtype)
    w_name, b_name = conv.input[1] + "::folded", node.output[0] + "::bias"
    graph.initializer.extend(
        [numpy_helper.from_array(new_weight, w_name), numpy_helper.from_array(new_bias, b_name)]
    )
    inputs = [conv.input[0], w_name, b_name]
    del conv.input[:]
    conv.input.extend(inputs)
    conv.output[0] = node.output[0]
    del graph.node[index]
    return folded


def measure(name: str) -> dict | None:
    from onnxsqueeze.api import squeeze

    entry = corpus.get(name)
    if not entry.available():
        print(f"{name}: not built, skipped", flush=True)
        return None
    feeds = [dict(np.load(p)) for p in sorted(entry.probe_dir.glob("*.npz"))]
    exact = squeeze(onnx.load(str(entry.path)), preset="exact", quantize="none").model
    reference = plain_outputs(entry.path, feeds)
    changes = []
    for index in fold_candidates(exact.graph):
        folded = fold_one(exact, index)
        if folded is not None:
            changes.append(relative_change(reference, plain_outputs(folded, feeds)))
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
        / max(float(np.abs(x).max()) for run in reference for x in run),
    }


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# One fold at a time: how far each weight-scaling fusion alone moves the outputs",
        "",
        f"`python tools/fusion_sensitivity.py --models {' '.join(args.models)}` ({cpu.describe()}). "
        "Each BatchNormalization / constant Mul / constant Add (onto a biased Conv) that reads a "
        "Conv alone is folded into it **alone**, on the exact preset's graph; change = max abs "
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
