"""``onnxsqueeze inspect model.onnx``: what a model holds and what the default squeeze would
try, without reading its weights."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxsqueeze.cli.arguments import Parser, text_value
from onnxsqueeze.cli.reports import add_report_flags, check_reports, run_command, write_reports


def build_inspect_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="onnxsqueeze inspect",
        description="Op histogram, parameters by dtype and op, opsets, inputs/outputs with "
        "dynamic dims, subgraphs, external data, quantization state, and what the default "
        "squeeze would try. Weights are not read (a > 2 GB model's external data is stat()ed).",
    )
    parser.add_argument("model", metavar="MODEL", type=text_value)
    parser.add_argument("--data", type=text_value, help="say what the squeeze would do with it")
    add_report_flags(parser, html=False)
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onnxsqueeze.cli.destinations import read_files
    from onnxsqueeze.core.inventory import inventory
    from onnxsqueeze.core.io import read_model_file
    from onnxsqueeze.stages.preview import preview

    check_reports(args, read_files(args.model, None, None))
    facts = inventory(args.model)
    proto = read_model_file(Path(args.model))
    plan = preview(proto, facts, has_data=args.data is not None)
    write_reports(args, "inspect", {**facts.as_dict(), "squeeze": plan}, None)
    if not args.quiet:
        print(inspect_text(facts, plan))
    return 0


def inspect_text(facts, plan) -> str:
    from onnxsqueeze.cli.tables import render

    out = [
        f"{facts.path}: {_size(facts.total_bytes)}"
        + (
            f" ({_size(facts.file_bytes)} + external data "
            + ", ".join(f"{k} {_size(v)}" for k, v in facts.external_files.items())
            + ")"
            if facts.external_files
            else ""
        ),
        f"  ir {facts.ir_version}, opsets "
        + ", ".join(f"{d} {v}" for d, v in facts.opsets.items())
        + (f", from {facts.producer}" if facts.producer else ""),
        f"  {facts.nodes} nodes, {len(facts.ops)} op types"
        + (f", {len(facts.subgraphs)} subgraphs" if facts.subgraphs else "")
        + (f", {len(facts.functions)} functions" if facts.functions else ""),
        f"  quantization: {facts.quantization['state']}"
        + (
            f", {facts.quantization['qdq_pairs']} Q/DQ pairs"
            if facts.quantization["qdq_pairs"]
            else ""
        )
        + (
            ", integer ops "
            + ", ".join(f"{k} {v}" for k, v in facts.quantization["integer_ops"].items())
            if facts.quantization["integer_ops"]
            else ""
        ),
        "",
    ]
    io_rows = [
        [
            kind,
            v["name"],
            v["type"],
            _shape(v.get("shape")),
            ", ".join(v.get("dynamic") or []) or "-",
        ]
        for kind, values in (("input", facts.inputs), ("output", facts.outputs))
        for v in values
    ]
    out.append(render(["", "name", "type", "shape", "dynamic dims"], io_rows))
    out.append("")
    total = sum(d["bytes"] for d in facts.params_by_dtype.values()) or 1
    dtype_rows = [
        [t, d["tensors"], f"{d['elements']:,}", _size(d["bytes"]), f"{d['bytes'] / total:.1%}"]
        for t, d in facts.params_by_dtype.items()
    ]
    out.append(
        render(["weights", "tensors", "elements", "bytes", "share"], dtype_rows, right=(1, 2, 3, 4))
    )
    out.append("")
    op_rows = [
        [op, n, _size(facts.params_by_op.get(op, 0)) if op in facts.params_by_op else "-"]
        for op, n in facts.ops.items()
    ]
    out.append(render(["op", "count", "weights read"], op_rows, right=(1, 2)))
    if facts.subgraphs:
        out.append("")
        out.append(
            render(
                ["subgraph", "nodes"],
                [[s["where"], s["nodes"]] for s in facts.subgraphs],
                right=(1,),
            )
        )
    out.append("")
    out.append("the default squeeze would try:")
    out.append("  lossless: " + ", ".join(dict.fromkeys(plan["passes"])))
    out += [f"  {line}" for line in plan["notes"]]
    return "\n".join(out)


def _shape(shape) -> str:
    return "unknown" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main(argv: Sequence[str]) -> int:
    return run_command(build_inspect_parser(), run_inspect, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
