"""``onnxsqueeze model.onnx -o small.onnx``: argument parsing and printing, nothing else.

Exit codes: 0 ok, 1 failure (bad model, bad data, verification failed), 2 usage error.
User errors print one line without a traceback; ``--debug`` shows it. Heavy modules are
imported only after the arguments are parsed, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from onnxsqueeze import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxsqueeze",
        description="Compress an ONNX model with verified graph passes.",
        epilog="Example: onnxsqueeze model.onnx -o small.onnx --report report.json",
    )
    parser.add_argument("model", nargs="?", help="input .onnx file")
    parser.add_argument("-o", "--output", help="output .onnx file (written atomically)")
    parser.add_argument("--passes", help="comma-separated pass or preset names (see --list-passes)")
    parser.add_argument(
        "--preset", default="default", help="named pass list (default: %(default)s)"
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
    parser.add_argument("--report", metavar="FILE", help="write the JSON report here")
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="SPEC",
        help="input shape NAME:1x128 or dynamic dim SYMBOL=128 for probe feeds (repeatable)",
    )
    parser.add_argument("--data", metavar="PATH", help="real inputs: .npz file or folder of .npz")
    calib = parser.add_argument_group(
        "calibration",
        "statistics of activations on --data for quantization; with --calib-cache and no -o, "
        "only calibrate and write the cache",
    )
    calib.add_argument(
        "--calib-method",
        choices=("auto", "entropy", "percentile", "mse", "minmax"),
        default="auto",
        help="range method (default: %(default)s: each tried on the fully quantized model, the "
        "most accurate kept; one histogram serves all of them)",
    )
    calib.add_argument("--calib-samples", type=int, metavar="N", help="use at most N samples")
    calib.add_argument(
        "--calib-cache",
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
        default="auto",
        help="auto (default): static int8 with --data, dynamic int8 without, and weight-only "
        "int8; the fastest within the budget and not slower than float (speed ties: the "
        "smaller). none: lossless passes only",
    )
    quant.add_argument(
        "--factorize",
        default="off",
        metavar="off|auto|RATIO",
        help="low-rank factors for MatMul/Gemm weights before quantizing, under the same "
        "budget: auto (the fewest parameters within the budget, kept only if not slower), or "
        "the share of the factorizable parameters to keep, e.g. 0.5 (default: off)",
    )
    quant.add_argument(
        "--prune",
        default="off",
        metavar="off|auto|channels=R|sparsity=S|N:M",
        help="pruning after factorization, before quantizing, under the same budget: auto "
        "(remove as many whole channels as the budget allows, consumers refitted on --data; "
        "kept only if faster), channels=R (each channel group loses R of its channels), "
        "sparsity=S or 2:4 (zero weights: a smaller compressed file, not a faster model) "
        "(default: off)",
    )
    quant.add_argument("--max-error", type=float, metavar="X", help="max abs output error")
    quant.add_argument(
        "--min-cosine",
        type=float,
        metavar="C",
        help="min mean output cosine (default budget: 0.997, and 0.99 top-1 agreement on "
        "softmax-like class outputs)",
    )
    quant.add_argument(
        "--min-top1-agreement", type=float, metavar="A", help="min argmax agreement, 0..1"
    )
    quant.add_argument(
        "--exclude-nodes", default="", metavar="A,B", help="node names to keep float"
    )
    quant.add_argument("--exclude-ops", default="", metavar="OP,OP", help="op types to keep float")
    quant.add_argument(
        "--activations",
        choices=("uint8", "int8", "uint16", "int16"),
        default="uint8",
        help="activation type of static quantization (default: %(default)s)",
    )
    quant.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights even where not needed (default: only on AVX2 CPUs without VNNI, "
        "whose u8s8 kernels saturate with full-range weights)",
    )
    quant.add_argument(
        "--weight-format",
        choices=("auto", "fold", "dq", "matmulnbits"),
        default="auto",
        help="weights-int8/int4 storage. fold: codes expanded to float when the runtime loads "
        "the model (float speed and memory, smaller file); dq: DequantizeLinear (opset 13, "
        "int4: 21); matmulnbits: onnxruntime's MatMulNBits/GatherBlockQuantized (int4 kept "
        "in memory). auto: fold on the CPU, else dq/matmulnbits",
    )
    quant.add_argument(
        "--outlier-ratio",
        type=float,
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
        default="cpu",
        help="execution providers, e.g. cuda,cpu (default: %(default)s)",
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
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    parser.add_argument("--version", action="version", version=f"onnxsqueeze {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from onnxsqueeze.cli.lazy_imports import defer_heavy_imports
    from onnxsqueeze.core.errors import PipelineConfigError, SqueezeError

    defer_heavy_imports()
    try:
        if args.list_passes:
            print(_list_passes())
            return EXIT_OK
        if args.model and not args.output and args.calib_cache:
            return _calibrate(args)
        if not args.model or not args.output:
            parser.print_usage(sys.stderr)
            print("onnxsqueeze: error: MODEL and -o/--output are required", file=sys.stderr)
            return EXIT_USAGE
        return _squeeze(args)
    except PipelineConfigError as exc:
        _fail(exc, args.debug)
        return EXIT_USAGE
    except SqueezeError as exc:
        _fail(exc, args.debug, args.model)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("onnxsqueeze: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: say so, keep the trace behind --debug
        if args.debug:
            raise
        print(
            f"onnxsqueeze: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def _fail(exc: Exception, debug: bool, model: str | None = None) -> None:
    """One line; errors about running the model (verification) name its file too."""
    from onnxsqueeze.core.errors import RuntimeSessionError, VerificationError

    if debug:
        import traceback

        traceback.print_exc()
    text = str(exc)
    if model and model not in text and isinstance(exc, (VerificationError, RuntimeSessionError)):
        text = f"{model}: {text}"
    print(f"onnxsqueeze: error: {text}", file=sys.stderr)


def _pass_specs(args: argparse.Namespace) -> list | None:
    from onnxsqueeze.core.errors import PipelineConfigError

    options: dict[str, dict[str, str]] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        pass_name, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise PipelineConfigError(f"--option '{item}': expected PASS.KEY=VALUE")
        options.setdefault(pass_name, {})[option] = value
    names = [n.strip() for n in args.passes.split(",") if n.strip()] if args.passes else None
    if names is None and not options:
        return None
    from onnxsqueeze.pipeline.presets import builtin_registry

    registry = builtin_registry()
    known = {cls.name for cls in registry.pass_classes}
    presets = {p.name for p in registry.presets}
    steps: list[tuple[str, dict]] = []
    for name in names or [args.preset]:  # a preset name stands for its passes
        if names is None or (name in presets and name not in known):
            steps.extend((n, dict(o)) for n, o in registry.preset(name).passes)
        else:
            steps.append((name, {}))
    unused = set(options) - {n for n, _ in steps}
    if unused:
        raise PipelineConfigError(
            f"--option for pass(es) not in the pipeline: {', '.join(sorted(unused))}"
        )
    return [(n, {**o, **options.get(n, {})}) for n, o in steps]


def _squeeze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onnxsqueeze.api import squeeze_file
    from onnxsqueeze.cli.destinations import check_destinations, read_files

    reads = read_files(args.model, args.data, args.calib_cache)
    writes = {"-o": args.output, "--report": args.report}
    if args.output:
        writes["-o's external data"] = f"{args.output}.data"
    check_destinations(writes, reads, overwrite_input=args.overwrite_input)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    report = squeeze_file(
        args.model,
        args.output,
        _pass_specs(args),
        preset=args.preset,
        data=args.data,
        shapes=args.shape,
        providers=[p.strip() for p in args.providers.split(",") if p.strip()],
        verify=not args.no_verify,
        external_data=external,
        overwrite_input=args.overwrite_input,
        quantize=_quantize_config(args),
        factorize=_factorize_config(args),
        prune=_prune_config(args),
    )
    if args.report:
        from onnxsqueeze.core.io import atomic_write_text

        atomic_write_text(Path(args.report), report.to_json())
    if not args.quiet:
        print(report.to_table())
        print(f"wrote {report.output}")
    return EXIT_OK


def _budget(args: argparse.Namespace):
    """The accuracy budget the flags set (the default one when they set none)."""
    from onnxsqueeze.stages.budget import DEFAULT_BUDGET, Budget

    limits = {
        "max_error": args.max_error,
        "min_cosine": args.min_cosine,
        "min_top1_agreement": args.min_top1_agreement,
    }
    return Budget(**limits) if any(v is not None for v in limits.values()) else DEFAULT_BUDGET


def _prune_config(args: argparse.Namespace):
    """The prune stage's settings from the flags (None: off)."""
    from onnxsqueeze.stages.prune import prune_config

    if args.passes:
        return None
    return prune_config(args.prune, _budget(args))


