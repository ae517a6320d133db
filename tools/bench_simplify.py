"""onnxsim vs onnxslim vs onnxsqueeze's lossless preset, side by side in one run.

Each tool runs on each corpus model in its own process (peak RSS = that process's VmHWM).
Columns: nodes after (subgraphs included), file size after, wall time, peak RSS, max abs
output difference vs the original on the real probe inputs (onnxruntime without graph
rewrites or weight prepacking, so the graph is what is compared), and onnxruntime latency
of the result (default session, median of --runs on the first probe input). Ratios are
onnxsqueeze / peer from the same run. Needs: pip install onnxsim onnxslim.

Run: python tools/bench_simplify.py [--out docs/benchmarks/simplify.md] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
from onnxsqueeze.run import cpu  # noqa: E402

import corpus  # noqa: E402

PEAK = "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')); print('PEAK_KIB', hwm.split()[1])"
TOOLS = {
    "onnxsim": "import onnx, onnxsim, sys; m, ok = onnxsim.simplify(onnx.load(sys.argv[1])); assert ok; onnx.save(m, sys.argv[2]); "
    + PEAK,
    "onnxslim": "import onnxslim, sys; onnxslim.slim(sys.argv[1], sys.argv[2]); " + PEAK,
    **{
        name: "import sys; from onnxsqueeze.cli import main; "
        f"rc = main([sys.argv[1], '-o', sys.argv[2], '-q', '--quantize', 'none'{extra}] "
        "+ (['--data', sys.argv[3]] if sys.argv[3] else [])); " + PEAK + "; sys.exit(rc)"
        for name, extra in (
            ("onnxsqueeze", ""),
            ("onnxsqueeze-exact", ", '--preset', 'exact'"),
            ("onnxsqueeze-probes", ""),
        )
    },
}
#: What the onnx test-model summary compares.
PEERS_AND_OURS = ("onnxsim", "onnxslim", "onnxsqueeze")


def count_nodes(graph: onnx.GraphProto) -> int:
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.HasField("g"):
                total += count_nodes(attr.g)
            total += sum(count_nodes(g) for g in attr.graphs)
    return total


def session(path: Path | bytes, exact: bool):
    """A CPU session on a model file (or its bytes); ``exact``: graph rewrites and weight
    prepacking off, so the graph itself is what runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def max_abs_diff(original: Path, candidate: Path, feeds: list[dict], exact: bool = True) -> float:
    """Max abs output difference; ``exact=False`` runs the candidate as deployed (onnxruntime's
    fusions and prepacked weights), which on the original itself measures the float noise
    onnxruntime's own optimizer adds."""
    a, b = session(original, True), session(candidate, exact)
    worst = 0.0
    for feed in feeds:
        for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
            worst = max(
                worst, float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
            )
    return worst


def max_abs_output(path: Path, feeds: list[dict]) -> float:
    a = session(path, True)
    return max(
        float(np.abs(np.asarray(x, np.float64)).max()) for f in feeds for x in a.run(None, f)
    )


def latency_ms(path: Path, feed: dict, runs: int) -> float:
    sess = session(path, False)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run_tool(tool: str, model: Path, out: Path, data: str = "") -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", TOOLS[tool], str(model), str(out), data],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]
        return {"error": tail}
    peak = int(proc.stdout.split("PEAK_KIB")[1].split()[0]) / 1024
    return {
        "wall": wall,
        "peak": peak,
        "nodes": count_nodes(onnx.load(str(out), load_external_data=False).graph),
        "bytes": out.stat().st_size,
    }


