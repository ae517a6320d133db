"""What creating a session costs: its load time and the memory it adds, each measured in a
fresh child process so that every model meets the same conditions.

Measured in one process, one model after another, the figures depend on the order: memory
that the first session's allocator freed stays mapped and the second session reuses it
without a byte more of RSS (MiniLM: 133 MB as the first session, 89 MB after another's).
The child starts the provider on a one-node model first (a CUDA context costs hundreds of
MB and seconds, once per process), then loads the model, runs it once, and reports.

``python -m onnxsqueeze.run.session_cost MODEL PROVIDER THREADS FEED.npz`` prints one JSON.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxsqueeze.core.errors import first_line
from onnxsqueeze.core.scratch import scratch_dir
from onnxsqueeze.run.memory import gpu_memory_used, peak_rss_since, reset_peak_rss, rss_bytes
from onnxsqueeze.run.session import prepare_gpu

#: Providers whose session needs these after it (onnxruntime's own fallback order).
_FALLBACKS = {
    "TensorrtExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "CUDAExecutionProvider": ["CPUExecutionProvider"],
    "CPUExecutionProvider": [],
}


def bench_session(path: Path, provider: str, threads: int | None) -> Any:
    """A session as deployed: from the file, onnxruntime's default optimizations, the
    provider first and its usual fallbacks after it; node placement recorded."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    chain = [provider, *_FALLBACKS.get(provider, ["CPUExecutionProvider"])]
    prepare_gpu(chain)
    return ort.InferenceSession(str(path), options, providers=chain)


def prime(provider: str, threads: int | None) -> str | None:
    """Run a one-node model on ``provider``, so that its one-time start is not charged to
    the first model measured. Returns why the provider cannot run (None: it can): a build
    that lists TensorRT without its libraries falls back to CUDA with a page of errors on
    stderr, which is kept out of the terminal and read for its cause."""
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "prime", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with scratch_dir("prime") as tmp:
        path = Path(tmp) / "prime.onnx"
        onnx.save(model, str(path))
        log = Path(tmp) / "stderr.txt"
        with _stderr_to(log):
            try:
                session = bench_session(path, provider, threads)
                session.run(None, {"x": np.ones(4, np.float32)})
            except Exception as exc:
                return first_line(exc)
        if provider in session.get_providers():
            return None
        causes = [
            line.strip()
            for line in log.read_text(errors="replace").splitlines()
            if "error" in line.lower() and "cannot open" in line.lower()
        ]
        cause = causes[0].rsplit("error: ", 1)[-1] if causes else "it did not start"
        return f"onnxruntime fell back to {', '.join(session.get_providers())} ({cause})"


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 (where onnxruntime's C++ logs go) into ``path`` for the block."""
    import os

    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure(path: Path, provider: str, threads: int | None, feed: Mapping[str, Any]) -> dict:
    """In this process: prime, then load ``path`` and run it once; what that added."""
    prime(provider, threads)
    before, gpu_before = rss_bytes(), gpu_memory_used(provider)
    reset_peak_rss()
    start = time.perf_counter()
    session = bench_session(path, provider, threads)
    create_ms = (time.perf_counter() - start) * 1000
    session.run(None, dict(feed))
    gpu_after = gpu_memory_used(provider)
    gpu = None if gpu_before is None or gpu_after is None else max(0, gpu_after - gpu_before)
    return {
        "create_ms": create_ms,
        "memory_bytes": peak_rss_since(before),
        "gpu_memory_bytes": gpu,
    }


def session_cost(
    path: Path, provider: str, threads: int | None, feed: Mapping[str, Any]
) -> dict[str, Any]:
    """``measure`` in a child process; on failure ``{"error": ...}``."""
    with scratch_dir("cost") as tmp:
        feed_path = Path(tmp) / "feed.npz"
        np.savez(feed_path, **{k: np.asarray(v) for k, v in feed.items()})
        log = Path(tmp) / "stderr.txt"
        with log.open("wb") as err:  # a pipe could fill and block the child
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxsqueeze.run.session_cost",
                    str(path),
                    provider,
                    str(threads or 0),
                    str(feed_path),
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                check=False,
            )
        if done.returncode != 0:
            lines = log.read_text(errors="replace").strip().splitlines()
            return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    path, provider, threads, feed_path = argv
    with np.load(feed_path, allow_pickle=False) as data:
        feed = {k: data[k] for k in data.files}
    try:
        result = measure(Path(path), provider, int(threads) or None, feed)
    except Exception as exc:
        sys.stderr.write(first_line(exc) + "\n")
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
