"""A Rich progress bar for the ``persona eval`` commands, as a ``(label, done, total)``
callback: the benchmarks report progress that way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

ProgressCallback = Callable[[str, int, int], None]


@contextmanager
def progress_bar(
    console: Console, start: str, describe: str, *, transient: bool = False
) -> Iterator[ProgressCallback]:
    """A bar described ``start`` until the first report, then ``describe.format(label)``.

    ``transient``: the bar is gone when done (e.g. when the output is JSON for a machine).
    """
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    ) as bar:
        task = bar.add_task(start, total=None)

        def report(label: str, done: int, total: int) -> None:
            bar.update(task, description=describe.format(label), completed=done, total=total)

        yield report