def run_repeated(tool: str, model: Path, out: Path, data: str, repeat: int) -> dict:
    """run_tool ``repeat`` times: one slow start on a noisy machine must not decide a ratio."""
    results = [run_tool(tool, model, out, data) for _ in range(max(repeat, 1))]
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    merged = dict(results[-1])
    for key in ("wall", "peak"):
        merged[key] = statistics.median(r[key] for r in results)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "simplify.md")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each tool; wall and RSS are medians"
    )
    parser.add_argument(
        "--onnx-tests",
        action="store_true",
        help="instead: the onnx package's test models (summary)",
    )
    args = parser.parse_args()
    if args.onnx_tests:
        onnx_tests(args.out.with_name("simplify_onnx_tests.md"))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in corpus.MODELS:
            if not entry.available():
                continue
            feeds = [dict(np.load(p)) for p in sorted(entry.probe_dir.glob("*.npz"))]
            base = {
                "nodes": count_nodes(onnx.load(str(entry.path)).graph),
                "bytes": entry.path.stat().st_size,
                "latency": latency_ms(entry.path, feeds[0], args.runs),
                "ort_noise": max_abs_diff(entry.path, entry.path, feeds, exact=False),
                "scale": max_abs_output(entry.path, feeds),
            }
            results = {}
            for tool in TOOLS:
                out = Path(tmp, f"{entry.name}.{tool}.onnx")
                # Like the peers, the tools get the model alone (ours then verifies on
                # seeded random inputs); "-probes" also gives ours the real probe inputs.
                data = str(entry.probe_dir) if tool.endswith("-probes") else ""
                result = run_repeated(tool, entry.path, out, data, args.repeat)
                if "error" not in result:
                    result["diff"] = max_abs_diff(entry.path, out, feeds)
                    result["latency"] = latency_ms(out, feeds[0], args.runs)
                results[tool] = result
                print(entry.name, tool, result, flush=True)
            rows.append((entry.name, base, results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, args.runs, args.repeat))
    print(args.out.read_text())


def onnx_tests(out_path: Path) -> None:
    """Every model of the onnx package's light/pytorch-*/simple suites through the three tools."""
    import onnxsqueeze.run.session as runtime

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in corpus.onnx_test_cases():
            proto = onnx.load(str(case.model))
            inits = {t.name for t in proto.graph.initializer}
            names = [i.name for i in proto.graph.input if i.name not in inits]
            feed = dict(zip(names, case.inputs, strict=True)) if case.inputs else None
            data = ""
            if feed is not None and all(np.asarray(v).dtype != object for v in feed.values()):
                data = str(Path(tmp, "feed.npz"))
                np.savez(data, **feed)
            row = {
                "name": case.name,
                "original": count_nodes(proto.graph),
                "bytes": case.model.stat().st_size,
            }
            for tool in PEERS_AND_OURS:
                out = Path(tmp, f"out.{tool}.onnx")
                out.unlink(missing_ok=True)
                result = run_tool(tool, case.model, out, data)
                if "error" not in result and feed is not None:
                    try:
                        result["diff"] = max_abs_diff(case.model, out, [feed])
                    except Exception as exc:  # a tool's output that onnxruntime cannot run
                        result["diff_error"] = str(exc).splitlines()[0][:80]
                row[tool] = result
            rows.append(row)
            print(
                case.name,
                {t: row[t].get("nodes", row[t].get("error")) for t in PEERS_AND_OURS},
                flush=True,
            )
    del runtime
    ok = [r for r in rows if all("nodes" in r[t] for t in PEERS_AND_OURS)]
    le = [
        r
        for r in ok
        if r["onnxsqueeze"]["nodes"] <= min(r["onnxsim"]["nodes"], r["onnxslim"]["nodes"])
    ]

    def grown(tool: str) -> int:
        return sum(1 for r in rows if r[tool].get("bytes", 0) > r["bytes"])

    lines = [
        "# onnx package test models: onnxsim vs onnxslim vs onnxsqueeze",
        "",
        "`python tools/bench_simplify.py --onnx-tests` (light, pytorch-converted, pytorch-operator, simple).",
        "diff = max abs output difference vs the original on the shipped inputs (onnxruntime).",
        "",
        f"- models: {len(rows)}; all three tools succeeded on {len(ok)}",
        f"- onnxsqueeze node count <= min(onnxsim, onnxslim) on {len(le)} of those {len(ok)}",
        f"- output larger than input: onnxsim {grown('onnxsim')}, onnxslim {grown('onnxslim')}, "
        f"onnxsqueeze {grown('onnxsqueeze')} models",
        "",
        "nodes per tool, then file size (KB) per tool: a folded ConstantOfShape can inflate a file.",
        "",
        "| model | original | onnxsim | onnxslim | onnxsqueeze | KB orig / sim / slim / ours | diff onnxsqueeze |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            str(r[t].get("nodes", "error: " + r[t].get("error", "")[:60])) for t in PEERS_AND_OURS
        ]
        diff = r["onnxsqueeze"].get("diff")
        sizes = " / ".join(
            f"{r[t]['bytes'] / 1e3:.1f}" if "bytes" in r[t] else "-" for t in PEERS_AND_OURS
        )
        lines.append(
            f"| {r['name']} | {r['original']} | "
            + " | ".join(cells)
            + f" | {r['bytes'] / 1e3:.1f} / {sizes} | {'' if diff is None else f'{diff:.1e}'} |"
        )
    out_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


