"""`maisi data embed` → `maisi train diffusion` through the CLI, and the training progress display."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from maisi_cli.cli import render
from maisi_cli.cli.app import app
from maisi_cli.cli.train import train_progress
from maisi_cli.engine.progress import ProgressEvent
from tests.helpers import write_tiny_model


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return result


def test_phantoms_embed_train_ddpm_end_to_end(tmp_path: Path):
    """Region one-hots go from the phantom labels through the embedding sidecars into a DDPM (region-input) UNet."""
    from maisi_cli.cli import data

    if not any(getattr(c, "name", None) == "phantoms" for c in data.app.registered_commands):
        pytest.skip("`maisi data phantoms` is not in this tree")
    spec, weights = write_tiny_model(tmp_path / "model", scheduler="ddpm", mask_generator=False)
    invoke("--quiet", "data", "phantoms", "--out", str(tmp_path / "ph"), "--num", "2", "--size", "32x32x32",
           "--spacing", "4")
    invoke("--quiet", "data", "embed", str(tmp_path / "ph" / "datalist.json"), "--out", str(tmp_path / "emb"),
           "--model", str(spec), "--weights-dir", str(weights), "--device", "cpu")
    listed = json.loads((tmp_path / "emb" / "embeddings.json").read_text())["training"]
    assert len(listed) == 2 and all("top_region_index" in item for item in listed)
    result = invoke("--json", "train", "diffusion", "--data", str(tmp_path / "emb" / "embeddings.json"), "--out",
                    str(tmp_path / "run"), "--model", str(spec), "--device", "cpu", "--epochs", "1")
    summary = json.loads(result.stdout)
    assert summary["scheduler"] == "ddpm" and summary["samples"] == 2
    checkpoint = torch.load(tmp_path / "run" / "diff_unet.pt", weights_only=True)
    assert checkpoint["epoch"] == 1


def test_progress_on_a_tty_shows_a_bar_per_epoch_with_loss_and_rate(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(render, "stderr_console",
                        lambda: Console(file=buffer, force_terminal=True, width=120, color_system=None))
    with train_progress(render.Output()) as on_event:
        for epoch in (1, 2):
            for step in (1, 2):
                on_event(ProgressEvent("train", step, 2, f"epoch {epoch}/2", metrics={"loss": 0.25 * step, "lr": 1e-4}))
            on_event(ProgressEvent("epoch", epoch, 2, f"epoch {epoch}/2",
                                   metrics={"loss": 0.375, "seconds": 1.0, "samples": 2}))
    text = buffer.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "loss 0.3750" in text and "s/step" in text and "it/s" not in text


def test_progress_off_a_tty_is_json_lines_and_quiet_is_silent(capsys):
    event = ProgressEvent("epoch", 1, 1, "epoch 1/1", metrics={"loss": 0.5, "seconds": 2.0, "samples": 4})
    with train_progress(render.Output()) as on_event:
        on_event(ProgressEvent("train", 1, 1, "epoch 1/1", metrics={"loss": 0.5, "lr": 1e-4}))
        on_event(event)
    line = json.loads(capsys.readouterr().err)
    assert line == {"event": "epoch", "epoch": 1, "epochs": 1, "loss": 0.5, "seconds": 2.0, "samples_per_s": 2.0}
    with train_progress(render.Output(quiet=True)) as on_event:
        on_event(event)
    assert capsys.readouterr().err == ""
