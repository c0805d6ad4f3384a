"""What `maisi generate` and `maisi train` show while they run, in-process (stderr is not a TTY under CliRunner, so
the log form; tests/cli/test_terminal_pty.py drives the TTY form through a pseudo-terminal): heartbeats during a long
stage, result lines, SIGTERM's line and resume, the training bar's seconds per step and the run's metrics.jsonl and
progress.png."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal

from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from maisi_cli.cli import render
from maisi_cli.cli.app import app

runner = CliRunner()


def generate_args(tiny_model, mask, out, *extra: str) -> list[str]:
    spec, weights = tiny_model
    return ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask), "--out", str(out),
            "--no-qc", *extra]


def test_heartbeats_off_a_tty_during_a_long_denoise(tiny_model, mask_file, tmp_path):
    result = runner.invoke(app, generate_args(tiny_model, mask_file, tmp_path / "out", "--steps", "30"),
                           env={"MAISI_HEARTBEAT_S": "0.2"})
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    beats = [line for line in lines if re.fullmatch(r"\[ *[\d.]+s\] sample 0000 denoise \d+/30, .+ left; samples "
                                                    r"0\.\d/1, .+ left", line)]
    assert len(beats) >= 2, result.stderr  # a line whenever nothing was printed for the interval, ETAs in it
    assert any(re.fullmatch(r"sample 0000 .* \d+\.\d s", line) for line in lines), result.stderr  # its result line


def test_sigterm_mid_run_says_what_is_complete_and_resumes(tiny_model, mask_file, tmp_path, monkeypatch):
    """SIGTERM once sample 0 is on disk: exit 143, one line with what is complete and the command that resumes it,
    no traceback, nothing of sample 1 under a final or temporary name; that command then makes samples 1 and 2."""
    out = tmp_path / "out"
    showing = render.progress

    @contextlib.contextmanager
    def terminated_after_sample_0(output, samples=None, first=None):
        with showing(output, samples, first) as on_progress:
            def on_event(event):
                on_progress(event)
                if event.stage == "write" and event.sample == 0:
                    os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread, as from `kill`

            yield on_event

    monkeypatch.setattr(render, "progress", terminated_after_sample_0)
    args = generate_args(tiny_model, mask_file, out, "--steps", "3", "-n", "3")
    result = runner.invoke(app, args)
    assert result.exit_code == 143, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    resume = shlex.join(["maisi", *args])
    assert last == (f"Error: interrupted (SIGTERM): 1 of 3 sample(s) complete in {out}; to resume (complete samples "
                    f"are skipped), run: {resume}"), result.stderr
    assert (out / "sample_0000.json").is_file()
    assert not list(out.glob("sample_0001*")) and not list(out.glob(".*partial")) and not list(out.glob(".*.lock"))

    monkeypatch.setattr(render, "progress", showing)
    again = runner.invoke(app, ["--json", *shlex.split(resume)[1:]])
    assert again.exit_code == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["skipped"] == [0] and report["written"] == [1, 2]


def test_training_bar_shows_seconds_per_step_and_the_run_keeps_its_metrics(tiny_model, tmp_path, monkeypatch):
    spec, _ = tiny_model
    made = runner.invoke(app, ["--quiet", "data", "phantoms", "--out", str(tmp_path / "ph"), "--num", "2", "--size",
                               "32x32x32", "--spacing", "4"])
    assert made.exit_code == 0, made.stderr
    screen = io.StringIO()
    monkeypatch.setattr(render, "stderr_console",
                        lambda: Console(file=screen, force_terminal=True, width=140, color_system=None))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "vae", "--data", str(tmp_path / "ph" / "datalist.json"), "--out", str(run),
                                 "--model", str(spec), "--device", "cpu", "--epochs", "2", "--patch-size", "16",
                                 "--perceptual-weight", "0", "--adversarial-weight", "0"])
    assert result.exit_code == 0, result.stderr
    bars = screen.getvalue()
    assert re.search(r"epoch 2/2 .* 1/1 loss \d+\.\d{4}  \d+\.\d\d s/step", bars), bars
    assert "it/s" not in bars
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in steps] == [(1, 1), (2, 2)]  # one training item: one step an epoch
    assert all({"loss", "recon_l1", "kl"} <= set(r["losses"]) and r["lr"] > 0 and r["seconds"] > 0 for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2] and all("val_loss" in r["val"] for r in epochs)
    with Image.open(run / "progress.png") as image:
        assert image.format == "PNG" and image.size == (900, 900)
    assert not list(run.glob(".*partial"))


def test_training_heartbeat_off_a_tty_names_the_step_loss_and_pace(monkeypatch, capsys):
    import time

    from maisi_cli.cli.train import train_progress
    from maisi_cli.engine.progress import ProgressEvent

    monkeypatch.setenv("MAISI_HEARTBEAT_S", "0.1")
    with train_progress(render.Output()) as on_event:
        on_event(ProgressEvent("train", 3, 10, "epoch 1/2", metrics={"loss": 0.5, "lr": 1e-4, "seconds": 11.0}))
        time.sleep(0.35)
    beats = capsys.readouterr().err.splitlines()
    assert len(beats) >= 2 and all(re.fullmatch(r"\[ *[\d.]+s\] epoch 1/2 step 3/10, loss 0\.5000, 11\.00 s/step, "
                                                r"1:1[0-9] left in the epoch", beat) for beat in beats), beats
