"""Scale-out: one process vs ``--workers N`` (a local Ray cluster started for the run), side
by side in one run, each run in its own process, rounds interleaved, medians reported.

1. Calibration: PP-OCR det, percentile (histograms), N real pages at 256x256, through
   ``onnxsqueeze.calibrate``: wall time of the whole call (Ray's start-up included), where
   the time went (Ray start, the shards' plan, the shards, the merge), peak memory of the
   driver and of the workers, the CPU time the one-process run used per second of wall time
   (how busy it kept the machine: the most any split of the work can gain), and whether
   every histogram and range is bit-identical.
2. The static budget search on MiniLM (real sentences): the CLI's wall time, driver and
   worker peak memory, and whether the output files and the per-node choices are identical.

    python tools/bench_ray.py [--workers 2] [--samples 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
sys.path.insert(0, str(REPO / "tools"))

import bench_calib  # noqa: E402

import corpus  # noqa: E402

CALIB_CHILD = """
import json, resource, sys, time
import numpy as np
started = time.perf_counter()
model, data, samples, workers, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from onnxsqueeze.calib.calibrate import calibrate
from onnxsqueeze.run.workers import using
record = None
if workers:
    from onnxsqueeze.distributed import pool
    with pool(workers) as running, using(running):
        result = calibrate(model, data, method="percentile", samples=samples)
        record = dict(running.record)
        closing = time.perf_counter()
    record["shutdown_s"] = time.perf_counter() - closing
else:
    result = calibrate(model, data, method="percentile", samples=samples)
