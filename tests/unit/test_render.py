"""Progress rendering: bars on a terminal, log lines in batch logs, nothing with --quiet."""

from __future__ import annotations

import io

from rich.console import Console

from maisi_cli.cli import render
from maisi_cli.engine.progress import ProgressEvent


def feed(callback) -> None:
    """The events of a one-sample run, as the engine sends them."""
    for done, component in enumerate(("autoencoder", "diffusion_unet", "controlnet"), start=1):
        callback(ProgressEvent("load", done, 3, subject=component))
    for stage, total in (("denoise", 30), ("decode", 1), ("write", 1)):
        for done in range(1, total + 1):
            callback(ProgressEvent(stage, done, total, sample=0))


def test_terminal_gets_bars(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(render, "stderr_console", lambda: Console(file=buffer, force_terminal=True, width=100))
    with render.progress(render.Output(), samples=1) as on_progress:
        feed(on_progress)
    text = buffer.getvalue()
    # the last frame before the transient bars clear: the current stage and the samples bar, both complete
    assert "sample 0000 write" in text and "samples" in text and "1/1" in text and "\x1b[2K" in text


def test_batch_log_gets_one_line_per_stage(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(render, "stderr_console", lambda: Console(file=buffer, force_terminal=False, width=100))
    with render.progress(render.Output(), samples=1) as on_progress:
        feed(on_progress)
    *stages, result = buffer.getvalue().splitlines()
    assert [line.split("] ", 1)[1].split(" (")[0] for line in stages] == [
        "load networks 3/3", "sample 0000 denoise 30/30", "sample 0000 decode 1/1", "sample 0000 write 1/1"]
    assert result.startswith("sample 0000 ")  # the sample's result line, which stays after the log


def test_quiet_prints_nothing(monkeypatch, capsys):
    with render.progress(render.Output(quiet=True)) as on_progress:
        feed(on_progress)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
