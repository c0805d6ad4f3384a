"""The full-size rflow-ct networks, saved under the released file names and layouts, generate through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi_cli.models import get_model
from tests.cli.test_subprocess import maisi_executable
from tests.helpers import phantom_labels, write_mask, write_released_weights


@pytest.fixture(scope="module")
def full_size_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = tmp_path_factory.mktemp("released-weights")
    write_released_weights(get_model("rflow-ct"), weights, seed=1)
    return weights


@pytest.mark.slow
def test_full_size_rflow_ct_generates_64_cubed_on_cpu(full_size_weights: Path, tmp_path: Path):
    expected_files = {"models/autoencoder_v1.pt", "models/diff_unet_3d_rflow-ct.pt", "models/controlnet_3d_rflow-ct.pt"}
    assert {str(p.relative_to(full_size_weights)) for p in full_size_weights.rglob("*.pt")} == expected_files

    mask = write_mask(tmp_path / "mask.nii.gz", (64, 64, 64), (1.5, 1.5, 1.5))
    out = tmp_path / "out"
    done = subprocess.run(
        [*maisi_executable(), "--json", "generate", "--model", "maisi3d-rflow", "--size", "64x64x64",
         "--spacing", "1.5", "--allow-any-size", "--steps", "3", "--mask", str(mask), "--out", str(out), "--no-qc"],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
        env={**os.environ, "MAISI_WEIGHTS_DIR": str(full_size_weights)},
    )
    assert done.returncode == 0, done.stderr
    assert "allowed by --allow-any-size" in done.stderr
    report = json.loads(done.stdout)
    assert report["written"] == [0] and report["plan"]["model"] == "rflow-ct"

    image = nib.load(out / "sample_0000_image.nii.gz")
    hu = np.asarray(image.dataobj)
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    assert hu.shape == (64, 64, 64) and hu.dtype == np.int16
    np.testing.assert_allclose(image.header.get_zooms(), (1.5, 1.5, 1.5))
    np.testing.assert_array_equal(labels, phantom_labels((64, 64, 64)))
    assert hu.min() >= -1000 and hu.max() <= 1000 and np.all(hu[labels == 0] == -1000)

    sidecar = json.loads((out / "sample_0000.json").read_text())
    unet = full_size_weights / "models/diff_unet_3d_rflow-ct.pt"
    assert sidecar["weights"]["diffusion_unet"]["sha256"] == hashlib.sha256(unet.read_bytes()).hexdigest()
