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
                 "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec .json, weights folder) of a tiny rflow model saved in the released checkpoint layout."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def mask_file(tmp_path: Path) -> Path:
    """A 32^3 label map at 2 mm: body, liver, spleen, two lung lobes."""
    return write_mask(tmp_path / "mask.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
