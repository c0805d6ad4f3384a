"""`maisi generate` in a pseudo-terminal, as a person sees it: the status line before anything loads, result lines
that stay once the bars vanish, a samples ETA before the first sample is made, and Ctrl-C's one line with the
command that resumes the run. Each test is one real process (the imports of torch and MONAI are most of its time).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_subprocess import maisi_executable

pty = pytest.importorskip("pty")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pseudo-terminals")

ANSI = re.compile(r"\x1b\[\??[0-9;]*[A-Za-z]")


class Terminal:
    """A process on a pseudo-terminal of 120x40, its output read with the time each piece came."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        import fcntl
        import struct
        import termios

        self.started = time.monotonic()
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its stdio is the terminal
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            os.execve(args[0], args, {**os.environ, "COLUMNS": "120", "TERM": "xterm", **(env or {})})
        self.chunks: list[tuple[float, bytes]] = []
        self.code: int | None = None

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def text(self) -> str:
        return ANSI.sub("", self.data.decode("utf-8", "replace"))

    def read_until(self, predicate, timeout: float) -> bool:
        """Read until predicate(self) holds (True) or the process ends or `timeout` passes (False)."""
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    return predicate(self)
                self.chunks.append((time.monotonic() - self.started, chunk))
        return predicate(self)

    def wait(self, timeout: float) -> int:
        self.read_until(lambda _: False, timeout)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def first_time(self, text: str) -> float | None:
        """When `text` had first come out (seconds after the start)."""
        seen = b""
        for at, chunk in self.chunks:
            seen += chunk
            if text in ANSI.sub("", seen.decode("utf-8", "replace")):
                return at
        return None

    def screen(self) -> list[str]:
        """The terminal's lines at the end (enough of VT100 for rich and the status line: CR, LF, erase line,
        cursor up)."""
        lines, row, col = [""], 0, 0
        for match in re.finditer(r"\x1b\[(\??)([0-9;]*)([A-Za-z])|\r|\n|[^\x1b\r\n]+|\x1b",
                                 self.data.decode("utf-8", "replace")):
            token = match.group(0)
            if match.group(3):
                if match.group(1):
                    continue
                if match.group(3) == "K":
                    lines[row] = lines[row][:col] if match.group(2) in ("", "0") else ""
                elif match.group(3) == "A":
                    row = max(0, row - int(match.group(2) or 1))
            elif token == "\r":
                col = 0
            elif token == "\n":
                row, col = row + 1, 0
                lines += [""] * (row + 1 - len(lines))
            elif token != "\x1b":
                line = lines[row].ljust(col)
                lines[row] = line[:col] + token + line[col + len(token):]
                col += len(token)
        return [line.rstrip() for line in lines if line.strip()]


def generate_command(tiny_model, mask: Path, out: Path, *extra: str) -> list[str]:
    spec, weights = tiny_model
    return [*maisi_executable(), "generate", "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask),
            "--out", str(out), "--no-qc", *extra]


def test_status_first_then_bars_and_result_lines_that_stay(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    terminal = Terminal(generate_command(tiny_model, mask_file, out, "-n", "2", "--steps", "8"))
    assert terminal.wait(300) == 0, terminal.text()
    status = terminal.first_time("maisi: importing torch and MONAI…")
    loading = terminal.first_time("load networks")
    assert status is not None and loading is not None and status < loading, terminal.text()
    # the status is the first output, long before torch and MONAI are imported (0.14-0.22 s here on a busy 2-core
    # machine, Python's start included; the bound leaves room for a loaded CI runner)
    assert terminal.chunks[0][0] == status and status < 3.0, status
    text = terminal.text()
    first_result = text.index("sample 0000  ")  # the result line (a bar's label is "sample 0000 denoise")
    # the samples bar had an ETA before the first sample was made (from the first denoise step)
    assert re.search(r"samples .* 0/2 .* eta (\d+s|\d+:\d\d)", text[:first_result]), text[:first_result]
    screen = terminal.screen()
    results = [line for line in screen if re.fullmatch(r"sample 000[01] .*\d+\.\d s", line)]
    assert [line.split()[1] for line in results] == ["0000", "0001"], screen  # they stay; the bars are gone
    assert screen[-1].startswith("2 sample(s) written, 0 already complete"), screen
    assert not [line for line in screen if "maisi:" in line or "━" in line or "eta " in line], screen


def test_ctrl_c_prints_what_is_complete_and_the_command_to_resume(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    command = generate_command(tiny_model, mask_file, out, "-n", "3", "--steps", "15")
    terminal = Terminal(command)
    # once sample 0 is written (its result line is out), press Ctrl-C: the terminal sends SIGINT to the run
    assert terminal.read_until(lambda t: re.search(r"sample 0000  .*\d s", t.text()), 300), terminal.text()
    os.write(terminal.fd, b"\x03")
    assert terminal.wait(120) == 130, terminal.text()
    screen = terminal.screen()
    assert "Traceback" not in terminal.text()
    resume = shlex.join(["maisi", *command[len(maisi_executable()):]])
    assert screen[-1] == (f"Error: interrupted (Ctrl-C): 1 of 3 sample(s) complete in {out}; to resume (complete "
                          f"samples are skipped), run: {resume}"), screen
    assert any(line.startswith("sample 0000 ") for line in screen)  # what was done stays on screen
    assert (out / "sample_0000.json").is_file() and not list(out.glob("sample_0002*"))
    assert not list(out.glob(".*partial")), list(out.iterdir())
