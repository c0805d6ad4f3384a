"""What a person sees while a long command has nothing else to show: a status line, heartbeats, and the line an
interruption ends with.

Standard library only: `cli/app.py` imports this before typer and rich, so the status of a slow command shows within
the first 100 ms (typer, rich and every command module take about 0.6 s to import, torch and MONAI 5-20 s).

- On a TTY the status is one transient line, rewritten in place with the seconds so far and erased before anything
  else prints (`clear`), so it never stays on screen.
- Off a TTY a status is logged as a plain line once it has lasted a while (the import status: `GRACE_S`, and only
  into a log file; a later one: the heartbeat interval), so a failure right away still prints only its one error
  line; then again every heartbeat interval while it lasts. A `Ticker` with a text function is the heartbeat of a
  long stage: a line whenever nothing was printed for the interval.
- The heartbeat interval is 10 s; MAISI_HEARTBEAT_S sets another (tests use a short one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

HEARTBEAT_ENV = "MAISI_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 10.0
GRACE_S = 3.0  # off a TTY: a status that lasts less is not logged
REFRESH_S = 0.1  # on a TTY: how often the line is redrawn
PREFIX = "maisi: "

# The commands that import torch and MONAI before they can say anything else (the early status is theirs).
SLOW_COMMANDS = {("generate",), ("train",), ("fid",), ("export",), ("data", "embed")}
NO_STATUS_FLAGS = {"--json", "--quiet", "-q", "--help", "-h", "--version", "--install-completion",
                   "--show-completion"}


def heartbeat_seconds() -> float:
    """The heartbeat interval: MAISI_HEARTBEAT_S when it is a positive number, else 10 s."""
    try:
        value = float(os.environ.get(HEARTBEAT_ENV, ""))
    except ValueError:
        return DEFAULT_HEARTBEAT_S
    return value if value > 0 else DEFAULT_HEARTBEAT_S


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def clock(seconds: float) -> str:
    """1:02:03, 2:03 or 7s: an elapsed time or an ETA, short."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs}s"


