"""Calibration: onnxruntime's MinMax/Entropy/Percentile calibrators vs onnxsqueeze's, side
by side in one run, each run in its own process (peak RSS = that process's VmHWM).

Samples are real and of one fixed shape per model (onnxruntime's histogram calibrators
crash on mixed shapes): MiniLM sentences padded to 32 tokens, PP-OCR det pages at 256x256,
PP-OCR cls text lines, magika features of real files. ORT runs with quantize_static's
settings made equal on both sides (see SETTINGS).
The floor is plain fp32 inference over the same samples (default session).

    python tools/bench_calib.py [--sizes 16 64 256] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
from onnxsqueeze.run import cpu  # noqa: E402

import corpus  # noqa: E402

METHODS = ("minmax", "entropy", "percentile")
MEMORY_LIMIT = 16 << 30


# ---------------------------------------------------------------------------- samples


def make_samples(name: str, count: int, folder: Path) -> None:
    import build_corpus as bc

    folder.mkdir(parents=True, exist_ok=True)
    if name == "minilm":
        import minilm_export

        sentences = bc.english_sentences(count)
        model_dir = corpus.corpus_dir() / "minilm" / "package"
        for i, sentence in enumerate((sentences * count)[:count]):
            feed = minilm_export.tokenize(model_dir, [sentence])
            for key, value in feed.items():
                padded = np.zeros((1, 32), np.int64)
                padded[:, : min(32, value.shape[1])] = value[:, :32]
                feed[key] = padded
            np.savez(folder / f"{i:04d}.npz", **feed)
    elif name in ("ppocr_det", "ppocr_cls"):
        lines = [" ".join(s.split()[:6]) for s in bc.english_sentences(max(count, 64))]
        for i in range(count):
            if name == "ppocr_cls":
                x = bc.ocr_cls_input(bc.render_line(lines[i % len(lines)]))
            else:
                page = bc.ocr_det_input([lines[(i + k) % len(lines)] for k in range(3)])
                x = np.zeros((1, 3, 256, 256), np.float32)
                h, w = min(256, page.shape[2]), min(256, page.shape[3])
                x[..., :h, :w] = page[..., :h, :w]
            np.savez(folder / f"{i:04d}.npz", x=x)
    elif name == "magika":
        files = bc.real_files(count)
        for i in range(count):
            feats = bc.magika_features(files[i % len(files)])[None]
            np.savez(folder / f"{i:04d}.npz", bytes=feats)


# ---------------------------------------------------------------------------- children

CHILD_ORT = """
import sys, glob, time, numpy as np, tempfile, os, json
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
model, data, n, method = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
files = sorted(glob.glob(data + '/*.npz'))[:n]
class Reader:
    def __init__(self): self.it = iter(files)
    def get_next(self):
        f = next(self.it, None)
        return None if f is None else dict(np.load(f))
extra = json.loads(sys.argv[6])
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    cal = create_calibrator(model, augmented_model_path=os.path.join(tmp, 'aug.onnx'),
        calibrate_method={'minmax': CalibrationMethod.MinMax, 'entropy': CalibrationMethod.Entropy,
                          'percentile': CalibrationMethod.Percentile}[method], extra_options=extra)
    cal.collect_data(Reader())
    data = cal.compute_data()
print('CALIB_S', time.perf_counter() - start)
ranges = {k: [float(np.asarray(r).reshape(-1)[0]) for r in v.range_value] for k, v in data.data.items()}
for k, h in getattr(getattr(cal, 'collector', None), 'histogram_dict', {}).items():  # its bin width, to compare in
    if k in ranges and len(h) > 1 and len(h[1]) > 1:
        ranges[k].append(float(h[1][1] - h[1][0]))
open(sys.argv[5], 'w').write(json.dumps(ranges))
"""

CHILD_OURS = """
import sys, json, time
import onnxsqueeze, onnxsqueeze.api, onnxsqueeze.calib.collector, onnxsqueeze.run.feeds  # imports are not calibration
model, data, n, method = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
options = json.loads(sys.argv[6])
start = time.perf_counter()
result = onnxsqueeze.calibrate(model, data, method=method, samples=n)
ranges = {k: [float(lo), float(hi)] for k, (lo, hi) in result.ranges(method, **options).items()}
print('CALIB_S', time.perf_counter() - start)
for k, r in ranges.items():  # our bin width, to compare in
    obs = result.observers[k]
    r.append(2 * obs.t / obs.bins if hasattr(obs, 't') else 0.0)
open(sys.argv[5], 'w').write(json.dumps(ranges))
"""

#: The same settings on both sides ("same bins"): ORT's extra_options, our range options.
SETTINGS = {
    "minmax": ({}, {}),
    "entropy": (
        {"num_bins": 512, "num_quantized_bins": 128},
        {"entropy_bins": 512, "quantized_bins": 128},
    ),
    "percentile": (
        {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
        {"percentile": 99.999, "symmetric": True},
    ),
}

PEAK = "\nhwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')); print('PEAK_KIB', hwm.split()[1])\n"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_child(tool: str, model: Path, data: Path, n: int, method: str, timeout: int) -> dict:
    code = (CHILD_ORT if tool == "ort" else CHILD_OURS) + PEAK
    options = json.dumps(SETTINGS[method][0 if tool == "ort" else 1])
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    code,
                    str(model),
                    str(data),
                    str(n),
                    method,
                    out.name,
                    options,
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=_limit_memory,
                cwd=tempfile.gettempdir(),
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timeout > {timeout} s"}
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1][:80]
            if (
                proc.returncode < 0
                or "MemoryError" in last
                or "bad_alloc" in last
                or "Failed to allocate" in proc.stderr
            ):
                last = f"out of memory (> {MEMORY_LIMIT >> 30} GiB)"
            return {"error": last.replace("|", "/")}
        peak = int(proc.stdout.split("PEAK_KIB")[1].split()[0]) / 1024
        calib = float(proc.stdout.split("CALIB_S")[1].split()[0])
        return {
            "wall": wall,
            "calib": calib,
            "peak": peak,
            "ranges": json.loads(Path(out.name).read_text()),
        }


def warm_up() -> None:
    """Fill numba's on-disk cache (a fresh install compiles the kernels once, a few seconds)
    so that no timed child pays for compilation: onnxruntime has nothing to compile."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import numpy as np; from onnxsqueeze.calib.observers import observer_for as o\n"
            "for m in ('minmax', 'percentile'):\n"
            "    h = o(m, 8192); h.update(np.arange(-9.0, 9.0, dtype=np.float32))\n"
            "    h.update(np.array([1e3, np.nan], np.float32))\n"
            "    for r in (('minmax',) if m == 'minmax' else ('percentile', 'entropy', 'mse')):\n"
            "        h.range(r)",
        ],
        check=True,
        cwd=tempfile.gettempdir(),
    )


