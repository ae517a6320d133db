"""Does ``--workers 2`` make the same model as one process on the corpus? Each model is
quantized static on real samples (the search sees 75 % of them, enough for two calibration
shards) once alone and once on Ray; the output files, the per-node choices and scores, and
what ran on the workers are compared.

    python tools/ray_equality.py [--samples 192] [models ...]
    python tools/ray_equality.py --nodes 2 --append ppocr_det minilm     # --ray-address
    python tools/ray_equality.py --external --append ppocr_det minilm    # external data

``--nodes N`` joins a cluster of N Ray nodes (raylets of one CPU each, on this machine)
with ``--ray-address`` instead of starting one with ``--workers 2``; ``--external`` first
saves the model with its weights in an external data file (the workers then read them
where they lie); ``--append`` adds the rows to the page's table instead of rewriting it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
sys.path.insert(0, str(REPO / "tools"))

import bench_calib  # noqa: E402

import corpus  # noqa: E402

MODELS = {
    "ppocr_cls": "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "magika": None,  # found by name below
    "ppocr_det": "rapidocr/ch_PP-OCRv4_det_infer.onnx",
    "minilm": "minilm/all-MiniLM-L6-v2.onnx",
    "ppocr_rec": "rapidocr/ch_PP-OCRv4_rec_infer.onnx",
    "silero_vad": "silero/silero_vad.onnx",
    "silero_vad_ifless": "silero/silero_vad_op18_ifless.onnx",
}


def make_samples(name: str, count: int, folder: Path) -> None:
    """``count`` real samples of ``name`` as .npz files: the calibration benchmark's, or the
    accuracy tasks' calibration inputs (text lines for PP-OCR rec, streamed audio chunks with
    their true recurrent state for silero)."""
    if name in ("ppocr_rec", "silero_vad", "silero_vad_ifless"):
        import numpy as np
        import quant_tasks

        folder.mkdir(parents=True, exist_ok=True)
        for i, feed in enumerate(quant_tasks.get(name, count).calib[:count]):
            np.savez(folder / f"{i:04d}.npz", **feed)
        return
    bench_calib.make_samples(name, count, folder)


def model_path(name: str) -> Path:
    root = corpus.corpus_dir()
    if MODELS[name]:
        return root / MODELS[name]
    return next((root / "magika").rglob("*.onnx"))


def squeeze(model: Path, data: Path, out: Path, ray: list[str]) -> tuple[dict, float]:
    report = out.with_suffix(".json")
    args = [sys.executable, "-m", "onnxsqueeze", str(model), "-o", str(out), "--quantize",
            "static", "--data", str(data), "--report", str(report), "-q", *ray]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{model.name}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(report.read_text()), time.perf_counter() - started


def external_copy(model: Path, folder: Path) -> Path:
    """``model`` saved with every weight of 1 KiB or more in ``model.onnx.data``, those of
    Constant nodes made initializers first (PP-OCR's exports hold all their weights in
    Constant nodes, which onnx's external data leaves in the graph)."""
    import onnx
    from onnx import numpy_helper

    path = folder / "model.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(model)
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            tensor = node.attribute[0].t
            tensor.name = node.output[0]
            proto.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    for tensor in proto.graph.initializer:  # only raw_data goes external (Paddle's: float_data)
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    onnx.save(
        proto, path, save_as_external_data=True, location="model.onnx.data", size_threshold=1024
    )
    return path


def same_file(a: Path, b: Path) -> bool:
    """Both absent, or both there with the same bytes."""
    return a.exists() == b.exists() and (not a.exists() or a.read_bytes() == b.read_bytes())


@contextlib.contextmanager
def ray_flags(nodes: int):
    """The flags of the spread run: ``--workers 2``, or the address of a cluster of
    ``nodes`` raylets started here for the whole benchmark."""
    if not nodes:
        yield ["--workers", "2"], "--workers 2"
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield ["--ray-address", cluster.address], f"--ray-address ({nodes} nodes)"
    finally:
        cluster.shutdown()


HEADER = [
    "# --workers 2 against one process on the corpus",
    "",
    "`python tools/ray_equality.py --samples 192`: `onnxsqueeze MODEL -o OUT --quantize static "
    "--data DIR` alone and on Ray: `--workers 2` (a local cluster started for the run on this "
    "2-core machine) or `--ray-address` (`--nodes 2`: an existing cluster of two nodes, two "
    "raylets of one CPU each on this machine; its start is not in the time), real samples. "
    "`external`: the model saved with its weights in an external data file first "
    "(`--external`). Same file: the two outputs byte for byte; same choices: every node's "
    "decision and sensitivity score in the reports. Nodes used: how many Ray nodes took work; "
    "in place: weights the workers read from the model's files (shipped as path, offset and "
    "length, not through the object store).",
    "",
    "Calibration is split only where the search's samples fill two shards of 64 "
    "(`distributed.calibration.MIN_SHARD`: a shard's plan and the merge cost more than "
    "fewer samples save): the silero tasks have 125 calibration chunks, 94 of them for the "
    "search, so their calibration runs in the driver (0 shards) by design, and only their "
    "candidate models go to the workers.",
    "",
    "| model | run | range method | quantized | same file | same choices and scores "
    "| calibration shards | candidate models on workers | nodes used | weights in place "
    "| alone s | on Ray s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--nodes", type=int, default=0)
    parser.add_argument("--external", action="store_true")
    parser.add_argument("--append", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "benchmarks" / "distributed_equality.md"
    )
    args = parser.parse_args()
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="ray_equality_") as folder,
        ray_flags(args.nodes) as (flags, how),
    ):
        tmp = Path(folder)
        for name in args.models:
            data = tmp / name
            make_samples(name, args.samples, data)
            model = model_path(name)
            run = how
            if args.external:
                model, run = external_copy(model, tmp / f"{name}_external"), f"{how}, external"
            outs = [tmp / side / f"{name}.onnx" for side in ("alone", "ray")]  # same names
            for out in outs:
                out.parent.mkdir(exist_ok=True)
            alone, t_alone = squeeze(model, data, outs[0], [])
            spread, t_spread = squeeze(model, data, outs[1], flags)
            data_files = [out.with_name(out.name + ".data") for out in outs]
            same = same_file(*outs) and same_file(*data_files)
            q1, q2 = alone["quantization"], spread["quantization"]
            w = spread["workers"] or {}
            rows.append(
                f"| {name} | {run} | {q1.get('method')} | {q1.get('quantized')} of "
                f"{q1.get('candidates')} | {'yes' if same else 'NO'} "
                f"| {'yes' if q1.get('nodes') == q2.get('nodes') else 'NO'} "
                f"| {w.get('calibration_shards', 0)} | {w.get('models_run', 0)} "
                f"({w.get('look_ahead_models', 0)} ahead) | {w.get('nodes_used', 0)} "
                f"| {w.get('weights_read_in_place', 0)} | {t_alone:.1f} | {t_spread:.1f} |"
            )
            print(rows[-1], flush=True)
    if args.append and args.out.exists():
        lines = args.out.read_text().splitlines()
        last = max(i for i, line in enumerate(lines) if line.startswith("|"))
        lines[last + 1 : last + 1] = rows
    else:
        lines = [*HEADER, *rows, ""]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
