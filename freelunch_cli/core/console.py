"""Human output on stderr (rich progress, one line per unit of work), machine output on stdout (--json)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Reporter:
    """Where a stage reports: progress bars and lines to stderr, a JSON summary to stdout."""

    def __init__(self, quiet: bool = False, json_mode: bool = False):
        self.quiet = quiet
        self.json_mode = json_mode
        self.err = Console(stderr=True, highlight=False)
        self._progress: Progress | None = None

    def info(self, msg: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(escape(msg))
        else:
            self.err.print(escape(msg))

    def warn(self, msg: str) -> None:
        self.err.print(f"[yellow]warning:[/] {escape(msg)}")  # a message is text: its brackets are not markup

    @contextmanager
    def progress(self, description: str, total: int, completed: int = 0):
        if self.quiet:
            yield _NullTask()
            return
        prog = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=False,
        )
        self._progress = prog
        with prog:
            task = prog.add_task(description, total=total, completed=completed)
            try:
                yield _Task(prog, task)
            finally:
                self._progress = None

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        if self.quiet:
            return
        t = Table(title=escape(title))
        for c in columns:
            t.add_column(escape(c))
        for r in rows:
            t.add_row(*[escape(str(x)) for x in r])
        self.err.print(t)

    def summary(self, line: str, data: dict) -> None:
        """The stage's last word: one line for people, the full record for --json."""
        if not self.quiet:
            self.err.print(f"[bold green]✓[/] {escape(line)}")
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()


class _Task:
    def __init__(self, prog: Progress, task):
        self.prog, self.task = prog, task

    def advance(self, n: int = 1) -> None:
        self.prog.advance(self.task, n)


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass
