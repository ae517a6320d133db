"""``onnxsqueeze bench A.onnx [B.onnx ...]``: latency, throughput, load time and memory per
execution provider and batch size, models interleaved, ratios against the first model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxsqueeze.cli.arguments import Parser, count_value, text_value
from onnxsqueeze.cli.reports import add_report_flags, check_reports, run_command, write_reports


def build_bench_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="onnxsqueeze bench",
        description="Time models side by side on onnxruntime execution providers: p50/p90/p99 "
        "latency over interleaved rounds, their spread, throughput, session load time and "
        "memory, file size; ratios against the first model.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", type=text_value)
    parser.add_argument(
        "--providers", default="cpu", type=text_value, help="cpu,cuda,tensorrt (default cpu)"
    )
    parser.add_argument(
        "--batch",
        default=None,
        type=_batches,
        help="batch sizes, e.g. 1,8 (the first axis of inputs where it is dynamic; default: "
        "as the data or generated inputs have it)",
    )
    parser.add_argument("--shape", action="append", default=[], type=text_value)
    parser.add_argument("--data", type=text_value, help=".npz or a folder of them")
    parser.add_argument("--threads", type=count_value, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=count_value, default=10, help="interleaved rounds")
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the load-time and memory measurement (a child process per model)",
    )
    add_report_flags(parser)
    return parser


def _batches(value: str) -> list[int]:
    sizes = []
    for item in value.split(","):
        sizes.append(count_value(item.strip()))
    return sizes


def run_bench(args: argparse.Namespace) -> int:
    from onnxsqueeze.cli.destinations import read_files
    from onnxsqueeze.cli.tables import progress_bar
    from onnxsqueeze.pipeline.html import bench_page
    from onnxsqueeze.run.bench import bench

    reads: dict = {}
    for model in args.models:
        reads.update(read_files(model, args.data, None))
    check_reports(args, reads)
    with progress_bar(not args.quiet) as progress:
        report = bench(
            args.models,
            providers=[p.strip() for p in args.providers.split(",") if p.strip()],
            batches=args.batch or [None],
            shapes=args.shape,
            data=args.data,
            threads=args.threads,
            rounds=args.rounds,
            measure_cost=not args.no_memory,
            progress=progress,
        )
    write_reports(args, "bench", report.as_dict(), lambda: bench_page(report))
    for warning in report.warnings:
        print(f"onnxsqueeze: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(bench_table(report))
    failed = [r for r in report.results if r.status == "failed"]
    return 1 if failed else 0


def bench_table(report) -> str:
    from onnxsqueeze.cli.tables import render
    from onnxsqueeze.run.bench import FIGURES
    from onnxsqueeze.run.session import short_name

    rows = []
    for r in report.results:
        if r.status == "unavailable":  # one note per provider below, not a row per model
            continue
        ok = r.status == "ok"
        rows.append(
            [
                r.model,
                short_name(r.provider),
                r.batch or "-",
                _ms(r.p50_ms) if ok else r.status,
                _ms(r.p90_ms) if ok else "",
                _ms(r.p99_ms) if ok else "",
                f"{r.spread * 100:.1f}%" if ok and r.spread is not None else "",
                f"{r.speedup:.2f}x" if r.speedup else "",
                f"{r.throughput:.1f}" if r.throughput else "",
                _ms(r.create_ms),
                _mib(r.memory_bytes),
                _mib(r.gpu_memory_bytes),
                _mib(r.size_bytes),
            ]
        )
    headers = ["model", "provider", "batch", *FIGURES]
    text = render(headers, rows, right=range(2, len(headers)))
    notes = [
        f"  {short_name(r.provider)}: {r.status}: {r.reason}"
        if r.status == "unavailable"
        else f"  {r.model} on {short_name(r.provider)}: {r.reason}"
        for r in report.results
        if r.reason  # unavailable, failed, or a load cost that could not be measured
    ]
    legend = (
        f"{report.rounds} interleaved rounds on {report.machine}; spread: between the "
        "fastest and slowest round's median, of p50; speed: the first model's p50 / this p50"
    )
    return "\n".join([text, legend, *dict.fromkeys(notes)])


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def main(argv: Sequence[str]) -> int:
    return run_command(build_bench_parser(), run_bench, argv)