def _factorize_config(args: argparse.Namespace):
    """The factorize stage's settings from the flags (None: off)."""
    from onnxsqueeze.stages.factorize import factorize_config

    if args.passes:
        return None
    return factorize_config(args.factorize, _budget(args))


def _quantize_config(args: argparse.Namespace):
    """The quantize stage's settings from the flags (None: lossless only)."""
    import dataclasses

    from onnxsqueeze.core.errors import PipelineConfigError
    from onnxsqueeze.stages.quantize import QuantizeConfig

    if args.quantize == "none" or args.passes:
        return None
    budget = _budget(args)
    if args.calib_samples is not None and args.calib_samples <= 0:
        raise PipelineConfigError("--calib-samples must be a positive number")
    config = QuantizeConfig(
        mode=args.quantize,
        method=args.calib_method,
        activations=args.activations,
        reduce_range=True if args.reduce_range else None,
        exclude_nodes=tuple(n for n in args.exclude_nodes.split(",") if n),
        exclude_ops=tuple(n for n in args.exclude_ops.split(",") if n),
        budget=budget,
        calib_samples=args.calib_samples,
        calib_cache=args.calib_cache,
        weight_format=args.weight_format,
    )
    if args.outlier_ratio is not None:
        if args.outlier_ratio < 0:
            raise PipelineConfigError("--outlier-ratio must be 0 (off) or a positive ratio")
        config = dataclasses.replace(config, outlier_ratio=args.outlier_ratio)
    if args.require_faster:
        config = dataclasses.replace(config, check_latency=True, require_faster=True)
    return config


