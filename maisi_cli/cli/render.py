"""How the CLI shows things: one red line per error, warnings, tables, one JSON document, progress.

stdout carries results (a table, or exactly one JSON document with --json); everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maisi_cli.engine.progress import ProgressCallback, ProgressEvent


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


@dataclass
class _JsonRun:
    """The document of a --json run in progress: held until the run ends, then printed once (see json_run)."""

    stdout: Any  # the real stdout: while the command runs, sys.stdout is stderr, so nothing else lands there
    documents: list = field(default_factory=list)
    printed: bool = False


_run: _JsonRun | None = None


def write_json(document: Any, stream: Any = None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(document, indent=2, default=str) + "\n")
    stream.flush()


def print_json(document: Any) -> None:
    """The command's one JSON document: printed now, or, in a --json run, held until the run ends."""
    if _run is None:
        write_json(document)
    else:
        _run.documents.append(document)


def _with_status(documents: list, ok: bool, **extra: Any) -> dict:
    """`{"ok": ..., <the command's fields>, "error": ...}`: "ok" first, so a reader sees the outcome at once."""
    fields: dict = {}
    for document in documents:  # one in practice; a second one's fields are kept rather than lost
        fields.update(document if isinstance(document, dict) else {"result": document})
    return {"ok": ok, **fields, **extra}


@contextlib.contextmanager
def json_run() -> Iterator[None]:
    """A run under --json prints exactly one document: the command's, with "ok": true, when it succeeds; on a
    failure (json_failure) "ok": false and the error, joined to the command's document when the failure came after
    it (a sample that failed, --strict-qc, a weights mismatch), so stdout never holds two documents."""
    global _run
    outer, _run = _run, _JsonRun(stdout=sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # help, a table, a library's print: all on stderr
            yield
    finally:
        run, _run = _run, outer
        if run.documents and not run.printed:
            write_json(_with_status(run.documents, ok=True), run.stdout)


def json_failure(kind: str, message: str, exit_code: int) -> None:
    """The --json run's one document for a failure; nothing outside a --json run (the error line says it all)."""
    if _run is None or _run.printed:
        return
    _run.printed = True
    write_json(_with_status(_run.documents, ok=False, error={"type": kind, "message": message,
                                                             "exit_code": exit_code}), _run.stdout)


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    stdout_console().print(table)


def event_label(event: ProgressEvent) -> str:
    """What a bar or a log line is about: one line for all the networks a run loads, else the event's label."""
    return "load networks" if event.stage == "load" else event.label


@contextlib.contextmanager
def progress(output: Output, samples: int | None = None) -> Iterator[ProgressCallback]:
    """A progress callback for the engine's ProgressEvents: on a TTY one bar for the current stage (step i/N, ETA)
    and one for the samples (a sample is done when its "write" event comes); off a TTY a log line per finished
    stage; nothing with --quiet."""
    if output.quiet:
        yield lambda event: None
        return
    console = stderr_console()
    if console.is_terminal:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as bars:
            overall = bars.add_task("samples", total=samples) if samples else None
            current = bars.add_task("starting", total=1)
            state = {"label": None}

            def on_progress(event: ProgressEvent) -> None:
                label = event_label(event)
                if label != state["label"]:
                    state["label"] = label
                    bars.reset(current, total=event.total, description=label)
                bars.update(current, completed=event.done, total=event.total)
                if overall is not None and event.stage == "write" and event.finished:
                    bars.advance(overall)

            yield on_progress
        return

    started = time.perf_counter()
    last_event = [started]
    stage_started: dict[str, float] = {}

    def log_stage(event: ProgressEvent) -> None:
        label = event_label(event)
        now = time.perf_counter()
        stage_started.setdefault(label, last_event[0])  # a stage starts when the one before it reported
        last_event[0] = now
        if event.finished:
            took = now - stage_started[label]
            console.print(f"[{now - started:7.1f}s] {label} {event.done}/{event.total} ({took:.1f}s)", soft_wrap=True,
                          markup=False)

    yield log_stage


def output_of(obj: Any, json_flag: bool = False) -> Output:
    """The global options, with a command's own --json added."""
    base = obj if isinstance(obj, Output) else Output()
    return Output(json=base.json or json_flag, quiet=base.quiet, debug=base.debug)
