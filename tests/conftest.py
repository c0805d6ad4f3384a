"""Shared fixtures: an isolated environment per test, a tiny model with random weights, a label map."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads (see maisi_cli/cli/app.py): spinning OpenMP waits make 2-core runs erratically slow.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Installed plugins (plugins/maisi-mr in a dev or CI venv) stay out of tests, the app's command mounting at import
# included; tests/cli/test_plugins.py loads them on purpose.
os.environ["MAISI_LOAD_PLUGINS"] = ""

import pytest

from tests.helpers import write_mask, write_tiny_model


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the user's caches, weights or batch-scheduler variables, or reaches the network."""
    monkeypatch.setenv("MAISI_HOME", str(tmp_path / "maisi-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MAISI_LOAD_PLUGINS", "")
    for name in ("MAISI_WEIGHTS_DIR", "MAISI_PROFILE_PATH", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                 "HF_HUB_CACHE", "MAISI_LEVERS", "MAISI_HEARTBEAT_S"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec .json, weights folder) of a tiny rflow model saved in the released checkpoint layout."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def mask_file(tmp_path: Path) -> Path:
    """A 32^3 label map at 2 mm: body, liver, spleen, two lung lobes."""
    return write_mask(tmp_path / "mask.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))


@pytest.fixture(scope="session")
def tiny_onnx_export(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(folder, the command's JSON document) of `maisi export onnx --component all --size 32` of the tiny model, made
    once for the session (about a minute and a half): the CLI tests check the command, the unit tests compare its
    graphs with PyTorch."""
    import json

    from typer.testing import CliRunner

    from maisi_cli.cli.app import app

    spec, weights = tiny_model
    out = tmp_path_factory.mktemp("tiny-onnx")
    with pytest.MonkeyPatch.context() as patch:  # session scope: the autouse fixture's MAISI_HOME is per test
        patch.setenv("MAISI_HOME", str(tmp_path_factory.mktemp("onnx-maisi-home")))
        result = CliRunner().invoke(app, ["--json", "export", "onnx", "--model", str(spec), "--weights-dir",
                                          str(weights), "--component", "all", "--size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)
