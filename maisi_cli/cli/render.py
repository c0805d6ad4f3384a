"""How the CLI shows things: one red line per error, warnings, tables, one JSON document, progress.

stdout carries results (a table, or exactly one JSON document with --json); everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maisi_cli.cli import terminal
from maisi_cli.engine.progress import ProgressCallback, ProgressClock, ProgressEvent


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
    terminal.clear()
    stderr_console().print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)


def warning(message: str, output: Output) -> None:
    if not output.quiet:
        with terminal.above():
            stderr_console().print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)


def info(message: str, output: Output) -> None:
    """A result line for humans: stdout normally, stderr under --json (stdout holds only the document)."""
    if output.quiet:
        return
    terminal.clear()
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
    terminal.clear()
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
    terminal.clear()
    stdout_console().print(table)


def event_label(event: ProgressEvent) -> str:
    """What a bar or a log line is about: one line for all the networks a run loads, else the event's label."""
    return "load networks" if event.stage == "load" else event.label


def status(output: Output, text: str) -> None:
    """Say what the command is doing before it has anything else to show ("loading networks…"): a transient line on a
    TTY, a log line off one when it lasts (cli/terminal.py); nothing with --quiet or --json."""
    if not (output.quiet or output.json):
        terminal.status(text)


def result_line(event: ProgressEvent, seconds: float | None) -> str:
    """The line a finished sample leaves: "sample 0003  seed 1234  QC passed  12.3 s" (QC failed names the organs;
    seed and QC when the engine's event gives them)."""
    details = event.details or {}
    where = f"{event.case} " if event.case else ""
    parts = [f"{where}sample {event.sample:04d}"]
    if details.get("seed") is not None:
        parts.append(f"seed {details['seed']}")
    if "qc" in details:
        qc = details["qc"]
        if qc is None:
            parts.append("QC off")
        elif qc.get("passed"):
            parts.append("QC passed")
        else:
            failed = ", ".join(str(name) for name in qc.get("failed") or [])
            parts.append("QC FAILED" + (f" ({failed})" if failed else ""))
    if details.get("attempts", 0) > 1:
        parts.append(f"{details['attempts']} attempts")
    seconds = details.get("seconds", seconds)
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def _eta(seconds: float | None) -> str:
    return "" if seconds is None else terminal.clock(seconds)


def heartbeat_text(clock: ProgressClock, first: str) -> str:
    """Off a TTY, the line a long stage repeats: "[  35.2s] sample 0000 denoise 12/30, 1:10 left; samples 0.4/2,
    3:05 left"."""
    event = clock.event
    elapsed = clock.now() - clock.started
    if event is None:
        return f"[{elapsed:8.1f}s] {first}"
    text = f"[{elapsed:8.1f}s] {event_label(event)} {event.done}/{event.total}"
    if event.finished:  # the next stage has not reported yet
        text += f" done; the next step running for {clock.now() - clock.last_at:.1f}s"
    else:
        stage_left = clock.stage_left()
        text += f", {_eta(stage_left)} left" if stage_left is not None else ""
    if clock.samples:
        run_left = clock.run_left()
        made = math.floor(clock.samples_made() * 10) / 10  # 1.99 made is not 2.0
        text += f"; samples {made:.1f}/{clock.samples}" + (f", {_eta(run_left)} left" if run_left is not None else "")
    return text


def eta_column() -> Any:
    """A rich column of the seconds left, from a `deadline` field (time.monotonic) that the callback sets at each
    event, so it counts down between events; "eta -:--" until the first unit of the stage is done."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class EtaColumn(ProgressColumn):
        def render(self, task: Any) -> Any:
            deadline = task.fields.get("deadline")
            left = "-:--" if deadline is None else terminal.clock(max(0.0, deadline - time.monotonic()))
            return Text(f"eta {left}", style="progress.remaining")

    return EtaColumn()


@contextlib.contextmanager
def progress(output: Output, samples: int | None = None, first: str | None = None) -> Iterator[ProgressCallback]:
    """A progress callback for the engine's ProgressEvents; nothing with --quiet.

    On a TTY: until the first event, the status line says `first` (default: "loading networks…" when `samples`
    are to be made); then one bar for the current stage (step i/N, elapsed, ETA from its first finished step) and,
    for `samples`, one for the samples (ETA from the current sample's steps until one is made). The bars vanish at
    the end; each finished sample's result line (sample, seed, QC, seconds) is printed above them and stays.

    Off a TTY: a log line per finished stage, a result line per sample, and a heartbeat line (the current stage,
    its step, the ETAs) whenever nothing was printed for 10 s (MAISI_HEARTBEAT_S)."""
    if output.quiet:
        yield lambda event: None
        return
    first = first or ("loading networks…" if samples else "starting…")
    clock = ProgressClock(samples, label_of=event_label)
    console = stderr_console()
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if not output.json:
            terminal.status(first)
        bars = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        eta_column(), console=console, transient=True)
        state: dict[str, Any] = {"label": None, "started": False}

        def on_progress(event: ProgressEvent) -> None:
            clock.update(event)
            if not state["started"]:
                terminal.clear()
                bars.start()
                state["overall"] = bars.add_task("samples", total=samples) if samples else None
                state["current"] = bars.add_task(first, total=1)
                state["started"] = True
            current, overall = state["current"], state["overall"]
            label = event_label(event)
            if label != state["label"]:
                state["label"] = label
                bars.reset(current, total=event.total, description=label)
            left = clock.stage_left()
            bars.update(current, completed=event.done, total=event.total,
                        deadline=None if left is None else time.monotonic() + left)
            if overall is not None:
                run_left = clock.run_left()
                bars.update(overall, completed=min(clock.samples_made(), samples),
                            deadline=None if run_left is None else time.monotonic() + run_left)
            if event.stage == "write" and event.finished and event.sample is not None:
                made = clock.made[-1] if clock.made else None
                bars.console.print(result_line(event, made), markup=False, highlight=False)

        try:
            yield on_progress
        finally:
            terminal.clear()
            if state["started"]:
                bars.stop()
        return

    terminal.clear()
    heartbeat = terminal.Ticker(sys.stderr, tty=False)
    heartbeat.show(lambda: heartbeat_text(clock, first), grace=heartbeat.interval)
    stage_started: dict[str, float] = {}

    def log_line(text: str) -> None:
        with heartbeat.lock:
            console.print(text, soft_wrap=True, markup=False, highlight=False)
            heartbeat.printed()

    def log_stage(event: ProgressEvent) -> None:
        label = event_label(event)
        stage_started.setdefault(label, clock.last_at)  # a stage starts when the one before it reported
        clock.update(event)
        now = clock.last_at
        if event.finished:
            took = now - stage_started[label]
            log_line(f"[{now - clock.started:8.1f}s] {label} {event.done}/{event.total} ({took:.1f}s)")
        if event.stage == "write" and event.finished and event.sample is not None:
            log_line(result_line(event, clock.made[-1] if clock.made else None))

    try:
        yield log_stage
    finally:
        heartbeat.stop()


def output_of(obj: Any, json_flag: bool = False) -> Output:
    """The global options, with a command's own --json added."""
    base = obj if isinstance(obj, Output) else Output()
    return Output(json=base.json or json_flag, quiet=base.quiet, debug=base.debug)
