"""``onnxsqueeze compare original.onnx squeezed.onnx``: per-output error, and with
``--per-tensor`` the intermediate tensors matched by name, in topological order, with the
first one whose error jumps named."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from onnxsqueeze.cli.arguments import Parser, count_value, text_value
from onnxsqueeze.cli.reports import add_report_flags, check_reports, run_command, write_reports


def build_compare_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="onnxsqueeze compare",
        description="Run two models on the same inputs: per output max abs/rel error, cosine, "
        "SQNR, top-1/top-5 agreement; --per-tensor compares every intermediate tensor the "
        "two share (also across Q/DQ pairs) and names the first whose error jumps.",
    )
    parser.add_argument("original", metavar="ORIGINAL", type=text_value)
    parser.add_argument("candidate", metavar="SQUEEZED", type=text_value)
    parser.add_argument("--data", type=text_value, help=".npz or a folder of them")
    parser.add_argument("--shape", action="append", default=[], type=text_value)
    parser.add_argument("--samples", type=count_value, default=4, help="inputs compared")
    parser.add_argument("--per-tensor", action="store_true")
    parser.add_argument("--providers", default="cpu", type=text_value)
    add_report_flags(parser)
    return parser


def run_compare(args: argparse.Namespace) -> int:
    from onnxsqueeze.cli.destinations import read_files
    from onnxsqueeze.pipeline.html import compare_page
    from onnxsqueeze.run.model_compare import compare_models

    reads = {**read_files(args.original, args.data, None), **read_files(args.candidate, None, None)}
    check_reports(args, reads)
    result = compare_models(
        args.original,
        args.candidate,
        data=args.data,
        shapes=args.shape,
        samples=args.samples,
        per_tensor=args.per_tensor,
        providers=[p.strip() for p in args.providers.split(",") if p.strip()],
    )
    write_reports(args, "compare", result.as_dict(), lambda: compare_page(result))
    if not args.quiet:
        print(compare_text(result))
    return 0


def compare_text(result) -> str:
    from onnxsqueeze.cli.tables import render

    rows = [
        [
            o.name,
            o.mismatch or _e(o.max_abs),
            "" if o.mismatch else _e(o.max_rel),
            "" if o.mismatch else f"{o.cosine:.6f}",
            "" if o.mismatch else _db(o.sqnr_db),
            _share(o.top1_agreement),
            _share(o.top5_agreement),
        ]
        for o in result.outputs.outputs
    ]
    out = [
        f"{result.candidate} against {result.original} on {result.samples} "
        f"{'samples of --data' if result.inputs == 'data' else 'generated inputs'}",
        render(
            ["output", "max abs", "max rel", "cosine", "SQNR dB", "top-1", "top-5"],
            rows,
            right=range(1, 7),
        ),
    ]
    report = result.tensors
    if report is None:
        return "\n".join(out)
    first = report.first_jump
    tensor_rows = [
        [
            t.index,
            t.name,
            t.op,
            _e(t.rel_rms),
            f"{t.cosine:.6f}",
            _e(t.inherited),
            "" if t.after_qdq is None else _e(t.after_qdq),
            "<< first jump" if t is first else ("jump" if t.is_jump() else ""),
        ]
        for t in report.tensors
    ]
    out += [
        "",
        render(
            ["#", "tensor", "op", "rel RMS", "cosine", "inherited", "after Q/DQ", ""],
            tensor_rows,
            right=(0, 3, 4, 5, 6),
        ),
        "rel RMS: the tensor's RMS error over its RMS; inherited: the largest rel RMS among "
        "the matched tensors it is computed from; a jump adds 10x what it inherits (> 1e-3)",
    ]
    if first is None:
        out.append("no tensor's error jumps")
    else:
        out.append(
            f"first jump: '{first.name}' ({first.op}, node #{first.index}): rel RMS "
            f"{_e(first.rel_rms)}, inherited {_e(first.inherited)}"
        )
        largest = ", ".join(f"'{t.name}' {_e(t.rel_rms)}" for t in report.largest_jumps())
        out.append(f"largest jumps: {largest}")
    if report.unmatched:
        out.append(
            f"{len(report.unmatched)} tensors of the original have no counterpart (fused or "
            f"removed), e.g. {', '.join(report.unmatched[:3])}"
        )
    if report.skipped:
        out.append(report.skipped)
    return "\n".join(out)


def _e(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2e}"


def _db(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.1f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main(argv: Sequence[str]) -> int:
    return run_command(build_compare_parser(), run_compare, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
