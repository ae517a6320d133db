"""``onnxsqueeze model.onnx -o small.onnx``: argument parsing and printing, nothing else.

Exit codes: 0 ok, 1 failure (bad model, bad data, verification failed), 2 usage error.
User errors print one line without a traceback; ``--debug`` shows it. Heavy modules are
imported only after the arguments are parsed, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from onnxsqueeze.cli.arguments import EXIT_USAGE, build_parser, check_arguments

EXIT_OK, EXIT_FAILURE = 0, 1
#: ``onnxsqueeze COMMAND ...``: the module whose ``main(argv)`` runs it. Anything else is a
#: model to squeeze (a file named like a command: ``./bench``).
COMMANDS = {
    "bench": "onnxsqueeze.cli.bench",
    "compare": "onnxsqueeze.cli.compare",
    "inspect": "onnxsqueeze.cli.inspect",
}
#: The API's argument names as library messages write them, and the flags that set them.
FLAG_OF = {
    "verify=False": "--no-verify",
    "shapes=": "--shape",
    "data=": "--data",
    "eval_data=": "--eval-data",
    "holdout=": "--holdout",
    "quantize=": "--quantize",
    "factorize=": "--factorize",
    "prune=": "--prune",
    "providers=": "--providers",
    "passes=": "--passes",
    "preset=": "--preset",
    "replay=": "--replay",
    "workers=": "--workers",
    "ray_address=": "--ray-address",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        import importlib

        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (said), --help or --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return guarded(_dispatch, args)


def _dispatch(args: argparse.Namespace) -> int:
    check_arguments(args)
    if args.list_passes:
        print(_list_passes())
        if args.model or args.output:
            print("onnxsqueeze: --list-passes: nothing squeezed", file=sys.stderr)
        return EXIT_OK
    if args.model and not args.output and args.calib_cache:
        return _calibrate(args)
    if not args.model or not args.output:
        print(
            "onnxsqueeze: error: MODEL and -o/--output are required (see --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _squeeze(args)


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs a command the way every command runs: logs per ``--debug``, heavy imports
    deferred, SIGTERM as Ctrl-C, and each kind of error as one line with its exit code."""
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "verbose", False) and not args.debug:  # our decisions, not libraries' logs
        logging.getLogger("onnxsqueeze").setLevel(logging.INFO)
    from onnxsqueeze.cli.lazy_imports import defer_heavy_imports
    from onnxsqueeze.core.errors import PipelineConfigError, SqueezeError

    defer_heavy_imports()
    previous = _interrupt_on_sigterm()
    model = getattr(args, "model", None) or (getattr(args, "models", None) or [None])[0]
    try:
        return command(args)
    except PipelineConfigError as exc:
        _fail(exc, args.debug)
        return EXIT_USAGE
    except SqueezeError as exc:
        _fail(exc, args.debug, model)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (see _interrupt_on_sigterm)
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
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def _interrupt_on_sigterm():
    """SIGTERM (a pipeline's timeout, ``kill``) unwinds like Ctrl-C, so every temporary
    folder and partial output is removed on the way out instead of left behind. Returns the
    handler it replaced (None off the main thread, where none can be set)."""
    import signal
    import threading

    def interrupt(signum, frame):  # noqa: ARG001 (signal handler signature)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


def cli_words(text: str) -> str:
    """A library message with the API's argument names (``data=``) in the flags' words."""
    import re

    for api, flag in FLAG_OF.items():
        text = re.sub(rf"(?<![\w-]){re.escape(api)}", flag, text)
    return text


