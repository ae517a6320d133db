"""Time `onnxsqueeze --help` (process start to exit): median of N runs, and the heavy
modules it imports (there should be none)."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=21, help="runs (default: %(default)s)")
    args = parser.parse_args()
    exe = shutil.which("onnxsqueeze")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "onnxsqueeze", "--help"]
    times = []
    for _ in range(args.n):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    print(f"onnxsqueeze --help: median {statistics.median(times) * 1000:.0f} ms over {args.n} runs")
    print(f"  min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
