"""Is ``onnxsqueeze bench`` repeatable? Two separate runs (two processes, one after the other)
of the same bench, and how far their medians and ratios moved between them.

    python tools/bench_repeat.py MODEL_A MODEL_B [--data DIR] [--batch 1,8] \
        --out docs/benchmarks/bench_repeat.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "onnxsqueeze", "bench", *args.models, "--json", str(out), "-q"]
    if args.data:
        command += ["--data", args.data]
    command += ["--batch", args.batch, "--rounds", str(args.rounds)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="docs/benchmarks/bench_repeat.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first, second = (run_once(args, Path(tmp) / f"run{i}.json") for i in (1, 2))
    lines = [
        "# bench, run twice: how far the figures move between two separate runs",
        "",
        f"`python tools/bench_repeat.py {' '.join(sys.argv[1:])}` on {first['machine']}.",
        "",
        "| model | batch | p50 ms run 1 | p50 ms run 2 | p50 moved | spread 1 / 2 | speed run 1 | "
        "speed run 2 | speed moved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for a, b in zip(first["results"], second["results"], strict=True):
        p50 = b["p50_ms"] / a["p50_ms"] - 1
        speed = b["speedup"] / a["speedup"] - 1
        worst = max(worst, abs(speed))
        lines.append(
            f"| {Path(a['model']).name} | {a['batch']} | {a['p50_ms']:.3f} | {b['p50_ms']:.3f} | "
            f"{p50:+.1%} | {a['spread']:.1%} / {b['spread']:.1%} | {a['speedup']:.3f}x | "
            f"{b['speedup']:.3f}x | {speed:+.1%} |"
        )
    lines += [
        "",
        f"Largest change of a ratio between the two runs: {worst:.1%} (the goal: within 10 %). "
        "Absolute medians move with the machine's load; the ratios, timed in interleaved rounds, "
        "are what to compare.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