def render(rows, runs: int, repeat: int) -> str:
    lines = [
        "# Graph simplification: onnxsim vs onnxslim vs onnxsqueeze (lossless preset)",
        "",
        f"`python tools/bench_simplify.py --runs {runs} --repeat {repeat}`: each tool run {repeat}",
        f"times in its own process on a {cpu.describe()} (wall and peak RSS: medians). nodes include subgraph nodes; diff = max abs output difference vs the",
        "original on the real probe inputs; latency = onnxruntime CPU median (ms) on one probe input.",
        "Every tool gets the model file alone, as a user types it; onnxsqueeze's wall time includes",
        "its verification (on seeded random inputs then). onnxsqueeze-probes = the same default run",
        "given the real probe inputs (`--data`), so it verifies on them: a pre-deployment check",
        "the peers do not make.",
        "onnxsqueeze = the default (lossless) preset, whose fusions scale weights (float",
        "reassociation, like the peers' BN fusion); onnxsqueeze-exact = `--preset exact`, only",
        "rewrites that round like the original. ORT optimizer = the original itself run with",
        "onnxruntime's default optimizations (its fusions, prepacked weights) against the plain",
        "graph: the float noise every deployment of the original already carries. rel = max abs",
        "diff / max abs output.",
        "",
        "| model | tool | nodes | file MB | wall s | peak RSS MiB | max abs diff | latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for name, base, results in rows:
        lines.append(
            f"| {name} | original | {base['nodes']} | {base['bytes'] / 1e6:.2f} | | | "
            f"ORT optimizer: {base['ort_noise']:.2e} | {base['latency']:.2f} |"
        )
        for tool, r in results.items():
            if "error" in r:
                lines.append(f"| {name} | {tool} | error: {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {name} | {tool} | {r['nodes']} | {r['bytes'] / 1e6:.2f} | {r['wall']:.2f} | {r['peak']:.0f} | "
                f"{r['diff']:.2e} | {r['latency']:.2f} |"
            )
        ours, exact, probes, sim, slim = (
            results.get(t, {})
            for t in (
                "onnxsqueeze",
                "onnxsqueeze-exact",
                "onnxsqueeze-probes",
                "onnxsim",
                "onnxslim",
            )
        )
        if "nodes" not in ours and "nodes" in probes:
            # generated inputs cannot run this model (silero: a sample rate, an audio
            # length): the tool asks for --data, so the run with it stands in
            wall_alone = "needs --data"
            ours = probes
            exact = exact if "nodes" in exact else {"nodes": "-", "diff": float("nan")}
        else:
            wall_alone = f"{ours.get('wall', float('nan')) / slim.get('wall', float('nan')):.2f}"
        if all("nodes" in r for r in (ours, exact, probes, sim, slim)):
            summary.append(
                f"| {name} | {ours['nodes']} / {exact['nodes']} vs {min(sim['nodes'], slim['nodes'])} | "
                f"{ours['diff']:.1e} / {exact['diff']:.1e} vs {min(sim['diff'], slim['diff']):.1e} | "
                f"{base['ort_noise']:.1e} | {ours['diff'] / base['scale']:.1e} | "
                f"{wall_alone} | {probes['wall'] / slim['wall']:.2f} | "
                f"{ours['peak'] / sim['peak']:.2f} | "
                f"{ours['bytes'] / base['bytes']:.3f} |"
            )
    lines += [
        "",
        "## Ratios (same run)",
        "",
        "| model | nodes: ours / exact vs min(peers) | max abs diff: ours / exact vs min(peers) "
        "| ORT optimizer on the original | ours rel | wall: ours / onnxslim "
        "| wall: ours with probes / onnxslim | peak RSS: ours / onnxsim | file: ours / original |",
        "|---|---|---|---|---|---|---|---|---|",
        *summary,
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
