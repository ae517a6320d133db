"""The command line's arguments: the parser, a type for every value, and the checks that need
more than one flag. A value of the wrong kind (``--outlier-ratio nan``, ``--calib-samples
99999999999999999999``, ``--data ''``) is a usage error in one line, before any work, and so
is a flag ``--passes`` would silently leave out (``--passes cleanup --quantize static``)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from onnxsqueeze import __version__

EXIT_USAGE = 2
#: The largest count a flag takes: more samples than any run could load.
MAX_COUNT = 2**31 - 1
#: What each stage flag means when not given (None in the parser, so that giving it with
#: --passes, which runs only the passes named, can be told from not giving it).
STAGE_DEFAULTS = {
    "quantize": "auto",
    "factorize": "off",
    "prune": "off",
    "calib_method": "auto",
    "activations": "uint8",
    "weight_format": "auto",
}
#: Flags that only the stages read: --passes runs the passes it names and nothing else.
STAGE_FLAGS = {
    **{name: "--" + name.replace("_", "-") for name in STAGE_DEFAULTS},
    "calib_samples": "--calib-samples",
    "outlier_ratio": "--outlier-ratio",
    "require_faster": "--require-faster",
    "reduce_range": "--reduce-range",
    "max_error": "--max-error",
    "min_cosine": "--min-cosine",
    "min_top1_agreement": "--min-top1-agreement",
    "exclude_nodes": "--exclude-nodes",
    "exclude_ops": "--exclude-ops",
    "eval_data": "--eval-data",
    "holdout": "--holdout",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to look), not the 16-line usage."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)  # "onnxsqueeze bench": say which --help
        where = f"{self.prog} --help" if len(command) > 1 else "--help"
        print(f"{command[0]}: error: {message} (see {where})", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def text_value(value: str) -> str:
    """A value that may not be empty: ``--data ''`` would read the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("needs a value, got an empty one")
    return value


def count_value(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_COUNT}, got {value!r}"
        )
    return number


def _number(low: float, high: float = math.inf) -> Callable[[str], float]:
    """A finite float in [low, high] (``nan`` compares false with every bound, so a plain
    range check would let it through)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and low <= number <= high):
            where = f"at least {low:g}" if math.isinf(high) else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"must be a number {where}, got {value!r}")
        return number

    return parse


def _outlier_ratio(value: str) -> float:
    number = _number(0)(value)
    if 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a ratio above 1, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="onnxsqueeze",
        description="Compress an ONNX model with verified graph passes.",
        epilog="Example: onnxsqueeze model.onnx -o small.onnx --report report.json. "
        "Other commands (each with --help): onnxsqueeze inspect MODEL | "
        "onnxsqueeze bench MODEL [MODEL ...] | onnxsqueeze compare ORIGINAL SQUEEZED",
    )
    parser.add_argument("model", nargs="?", help="input .onnx file")
    parser.add_argument(
        "-o", "--output", type=text_value, help="output .onnx file (written atomically)"
    )
    parser.add_argument(
        "--passes",
        type=text_value,
        help="comma-separated pass or preset names (see --list-passes)",
    )
    parser.add_argument(
        "--preset",
        type=text_value,
        default="default",
        help="named pass list (default: %(default)s)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="PASS.KEY=VALUE",
        help="set a pass option, e.g. cleanup.dedup_initializers=false (repeatable)",
    )
    parser.add_argument(
        "--list-passes", action="store_true", help="list passes and presets, then exit"
    )
    parser.add_argument(
        "--report", type=text_value, metavar="FILE", help="write the JSON report here"
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="SPEC",
        help="input shape NAME:1x128 or dynamic dim SYMBOL=128 for probe feeds (repeatable)",
    )
    parser.add_argument(
        "--data",
        type=text_value,
        metavar="PATH",
        help="real inputs: .npz file or folder of .npz, local or a URI (s3://, gs://, file://)",
    )
    calib = parser.add_argument_group(
        "calibration",
        "statistics of activations on --data for quantization; with --calib-cache and no -o, "
        "only calibrate and write the cache",
    )
    calib.add_argument(
        "--calib-method",
        choices=("auto", "entropy", "percentile", "mse", "minmax"),
        default=None,
        help="range method (default: auto: each tried on the fully quantized model, the "
        "most accurate kept; one histogram serves all of them)",
    )
    calib.add_argument(
        "--calib-samples", type=count_value, metavar="N", help="use at most N samples"
    )
    calib.add_argument(
        "--calib-cache",
        type=text_value,
        metavar="FILE",
        help="reuse statistics from FILE if it exists, else collect and write them there",
    )
    quant = parser.add_argument_group(
        "quantization",
        "after the lossless passes; the result must meet the accuracy budget on --data "
        "(nodes that break it stay float) or the model stays float and the report says why",
    )
    quant.add_argument(
        "--quantize",
        choices=("auto", "none", "static", "dynamic", "fp16", "weights-int8", "weights-int4"),
        default=None,
        help="auto (default): static int8 with --data, dynamic int8 without, and weight-only "
        "int8; the fastest within the budget and not slower than float (speed ties: the "
        "smaller). none: lossless passes only",
    )
    quant.add_argument(
        "--factorize",
        type=text_value,
        default=None,
        metavar="off|auto|RATIO",
        help="low-rank factors for MatMul/Gemm weights before quantizing, under the same "
        "budget: auto (the fewest parameters within the budget, kept only if not slower), or "
        "the share of the factorizable parameters to keep, e.g. 0.5 (default: off)",
    )
    quant.add_argument(
        "--prune",
        type=text_value,
        default=None,
        metavar="off|auto|channels=R|sparsity=S|N:M",
        help="pruning after factorization, before quantizing, under the same budget: auto "
        "(remove as many whole channels as the budget allows, consumers refitted on --data; "
        "kept only if faster), channels=R (each channel group loses R of its channels), "
        "sparsity=S or 2:4 (zero weights: a smaller compressed file, not a faster model) "
        "(default: off)",
    )
    quant.add_argument(
        "--holdout",
        type=_number(0, 0.9),
        metavar="F",
        help="share of --data the search never sees, on which the result must meet the budget "
        "too (default 0.25, drawn with a fixed seed; 0: none)",
    )
    quant.add_argument(
        "--eval-data",
        type=text_value,
        metavar="PATH",
        help="held-out samples (.npz or folder) to meet the budget on, instead of a share of --data",
    )
    quant.add_argument("--max-error", type=_number(0), metavar="X", help="max abs output error")
    quant.add_argument(
        "--min-cosine",
        type=_number(-1, 1),
        metavar="C",
        help="min mean output cosine (default budget: 0.997, and 0.99 top-1 agreement on "
        "softmax-like class outputs)",
    )
    quant.add_argument(
        "--min-top1-agreement",
        type=_number(0, 1),
        metavar="A",
        help="min argmax agreement, 0..1",
    )
    quant.add_argument(
        "--exclude-nodes", default="", metavar="A,B", help="node names to keep float"
    )
    quant.add_argument("--exclude-ops", default="", metavar="OP,OP", help="op types to keep float")
    quant.add_argument(
        "--activations",
        choices=("uint8", "int8", "uint16", "int16"),
        default=None,
        help="activation type of static quantization (default: uint8)",
    )
    quant.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights even where not needed (default: only on AVX2 CPUs without VNNI, "
        "whose u8s8 kernels saturate with full-range weights)",
    )
    quant.add_argument(
        "--weight-format",
        choices=("auto", "fold", "dq", "matmulnbits", "mixed"),
        default=None,
        help="weights-int8/int4 storage. fold: codes expanded to float when the runtime loads "
        "the model (float speed and memory, smaller file); dq: DequantizeLinear (opset 13, "
        "int4: 21); matmulnbits: onnxruntime's MatMulNBits/GatherBlockQuantized (int4 kept "
        "in memory). auto: fold on the CPU, else dq/matmulnbits",
    )
    quant.add_argument(
        "--outlier-ratio",
        type=_outlier_ratio,
        metavar="R",
        help="dynamic with --data, when the fully quantized model misses the budget: MatMul "
        "input channels whose peak is over R x the median channel's are computed in float, "
        "off the int8 range, before any node is kept float; 0 turns it off (default: 6)",
    )
    quant.add_argument(
        "--require-faster",
        action="store_true",
        help="time the result against float on --providers; a slower static/dynamic result "
        "falls back to weight-only int8 stored to fold at load, else float",
    )
    parser.add_argument(
        "--providers",
        type=text_value,
        default="cpu",
        help="execution providers, e.g. cuda,cpu (default: %(default)s)",
    )
    scale = parser.add_argument_group(
        "scale-out (the [ray] extra)",
        "calibration shards and the budget search's candidate models on Ray workers; the "
        "result is the same as in one process",
    )
    scale.add_argument(
        "--workers",
        type=count_value,
        metavar="N",
        help="start a local Ray cluster of N CPUs for the run",
    )
    scale.add_argument(
        "--ray-address",
        type=text_value,
        metavar="ADDR",
        help="use the running Ray cluster at ADDR (e.g. ray://head:10001 or auto); "
        "--data must be a path its workers can read",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip comparing outputs with the original"
    )
    parser.add_argument(
        "--external-data",
        choices=("auto", "yes", "no"),
        default="auto",
        help="store weights in OUTPUT.data (auto: when the input did or the model exceeds 2 GB)",
    )
    parser.add_argument(
        "--overwrite-input", action="store_true", help="allow OUTPUT to be the input file"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.add_argument(
        "--plan",
        type=text_value,
        metavar="FILE",
        help="write the run's timing decisions (for --replay)",
    )
    parser.add_argument(
        "--replay",
        type=text_value,
        metavar="FILE",
        help="use a --plan (or --report) file's timings instead of timing: the same bytes",
    )
    parser.add_argument(
        "--report-html",
        type=text_value,
        metavar="FILE",
        help="a self-contained HTML page with plots (needs the html extra: matplotlib)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="every pass's row, and onnxsqueeze's own decisions as they are made",
    )
    parser.add_argument("--debug", action="store_true", help="all logs and tracebacks")
    parser.add_argument("--version", action="version", version=f"onnxsqueeze {__version__}")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """What one flag's type cannot see: flags --passes would leave out, lists that name
    nothing, stage values (their parsers are the API's, which take more forms). Raises
    PipelineConfigError (exit 2)."""
    from onnxsqueeze.core.errors import PipelineConfigError

    if args.passes is not None:
        if not [n for n in args.passes.split(",") if n.strip()]:
            raise PipelineConfigError(f"--passes '{args.passes}' names no pass")
        given = [
            flag
            for name, flag in STAGE_FLAGS.items()
            if getattr(args, name) not in (None, False, "")
        ]
        if args.calib_cache and args.output:
            given.append("--calib-cache")
        if given:
            raise PipelineConfigError(
                f"{given[0]} is not applied with --passes, which runs only the passes it "
                "names: drop --passes to run the stages (quantize, factorize, prune), or "
                f"drop {given[0]}"
            )
    if args.providers is not None and not [p for p in args.providers.split(",") if p.strip()]:
        raise PipelineConfigError(f"--providers '{args.providers}' names no provider")
    from onnxsqueeze.pipeline.presets import builtin_registry

    presets = [p.name for p in builtin_registry().presets]
    if args.preset not in presets:
        raise PipelineConfigError(
            f"--preset '{args.preset}' is not a preset (presets: {', '.join(presets)})"
        )
    if args.quantize == "static" and not args.data and args.output:
        raise PipelineConfigError("--quantize static needs calibration data (--data)")
    for name, value in STAGE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    from onnxsqueeze.stages.factorize import factorize_config
    from onnxsqueeze.stages.prune import prune_config

    factorize_config(args.factorize)  # raises on a bad value
    prune_config(args.prune)