class Ticker:
    """A line kept alive by a thread. `show(text)` names what is going on (a string, or a function called at each
    tick); `printed()` tells it that another line was just written; `stop()` erases it (TTY) and ends the thread.

    On a TTY the line is redrawn every REFRESH_S with the seconds since the text was shown. Off a TTY it is written
    as a log line `grace` seconds after `show` and then whenever nothing was written for `interval` seconds."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, interval: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_tty(self.stream) if tty is None else tty
        self.interval = interval if interval is not None else heartbeat_seconds()
        self.lock = threading.RLock()  # held while anyone writes to the stream (this thread, or a caller)
        self._wake = threading.Condition(self.lock)
        self._text: str | Callable[[], str] | None = None
        self._since = 0.0
        self._due = float("inf")
        self._drawn = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        spinner = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
        try:
            spinner.encode(getattr(self.stream, "encoding", None) or "ascii")
        except (UnicodeEncodeError, LookupError):
            spinner = "|/-\\"
        self._spinner = spinner
        self._frame = 0

    # --- what callers use ------------------------------------------------------------------------------------------
    def show(self, text: str | Callable[[], str], grace: float = GRACE_S) -> None:
        with self.lock:
            if self._stopped:
                return
            now = time.monotonic()
            if text != self._text:
                self._since = now
            self._text = text
            self._due = now + grace
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="maisi-status", daemon=True)
                self._thread.start()
            if self.tty:
                self._draw(now)
            self._wake.notify()

    def printed(self) -> None:
        """Another line was written: off a TTY the next heartbeat is an interval from now."""
        with self.lock:
            self._due = time.monotonic() + self.interval

    def erase(self) -> None:
        """On a TTY: take the line off the screen (it comes back at the next tick unless the text is cleared)."""
        with self.lock:
            if self._drawn:
                self._write("\r\x1b[2K")
                self._drawn = False

    def hide(self) -> None:
        """No text any more: nothing is drawn or logged until the next `show`."""
        with self.lock:
            self._text = None
            self._due = float("inf")
            self.erase()

    def stop(self) -> None:
        with self.lock:
            self._stopped = True
            self._text = None
            self.erase()
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)

    # --- the thread ------------------------------------------------------------------------------------------------
    def _current(self) -> str | None:
        text = self._text
        if text is None:
            return None
        try:
            return text() if callable(text) else text
        except Exception:  # a heartbeat must never end the run
            return None

    def _write(self, data: str) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing to show any more
            self._stopped = True

    def _draw(self, now: float) -> None:
        text = self._current()
        if text is None:
            return
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns or 80  # 0: a terminal that says no size
        except (OSError, ValueError, AttributeError):
            width = 80
        frame = self._spinner[self._frame % len(self._spinner)]
        self._frame += 1
        line = f"{frame} {text} {clock(now - self._since)}"
        self._write("\r\x1b[2K" + line[:max(width - 1, 10)])
        self._drawn = True

    def _run(self) -> None:
        with self.lock:
            while not self._stopped:
                now = time.monotonic()
                if self.tty:
                    if self._text is not None:
                        self._draw(now)
                    self._wake.wait(REFRESH_S)
                    continue
                if self._text is not None and now >= self._due:
                    text = self._current()
                    if text is not None:
                        seconds = now - self._since
                        self._write(text + (f" ({clock(seconds)})" if seconds >= 1 and
                                            not callable(self._text) else "") + "\n")
                    self._due = now + self.interval
                self._wake.wait(max(0.01, min(self._due - time.monotonic(), 1.0)))


# --- the status of the running command ------------------------------------------------------------------------------
_status: Ticker | None = None
# What renderers learn that an interruption's line needs ("train_out", "epoch": (done, total)); cleared per command.
facts: dict[str, Any] = {}


def status(text: str, grace: float | None = None) -> None:
    """Say what the command is doing now ("loading networks…"), until something else prints. Off a TTY it is
    logged once it has lasted `grace` seconds (default: the heartbeat interval, so that a command that fails while
    preparing still prints only its one error line)."""
    global _status
    if _status is None or _status._stopped:
        _status = Ticker()
        if _status.tty:
            sys.stderr = _ErasingStream(sys.stderr, _status)
    _status.show(PREFIX + text, grace=heartbeat_seconds() if grace is None else grace)


class _ErasingStream:
    """sys.stderr while a status is drawn on the TTY: whatever else writes there (a library's warning or log
    record, e.g. MONAI's as it imports) first erases the status line, so it prints on lines of its own and the
    status is drawn again below it."""

    def __init__(self, stream: TextIO, ticker: Ticker):
        self._stream = stream
        self._ticker = ticker

    def write(self, data: str) -> int:
        with self._ticker.lock:
            self._ticker.erase()
            return self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def clear() -> None:
    """End the status line (before a bar, a result or an error prints)."""
    global _status
    if _status is not None:
        _status.stop()
        if isinstance(sys.stderr, _ErasingStream) and sys.stderr._ticker is _status:
            sys.stderr = sys.stderr._stream
        _status = None


@contextlib.contextmanager
def above() -> Iterator[None]:
    """Print a line (a warning) while the status stays: the status is erased and drawn again below it."""
    ticker = _status
    if ticker is None or ticker._stopped:
        yield
        return
    with ticker.lock:
        ticker.erase()
        yield
        ticker.printed()


def command_words(argv: list[str]) -> list[str]:
    """The words of a command line that are not options (a command, its subcommand, values)."""
    return [word for word in argv if not word.startswith("-")]


def is_maisi_program(argv0: str) -> bool:
    """Whether this process runs maisi itself (the `maisi` script or `python -m maisi_cli`), not a test runner that
    imported it."""
    path = Path(argv0)
    return path.name in ("maisi", "maisi.exe") or (path.name == "__main__.py" and path.parent.name == "maisi_cli")


def is_log_file(stream: Any) -> bool:
    """Whether `stream` is a regular file (a batch job's log, `2> run.log`), not a pipe a program reads."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, ValueError, OSError):
        return False


def early_status(argv: list[str]) -> None:
    """At the start of the `maisi` program: the status of a slow command, before typer, rich and torch import.
    Nothing with --json, --quiet, --help or --version, nor on ranks above 0 of a torchrun job. Off a TTY only into
    a log file: a program reading stderr through a pipe expects a failure's one error line alone (failures found
    after the imports come after the status was logged)."""
    if not argv or not is_maisi_program(argv[0]) or os.environ.get("RANK", "0") != "0":
        return
    if not (is_tty(sys.stderr) or is_log_file(sys.stderr)):
        return
    args = argv[1:]
    if "--" in args:
        args = args[:args.index("--")]
    if any(arg in NO_STATUS_FLAGS for arg in args):
        return
    words = command_words(args)
    if not any(tuple(words[:len(command)]) == command for command in SLOW_COMMANDS):
        return
    status("importing torch and MONAI…", grace=GRACE_S)  # failures this early are usage errors, in well under GRACE_S
    install_early_interrupt()


# --- interruption ---------------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the run unwinds as for Ctrl-C (locks released, temporary files
    removed) and ends with exit code 143."""


def install_early_interrupt() -> None:
    """Until the command runs (app.py installs its own handlers then), Ctrl-C or SIGTERM during the imports ends the
    process at once with one line: nothing has been written yet."""

    def stop(signum: int, frame: Any) -> None:
        clear()
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        sys.stderr.write(f"Error: interrupted ({name}) before the command started; nothing was written\n")
        sys.stderr.flush()
        os._exit(130 if signum == signal.SIGINT else 143)

    try:
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        pass