def _fail(exc: Exception, debug: bool, model: str | None = None) -> None:
    """One line; errors about running the model (verification) name its file too."""
    from onnxsqueeze.core.errors import (
        CalibrationDataError,
        RuntimeSessionError,
        VerificationError,
    )

    if debug:
        import traceback

        traceback.print_exc()
    text = cli_words(str(exc))
    about_model = (VerificationError, RuntimeSessionError, CalibrationDataError)
    if model and model not in text and isinstance(exc, about_model):
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
    from onnxsqueeze.cli.destinations import check_cache, check_destinations, read_files

    reads = read_files(args.model, args.data, args.calib_cache, args.eval_data)
    writes = {
        "-o": args.output,
        "--report": args.report,
        "--report-html": args.report_html,
        "--plan": args.plan,
    }
    if args.replay:
        reads[Path(args.replay).resolve()] = "the --replay plan"
    if args.report_html:
        from onnxsqueeze.pipeline.html import check_available

        check_available()
    if args.output:
        writes["-o's external data"] = f"{args.output}.data"
    check_destinations(writes, reads, overwrite_input=args.overwrite_input)
    check_cache(args.calib_cache)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    from onnxsqueeze.cli.tables import progress_bar
    from onnxsqueeze.core.progress import reporting
    from onnxsqueeze.frameworks.files import sniff

    kind = sniff(args.model)  # a framework's file is exported first (frameworks.saved)
    options = dict(
        preset=args.preset,
        data=args.data,
        shapes=args.shape,
        providers=[p.strip() for p in args.providers.split(",") if p.strip()],
        verify=not args.no_verify,
        external_data=external,
        quantize=_quantize_config(args),
        factorize=_factorize_config(args),
        prune=_prune_config(args),
        replay=args.replay,
        eval_data=args.eval_data,
        workers=args.workers,
        ray_address=args.ray_address,
        **({"holdout": args.holdout} if args.holdout is not None else {}),
    )
    with progress_bar(not args.quiet) as bar, reporting(bar):
        if kind == "onnx":
            report = squeeze_file(
                args.model,
                args.output,
                _pass_specs(args),
                overwrite_input=args.overwrite_input,
                **options,
            )
        else:
            from onnxsqueeze.frameworks.saved import squeeze_saved

            report = squeeze_saved(
                args.model, kind, args.output, passes=_pass_specs(args), **options
            )
    if args.plan:
        _compare_with_earlier_plan(args.plan, report)
    if args.report:
        from onnxsqueeze.core.io import atomic_write_text

        atomic_write_text(Path(args.report), report.to_json())
    if args.plan:
        from onnxsqueeze.core.io import atomic_write_text
        from onnxsqueeze.pipeline.schema import dump

        plan = {"source": report.source, "timings": report.timings}
        atomic_write_text(Path(args.plan), dump("plan", plan))
    if args.report_html:
        from onnxsqueeze.core.io import atomic_write_text
        from onnxsqueeze.pipeline.html import squeeze_page

        atomic_write_text(Path(args.report_html), squeeze_page(report))
    for warning in report.warnings:  # on stderr: stdout is the table a script may parse
        print(f"onnxsqueeze: warning: {cli_words(warning)}", file=sys.stderr)
    if not args.quiet:
        from onnxsqueeze.cli.tables import render

        print(report.to_table(warnings=False, verbose=args.verbose, render=render))
        print(f"wrote {report.output}")
    return EXIT_OK


def _compare_with_earlier_plan(path: str, report) -> None:
    """``--plan`` onto the plan of an earlier run of the same model: say which timing
    decisions this run took otherwise (the reason two runs' bytes differ)."""
    from pathlib import Path

    from onnxsqueeze.core.errors import PipelineConfigError
    from onnxsqueeze.stages.latency_gate import NOT_SLOWER, SPEED_TIE
    from onnxsqueeze.stages.plan import differences, load_replay

    if not Path(path).is_file():
        return
    try:
        earlier = load_replay(path)
    except PipelineConfigError:
        return  # not a plan: nothing to compare with
    changed = differences(earlier or {}, report.timings, line=NOT_SLOWER, tie=SPEED_TIE)
    if changed:
        report.warnings.append(
            f"timings moved since {path}'s earlier run: {'; '.join(changed)} (where the "
            "two outputs differ, these are why; --replay that plan to get its bytes)"
        )


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

    from onnxsqueeze.stages.quantize import QuantizeConfig

    if args.quantize == "none" or args.passes:
        return None
    budget = _budget(args)
    config = QuantizeConfig(
        mode=args.quantize,
        method=args.calib_method,
        activations=args.activations,
        reduce_range=True if args.reduce_range else None,
        exclude_nodes=tuple(n.strip() for n in args.exclude_nodes.split(",") if n.strip()),
        exclude_ops=tuple(n.strip() for n in args.exclude_ops.split(",") if n.strip()),
        budget=budget,
        calib_samples=args.calib_samples,
        calib_cache=args.calib_cache,
        weight_format=args.weight_format,
    )
    if args.outlier_ratio is not None:
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
    from onnxsqueeze.cli.destinations import check_cache, check_destinations, read_files

    check_cache(args.calib_cache)
    reads = read_files(args.model, args.data, None)
    check_destinations({"--report": args.report}, reads, overwrite_input=False)
    started = time.perf_counter()
    method = collected_with(args.calib_method)  # auto: histograms, shown as entropy ranges
    from onnxsqueeze.cli.tables import progress_bar

    with progress_bar(not args.quiet) as bar:
        result = calibrate(
            args.model,
            args.data,
            method=method,
            samples=args.calib_samples,
            cache=args.calib_cache,
            providers=[p.strip() for p in args.providers.split(",") if p.strip()],
            progress=(lambda done, total: bar("calibrating", done, total)) if bar else None,
            workers=args.workers,
            ray_address=args.ray_address,
        )
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