wall = time.perf_counter() - started
ranges = result.ranges("percentile")
np.savez(out, **{"counts/" + k: o.counts for k, o in result.observers.items()},
         **{"range/" + k: np.array(v, np.float64) for k, v in ranges.items()})
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_mib": usage.ru_maxrss / 1024, "samples": result.samples, "record": record}))
"""


def child(args: list[str], timeout: int = 1800) -> tuple[str, float]:
    """Run a child process; its stdout and wall seconds."""
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{args[:4]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout, time.perf_counter() - started


def calibration(model: Path, data: Path, samples: int, workers: int, rounds: int, tmp: Path):
    runs: dict[int, list[dict]] = {0: [], workers: []}
    for r in range(rounds):
        for w in (0, workers) if r % 2 == 0 else (workers, 0):
            out = tmp / f"calib_{w}_{r}.npz"
            text, _ = child([sys.executable, "-c", CALIB_CHILD, str(model), str(data),
                                str(samples), str(w), str(out)])  # fmt: skip
            result = json.loads(text.strip().splitlines()[-1])
            result["file"] = out
            runs[w].append(result)
    one, many = runs[0][0], runs[workers][0]
    a, b = np.load(one["file"]), np.load(many["file"])
    counts = [k for k in a.files if k.startswith("counts/")]
    same_counts = sum(np.array_equal(a[k], b[k]) for k in counts)
    ranges = [k for k in a.files if k.startswith("range/")]
    same_ranges = sum(np.array_equal(a[k], b[k]) for k in ranges)
    return runs, (same_counts, len(counts), same_ranges, len(ranges))


def search(model: Path, data: Path, workers: int, rounds: int, tmp: Path):
    runs: dict[int, list[dict]] = {0: [], workers: []}
    for r in range(rounds):
        for w in (0, workers) if r % 2 == 0 else (workers, 0):
            out, report = tmp / f"minilm_{w}_{r}.onnx", tmp / f"minilm_{w}_{r}.json"
            args = [sys.executable, "-m", "onnxsqueeze", str(model), "-o", str(out),
                    "--quantize", "static", "--data", str(data), "--report", str(report), "-q"]  # fmt: skip
            if w:
                args += ["--workers", str(w)]
            _, wall = child(args)
            record = json.loads(report.read_text())
            runs[w].append({"wall": wall, "out": out, "report": record})
    one, many = runs[0], runs[workers]
    same_bytes = all(o["out"].read_bytes() == one[0]["out"].read_bytes() for o in one + many)
    nodes = [o["report"]["quantization"]["nodes"] for o in one + many]
    same_nodes = all(n == nodes[0] for n in nodes)
    return runs, same_bytes, same_nodes


def rss_run(args: list[str]) -> float:
    """Peak RSS (MiB) of one command, from GNU time."""
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1:])
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def med(values) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--search-rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "distributed.md")
    args = parser.parse_args()
    root = corpus.corpus_dir()
    det = root / "rapidocr" / "ch_PP-OCRv4_det_infer.onnx"
    minilm = root / "minilm" / "all-MiniLM-L6-v2.onnx"
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as folder:
        tmp = Path(folder)
        bench_calib.make_samples("ppocr_det", args.samples, tmp / "det")
        bench_calib.make_samples("minilm", args.sentences, tmp / "minilm")
        calib_runs, same = calibration(
            det, tmp / "det", args.samples, args.workers, args.rounds, tmp
        )
        search_runs, same_bytes, same_nodes = search(
            minilm, tmp / "minilm", args.workers, args.search_rounds, tmp
        )
        search_rss = {
            w: rss_run(
                [
                    sys.executable,
                    "-m",
                    "onnxsqueeze",
                    str(minilm),
                    "-o",
                    str(tmp / f"rss_{w}.onnx"),
                    "--quantize",
                    "static",
                    "--data",
                    str(tmp / "minilm"),
                    "-q",
                    *(["--workers", str(w)] if w else []),
                ]
            )  # fmt: skip
            for w in (0, args.workers)
        }
    text = render(args, calib_runs, same, search_runs, same_bytes, same_nodes, search_rss)
    args.out.write_text(text)
    print(text)


def render(args, calib_runs, same, search_runs, same_bytes, same_nodes, search_rss) -> str:
    w = args.workers
    one, many = calib_runs[0], calib_runs[w]
    rec = [r["record"] for r in many]
    c = [r["calibration"] for r in rec]
    cpu_per_wall = med([r["cpu"] / r["wall"] for r in one])
    s_one, s_many = search_runs[0], search_runs[w]
    workers_rec = [r["report"]["workers"] for r in s_many]
    lines = [
        "# Scale-out on Ray: one process vs --workers",
        "",
        f"`python tools/bench_ray.py --workers {w} --samples {args.samples} --rounds "
        f"{args.rounds}` ({os.cpu_count()}-core {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, ray {__import__('ray').__version__}; every run in its "
        "own process, rounds interleaved, medians). Ray's start-up is inside every --workers "
        "figure.",
        "",
        f"## Calibration: PP-OCR det, percentile, {args.samples} real pages (256x256)",
        "",
        "| | one process | --workers " + str(w) + " | ratio (one / workers) |",
        "|---|---|---|---|",
        f"| wall s (whole call) | {med([r['wall'] for r in one]):.2f} | "
        f"{med([r['wall'] for r in many]):.2f} | "
        f"{med([r['wall'] for r in one]) / med([r['wall'] for r in many]):.2f}x |",
        f"| driver peak RSS MiB | {med([r['rss_mib'] for r in one]):.0f} | "
        f"{med([r['rss_mib'] for r in many]):.0f} | |",
        f"| worker peak RSS MiB | - | {med([r['worker_peak_mib'] for r in rec]):.0f} (each) | |",
        "",
        f"Where the --workers {w} time went (medians): Ray start-up "
        f"{med([r['startup_s'] for r in rec]):.2f} s; the shards "
        f"({c[0]['shards']} samples, {c[0]['samples_per_run']} per run) "
        f"{med([x['shards_s'] for x in c]):.2f} s, of which the slowest shard's plan (open the "
        f"model, sessions, stacking check) {med([x['slowest_plan_s'] for x in c]):.2f} s; the "
        f"merge {med([x['merge_s'] for x in c]):.2f} s; Ray's shutdown "
        f"{med([r['shutdown_s'] for r in rec]):.2f} s; the rest (imports, loading the model, "
        "shipping it) as in one process. The one-process run used "
        f"{cpu_per_wall:.2f} CPU-seconds per second of wall time (onnxruntime's threads and the "
        "histogram threads): on this machine a split of the same work can gain at most "
        f"{os.cpu_count() / cpu_per_wall:.2f}x before any start-up cost.",
        "",
        f"Identical to one process: {same[0]} of {same[1]} histograms bit for bit, "
        f"{same[2]} of {same[3]} percentile ranges.",
        "",
        f"## The static budget search: MiniLM, {args.sentences} real sentences "
        "(`onnxsqueeze ... --quantize static --data`)",
        "",
        "| | one process | --workers " + str(w) + " | ratio (one / workers) |",
        "|---|---|---|---|",
        f"| wall s (whole CLI run) | {med([r['wall'] for r in s_one]):.1f} | "
        f"{med([r['wall'] for r in s_many]):.1f} | "
        f"{med([r['wall'] for r in s_one]) / med([r['wall'] for r in s_many]):.2f}x |",
        f"| driver peak RSS MiB (GNU time, one run) | {search_rss[0]:.0f} | {search_rss[w]:.0f} | |",
        f"| worker peak RSS MiB | - | {med([r.get('worker_peak_mib', 0) for r in workers_rec]):.0f}"
        " (each) | |",
        "",
        f"Work sent to the workers per run: {workers_rec[0].get('models_run', 0)} candidate "
        f"models (exact sensitivity), {workers_rec[0].get('calibration_shards', 0)} calibration "
        f"shards; Ray start-up {med([r['startup_s'] for r in workers_rec]):.2f} s. "
        f"Output files identical in every run: {'yes' if same_bytes else 'NO'}; per-node "
        f"choices identical: {'yes' if same_nodes else 'NO'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
