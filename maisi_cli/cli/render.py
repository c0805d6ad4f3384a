"""How the CLI shows things: one red line per error, warnings, tables, one JSON document, progress.

stdout carries results (a table, or exactly one JSON document with --json); everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass
class Output:
    json: bool = False
    quiet: bool = False
    debug: bool = False


def stderr_console() -> Console:
    # Built per call so tests that swap sys.stderr (CliRunner) see the output.
    return Console(file=sys.stderr, soft_wrap=True, highlight=False)


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False)


def error(message: str) -> None:
    stderr_console().print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)


def warning(message: str, output: Output) -> None:
    if not output.quiet:
        stderr_console().print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)


def info(message: str, output: Output) -> None:
    """A result line for humans: stdout normally, stderr under --json (stdout holds only the document)."""
    if output.quiet:
        return
    console = stderr_console() if output.json else stdout_console()
    console.print(escape(message), soft_wrap=True)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    stdout_console().print(table)


ProgressCallback = Callable[[str, int, int], None]


@contextlib.contextmanager
def progress(output: Output, samples: int | None = None) -> Iterator[ProgressCallback]:
    """A progress callback for the engine: on a TTY one bar for the current stage (step i/N, ETA) and one for the
    samples; off a TTY a log line per finished stage; nothing with --quiet."""
    if output.quiet:
        yield lambda stage, done, total: None
        return
    console = stderr_console()
    if console.is_terminal:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as bars:
            overall = bars.add_task("samples", total=samples) if samples else None
            current = bars.add_task("starting", total=1)
            state = {"stage": None}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage != state["stage"]:
                    state["stage"] = stage
                    bars.reset(current, total=total, description=stage)
                bars.update(current, completed=done, total=total)
                if overall is not None and stage.endswith(" write") and done >= total:
                    bars.advance(overall)

            yield on_progress
        return

    started = time.perf_counter()
    last_event = [started]
    stage_started: dict[str, float] = {}

    def log_stage(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stage_started.setdefault(stage, last_event[0])  # a stage starts when the one before it reported
        last_event[0] = now
        if done >= total:
            took = now - stage_started[stage]
            console.print(f"[{now - started:7.1f}s] {stage} {done}/{total} ({took:.1f}s)", soft_wrap=True,
                          markup=False)

    yield log_stage


def output_of(obj: Any, json_flag: bool = False) -> Output:
    """The global options, with a command's own --json added."""
    base = obj if isinstance(obj, Output) else Output()
    return Output(json=base.json or json_flag, quiet=base.quiet, debug=base.debug)