def _calibrate(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from onnxsqueeze.api import calibrate
    from onnxsqueeze.calib.choice import collected_with
    from onnxsqueeze.core.errors import PipelineConfigError

    if args.calib_samples is not None and args.calib_samples <= 0:
        raise PipelineConfigError("--calib-samples must be a positive number")
    started = time.perf_counter()
    method = collected_with(args.calib_method)  # auto: histograms, shown as entropy ranges
    progress = _progress_bar() if sys.stderr.isatty() and not args.quiet else None
    result = calibrate(
        args.model,
        args.data,
        method=method,
        samples=args.calib_samples,
        cache=args.calib_cache,
        providers=[p.strip() for p in args.providers.split(",") if p.strip()],
        progress=progress,
    )
    if progress is not None:
        print(file=sys.stderr)
    ranges = result.ranges(method)
    nonfinite = result.nonfinite()
    if args.report:
        from onnxsqueeze.core.io import atomic_write_text

        report = {
            "source": args.model,
            "cache": args.calib_cache,
            "method": method,
            "samples": result.samples,
            "seconds": time.perf_counter() - started,
            "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()},
            "nonfinite": nonfinite,
            "skipped": result.skipped,
        }
        atomic_write_text(Path(args.report), json.dumps(report, indent=2))
    if not args.quiet:
        print(
            f"calibrated {len(ranges)} tensors on {result.samples} samples "
            f"({method}) in {time.perf_counter() - started:.1f} s; "
            f"cache: {args.calib_cache}"
        )
        if nonfinite:
            print(f"{len(nonfinite)} tensors held NaN/inf (ranges use their finite values):")
            for name, counts in list(nonfinite.items())[:10]:
                print(f"  {name}: {counts}")
        if result.skipped:
            print(f"{len(result.skipped)} tensors not calibrated (see --report for why)")
    return EXIT_OK


def _progress_bar():
    """A one-line progress display on stderr (only when it is a terminal)."""

    def show(done: int, total: int | None) -> None:
        if total:
            filled = int(30 * done / total)
            bar = "#" * filled + "." * (30 - filled)
            sys.stderr.write(f"\rcalibrating [{bar}] {done}/{total}")
        else:
            sys.stderr.write(f"\rcalibrating: {done} samples")
        sys.stderr.flush()

    return show


def _list_passes() -> str:
    import dataclasses

    from onnxsqueeze.pipeline.presets import builtin_registry

    registry = builtin_registry()
    lines = ["passes:"]
    for cls in registry.pass_classes:
        kind = "lossless" if cls.lossless else "lossy"
        lines.append(f"  {cls.name:<20} {cls.summary} [{kind}]")
        for field in dataclasses.fields(cls.Options):
            if field.metadata.get("hidden"):  # set by the stages (ranges, memos), not by users
                continue
            default = field.default if field.default is not dataclasses.MISSING else "-"
            lines.append(f"      {cls.name}.{field.name}={default}")
    lines.append("presets:")
    for preset in registry.presets:
        lines.append(
            f"  {preset.name:<20} {', '.join(n for n, _ in preset.passes)}  ({preset.summary})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