def fp32_seconds(model: Path, data: Path, n: int, plain: bool = False) -> float:
    """Inference alone over the samples, median of 3 passes. ``plain``: with onnxruntime's
    graph rewrites off, the graph whose values ORT's calibrators (and so ours, whose MinMax
    ranges must equal theirs) observe; its time is a floor for any such calibrator."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if plain:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feeds = [dict(np.load(f)) for f in sorted(data.glob("*.npz"))[:n]]
    session.run(None, feeds[0])
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        passes.append(time.perf_counter() - start)
    return sorted(passes)[1]


def compare(ours: dict, theirs: dict, method: str) -> str:
    """minmax: max |difference| of the ranges (must be 0). percentile (symmetric): the
    bounds max(|lo|, |hi|) compared in units of ORT's own bin width and of the wider of the
    two bins (each child reports its width as a third number; both take a bin's lower edge,
    so they can differ by less than the wider bin). entropy: max |difference| of the ranges."""
    shared = set(ours) & set(theirs)
    if not shared:
        return "-"
    if method == "percentile":
        worst = wider = 0.0
        for k in shared:
            mine, their = max(map(abs, ours[k][:2])), max(map(abs, theirs[k][:2]))
            worst = max(worst, abs(mine - their) / max(theirs[k][2], 1e-30))
            wider = max(wider, abs(mine - their) / max(theirs[k][2], ours[k][2], 1e-30))
        return (
            f"{len(shared)} shared, bounds within {worst:.2f} ORT bins, "
            f"{wider:.2f} of the wider bin"
        )
    diff = max(
        max(abs(a - b) for a, b in zip(ours[k][:2], theirs[k][:2], strict=True)) for k in shared
    )
    return f"{len(shared)} shared, max diff {diff:.2g}"


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 256])
    parser.add_argument(
        "--models", nargs="+", default=["ppocr_cls", "magika", "minilm", "ppocr_det"]
    )
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "calibration.md")
    args = parser.parse_args()
    rows = []
    warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            entry = corpus.get(name)
            if not entry.available():
                print(f"{name}: not built, skipped", flush=True)
                continue
            data = Path(tmp, name)
            make_samples(name, max(args.sizes), data)
            for n in args.sizes:
                floor = fp32_seconds(entry.path, data, n)
                plain = fp32_seconds(entry.path, data, n, plain=True)
                for method in args.methods:
                    results = {
                        tool: run_child(tool, entry.path, data, n, method, args.timeout)
                        for tool in ("ort", "ours")
                    }
                    rows.append((name, n, method, (floor, plain), results))
                    brief = {
                        t: {k: v for k, v in r.items() if k != "ranges"} for t, r in results.items()
                    }
                    print(
                        name, n, method, f"fp32 {floor:.2f}s plain {plain:.2f}s", brief, flush=True
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, args))
    print(args.out.read_text())


def render(rows, args) -> str:
    lines = [
        "# Calibration: onnxruntime.quantization calibrators vs onnxsqueeze",
        "",
        f"`python tools/bench_calib.py --sizes {' '.join(map(str, args.sizes))} "
        f"--methods {' '.join(args.methods)}` (one run, "
        f"{cpu.describe()}, each calibration in its own process, memory capped at 16 GiB, timeout "
        f"{args.timeout} s). wall = whole process (imports, session, collection, range "
        "computation); calib = inside the process, from creating the calibrator to having every "
        "range (no imports); fp32 = plain inference over the same samples (default session, "
        "median of 3 passes); fp32 unopt = the same with onnxruntime's graph rewrites off, the "
        "graph ORT's calibrators observe and whose values MinMax must reproduce: a floor for "
        "any calibrator that matches them (its ratio to fp32 is the best calib / fp32 can be); "
        "RSS = peak of the process. Entropy on both sides: 512 bins, 128 quantized bins; "
        "percentile: 99.999, symmetric, ORT: 2048 bins of |x|, ours: 8192 signed bins over "
        "[-t, t) with t the power of two above max|x|, folded; both take the lower edge of the "
        "bin where the cumulative mass reaches the percentile. ranges = max |ours - ORT| over shared tensors (minmax must be 0).",
        "",
        "| model | N | method | fp32 s | fp32 unopt s | ORT wall s | ours wall s | ORT calib s "
        "| ours calib s | speed-up (calib) | ours calib / fp32 | unopt / fp32 | ORT RSS MiB "
        "| ours RSS MiB | ranges ours vs ORT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, method, (floor, plain), res in rows:
        ort, ours = res["ort"], res["ours"]

        def cell(r, key, fmt):
            if key in r:
                return format(r[key], fmt)
            return r["error"][:60] if "error" in r and key == "wall" else "-"

        speed = (
            f"{ort['calib'] / ours['calib']:.1f}x" if "calib" in ort and "calib" in ours else "-"
        )
        ratio = f"{ours['calib'] / floor:.1f}" if "calib" in ours else "-"
        ranges = compare(ours.get("ranges", {}), ort.get("ranges", {}), method)
        lines.append(
            f"| {name} | {n} | {method} | {floor:.2f} | {plain:.2f} | {cell(ort, 'wall', '.2f')} | "
            f"{cell(ours, 'wall', '.2f')} | {cell(ort, 'calib', '.2f')} | "
            f"{cell(ours, 'calib', '.2f')} | {speed} | {ratio} | {plain / floor:.2f} | "
            f"{cell(ort, 'peak', '.0f')} | "
            f"{cell(ours, 'peak', '.0f')} | {ranges} |"
        )
    lines += ["", "## Peak RSS growth, ours: N=max / N=min", ""]
    sizes = sorted({n for _, n, *_ in rows})
    for name in dict.fromkeys(r[0] for r in rows):
        for method in args.methods:
            peaks = {
                n: res["ours"].get("peak")
                for m_name, n, m, _, res in rows
                if m_name == name and m == method
            }
            lo, hi = peaks.get(sizes[0]), peaks.get(sizes[-1])
            if lo and hi:
                lines.append(f"- {name} {method}: {hi / lo:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
