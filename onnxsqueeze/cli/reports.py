"""What ``bench``, ``compare`` and ``inspect`` share: their report flags, the checks of those
destinations before any work, writing the reports, and running as a subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxsqueeze.cli.arguments import EXIT_USAGE, text_value


def add_report_flags(parser: argparse.ArgumentParser, html: bool = True) -> None:
    parser.add_argument("--json", type=text_value, metavar="FILE", help="write the figures")
    if html:
        parser.add_argument(
            "--report-html", type=text_value, metavar="FILE", help="a page with plots (html extra)"
        )
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--debug", action="store_true")


def check_reports(args: argparse.Namespace, reads: dict[Path, str]) -> None:
    """Before any work: the report files can be written, and the page can be made."""
    from onnxsqueeze.cli.destinations import check_destinations

    html = getattr(args, "report_html", None)
    check_destinations({"--json": args.json, "--report-html": html}, reads, overwrite_input=False)
    if html:
        from onnxsqueeze.pipeline.html import check_available

        check_available()


def write_reports(
    args: argparse.Namespace, kind: str, payload: dict[str, Any], page: Callable[[], str] | None
) -> None:
    from onnxsqueeze.core.io import atomic_write_text
    from onnxsqueeze.pipeline.schema import dump

    if args.json:
        atomic_write_text(Path(args.json), dump(kind, payload))
    if getattr(args, "report_html", None) and page is not None:
        atomic_write_text(Path(args.report_html), page())


def run_command(
    parser: argparse.ArgumentParser,
    command: Callable[[argparse.Namespace], int],
    argv: Sequence[str],
) -> int:
    """Parse ``argv`` for a subcommand and run it as every command runs (cli.guarded)."""
    from onnxsqueeze.cli import guarded

    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (said) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return guarded(command, args)
