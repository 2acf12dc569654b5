"""The one rule for progress bars of long commands (`bench`, `eval`, `optimize`).

A rich bar with elapsed time and ETA is drawn on stderr only when the caller enables it (the CLI passes
``not --json`` where stdout carries JSON) **and** stderr is a terminal. Redirected to a file, a pipe or a
CI log, a command prints no bar at all (not even a final one): the results themselves say what was done.
Tests (or a notebook) can pass their own rich `Console` to force a bar.
"""

from __future__ import annotations

import sys
from typing import Any


def stderr_is_terminal() -> bool:
    """True when stderr is an interactive terminal."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class ProgressBar:
    """A context manager around `rich.progress.Progress`; every method is a no-op when the bar is off.

    `label` is the bar's fixed leading text, `fields` extra task fields shown after the bar (each rendered as
    ``{task.fields[name]}``). `update(completed=..., advance=..., description=..., **fields)`.
    """

    def __init__(self, total: int, label: str, *, enabled: bool = True, done: int = 0,
                 fields: dict[str, Any] | None = None, console=None):
        self.total, self.label, self.done = int(total), label, int(done)
        self.fields = dict(fields or {})
        self.console = console
        self.enabled = bool(enabled) and self.done < self.total and (console is not None or stderr_is_terminal())
        self._progress = None
        self._task = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [TextColumn(self.label), TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn()]
            columns += [TextColumn(f"{{task.fields[{name}]}}") for name in self.fields]
            columns += [TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
            self._progress = Progress(*columns, console=self.console or Console(stderr=True), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("", total=self.total, completed=self.done, **self.fields)
        return self

    def update(self, completed: int | None = None, advance: int | None = None, description: str | None = None,
               **fields: Any) -> None:
        if self._progress is None:
            return
        kwargs: dict[str, Any] = dict(fields)
        if completed is not None:
            kwargs["completed"] = min(int(completed), self.total)
        if advance is not None:
            kwargs["advance"] = advance
        if description is not None:
            kwargs["description"] = description
        self._progress.update(self._task, **kwargs)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
