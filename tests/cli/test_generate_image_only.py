"""`maisi generate` with an image-only model (no ControlNet, as MAISI v2's MR models): the tiny test networks behind a
spec without ControlNet weights, MR output intensities and classifier-free guidance."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.helpers import tiny_spec_document

runner = CliRunner()


@pytest.fixture
def image_only_model(tiny_model, tmp_path: Path) -> tuple[Path, Path]:
    """(spec, weights folder): the tiny rflow networks (their weight files shared with `tiny_model`), without a
    ControlNet, with MR output and guidance 3."""
    document = tiny_spec_document("rflow")
    document["name"] = "tiny-mr"
    document["weights"].pop("controlnet")
    document["network"].pop("controlnet_def")
    document.update({"output_intensity": "mr", "cfg_guidance_scale": 3.0})
    spec = tmp_path / "tiny-mr.json"
    spec.write_text(json.dumps(document))
    return spec, tiny_model[1]


def generate(model: tuple[Path, Path], out: Path, *extra: str):
    spec, weights = model
    return runner.invoke(app, ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights),
                               "--device", "cpu", "--out", str(out), *extra])


def test_generate_image_only_writes_image_and_sidecar(image_only_model, tmp_path):
    out = tmp_path / "out"
    result = generate(image_only_model, out, "--steps", "2", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] == [0] and report["qc_failed"] == []
    assert report["samples"][0]["files"] == ["sample_0000_image.nii.gz", "sample_0000.json"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "maisi-run.json", "sample_0000.json", "sample_0000_image.nii.gz"]  # the folder's run record, no label

    image = nib.load(out / "sample_0000_image.nii.gz")
    assert image.shape == (32, 32, 32) and image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.header.get_zooms(), (2.0, 2.0, 2.0))
    voxels = np.asarray(image.dataobj)
    assert voxels.min() >= 0 and voxels.std() > 0  # MR: 1000·x clipped below at 0; no HU, no air crop

    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["image_only"] is True and sidecar["files"] == {"image": "sample_0000_image.nii.gz", "label": None}
    assert sidecar["guidance"] == 3.0 and sidecar["output_intensity"] == "mr"
    assert sidecar["mask_source"] == {"type": "none"} and sidecar["label_mode"] is None
    assert sidecar["qc"] is None and "image-only" in sidecar["qc_skipped"]
    assert set(sidecar["weights"]) == {"autoencoder", "diffusion_unet"}

    again = generate(image_only_model, out, "--steps", "2", "--seed", "3")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["skipped"] == [0]  # image + sidecar make the sample complete


def test_guidance_changes_the_image_and_zero_turns_it_off(image_only_model, tmp_path):
    def image(out: Path, *extra: str) -> np.ndarray:
        result = generate(image_only_model, out, "--steps", "2", "--seed", "3", *extra)
        assert result.exit_code == 0, result.stderr
        return np.asarray(nib.load(out / "sample_0000_image.nii.gz").dataobj)

    guided, off = image(tmp_path / "guided"), image(tmp_path / "off", "--guidance", "0")  # upstream: on above 0
    assert not np.array_equal(guided, off)
    sidecar = json.loads((tmp_path / "off" / "sample_0000.json").read_text())
    assert sidecar["guidance"] is None


@pytest.mark.parametrize("extra, message", [
    (("--guidance", "-0.5"), "--guidance: -0.5 is negative"),
    (("--mask", "mask.nii.gz"), "model tiny-mr generates images only (no ControlNet): drop --mask"),
    (("--anatomy", "liver"), "drop --anatomy"),
    (("--label-mode", "requested"), "drop --label-mode requested"),
    (("--preview",), "drop --preview"),
])
def test_image_only_usage_errors(image_only_model, tmp_path, extra, message):
    result = generate(image_only_model, tmp_path / "out", "--dry-run", *extra)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_dry_run_table_shows_no_mask(image_only_model, tmp_path):
    spec, weights = image_only_model
    result = runner.invoke(app, ["generate", "--model", str(spec), "--weights-dir", str(weights), "--device", "cpu",
                                 "--out", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "type: none" in result.stdout and "guidance 3" in result.stdout and "image-only" in result.stdout
