"""Tables and progress for people: ``rich`` on a terminal, plain aligned text otherwise (a
pipe, a CI log, ``-q``), so a script that parses stdout gets no escape codes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def fancy(stream: Any = None) -> bool:
    """Whether ``stream`` (stdout) is a terminal that rich can draw on."""
    stream = stream or sys.stdout
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    right: Sequence[int] = (),
) -> str:
    """A table as text: rich's box drawing on a terminal, plain columns otherwise.
    ``right``: indices of columns to align right (numbers)."""
    cells = [[_cell(v) for v in row] for row in rows]
    if fancy():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for index, header in enumerate(headers):
            table.add_column(header, justify="right" if index in right else "left")
        for row in cells:
            table.add_row(*row)
        console = Console()
        with console.capture() as captured:
            console.print(table)
        return captured.get().rstrip("\n")
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out += [line(list(headers)), *(line(r) for r in cells)]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A progress callback ``(label, done, total)`` drawing on stderr while the block runs
    (rich's bar on a terminal; nothing otherwise)."""
    if not enabled or not fancy(sys.stderr):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update
