"""What is loaded is what was checked (issue 20): `maisi generate` records the sha256 of the bytes it loaded and
holds a file of maisi's store to its lock even when the file was rewritten with its size and mtime kept; a wrong
value in a spec's network block or a checkpoint's scale_factor is one error line, not a traceback."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.cli.test_errors import assert_nothing_written, assert_one_line_error

runner = CliRunner()
UNET = "models/diff_unet_3d_rflow-ct.pt"


def own_copy(tiny_model: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(spec, weights folder) this test may change: the session's tiny model stays as it is."""
    spec, weights = tiny_model
    shutil.copytree(weights, tmp_path / "weights")
    return spec, tmp_path / "weights"


def generate(spec: Path, mask: Path, out: Path, *extra: str):
    return runner.invoke(app, ["--quiet", "generate", "--model", str(spec), "--mask", str(mask), "--out", str(out),
                               "--no-qc", "--steps", "2", "--seed", "5", *extra])


def rewrite_keeping_size_and_mtime(path: Path) -> str:
    """Change one weight of a checkpoint in place, the file's size and mtime as before (a restore, a copy tool that
    keeps times); returns the new sha256."""
    stat = path.stat()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["unet_state_dict"]
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name] + 0.5
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    assert len(buffer.getvalue()) == stat.st_size
    path.write_bytes(buffer.getvalue())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def sidecar_sha256(out: Path, component: str = "diffusion_unet") -> str:
    return json.loads((out / "sample_0000.json").read_text())["weights"][component]["sha256"]


def test_the_sidecar_records_the_weights_that_ran_after_an_in_place_change(tiny_model, mask_file, tmp_path):
    spec, weights = own_copy(tiny_model, tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    assert generate(spec, mask_file, first, "--weights-dir", str(weights)).exit_code == 0
    old = hashlib.sha256((weights / UNET).read_bytes()).hexdigest()
    assert sidecar_sha256(first) == old

    new = rewrite_keeping_size_and_mtime(weights / UNET)
    result = generate(spec, mask_file, second, "--weights-dir", str(weights))
    assert result.exit_code == 0, result.stderr
    assert new != old and sidecar_sha256(second) == new
    # the image did change with the weights, so an old digest would have vouched for an image it never made
    images = [np.asarray(nib.load(out / "sample_0000_image.nii.gz").dataobj) for out in (first, second)]
    assert not np.array_equal(*images)


def test_a_store_file_rewritten_with_its_mtime_kept_is_refused_by_its_lock(tiny_model, mask_file, tmp_path):
    spec, weights = own_copy(tiny_model, tmp_path)
    imported = runner.invoke(app, ["--quiet", "weights", "import", str(weights), str(spec)])
    assert imported.exit_code == 0, imported.stderr
    assert generate(spec, mask_file, tmp_path / "before").exit_code == 0  # loads from maisi's store

    stored = next((tmp_path / "maisi-home" / "weights").rglob(Path(UNET).name))
    rewrite_keeping_size_and_mtime(stored)
    out = tmp_path / "after"
    assert_one_line_error(generate(spec, mask_file, out), 1, str(stored), "no longer matches the sha256 locked",
                          f"maisi weights download {spec.resolve()} --component diffusion_unet --force")
    assert_nothing_written(out)


@pytest.mark.parametrize(("path", "value", "field"), [
    (("network", "diffusion_unet_def", "num_channels"), "big", "network.diffusion_unet_def.num_channels"),
    (("network", "latent_channels"), "four", "network.latent_channels"),
    (("network", "noise_scheduler", "num_train_timesteps"), "many", "network.noise_scheduler.num_train_timesteps"),
    (("network", "controlnet_def", "num_res_blocks"), [1, 2, 3, 4, 5], "network.controlnet_def.num_res_blocks"),
    (("network", "autoencoder_def"), "vae", "network.autoencoder_def"),
    (("network", "autoencoder_def", "norm_eps"), "tiny", "network.autoencoder_def.norm_eps"),
])
def test_a_wrong_value_in_a_network_block_is_one_line(tiny_model, mask_file, tmp_path, path, value, field):
    spec, weights = tiny_model
    document = json.loads(spec.read_text())
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = copy.deepcopy(value)
    bad = tmp_path / "bad-spec.json"
    bad.write_text(json.dumps(document))
    out = tmp_path / "out"
    assert_one_line_error(generate(bad, mask_file, out, "--weights-dir", str(weights)), 2,
                          f"--model: '{bad}' field '{field}'")
    assert_nothing_written(out)


@pytest.mark.parametrize("scale_factor", ["x", [0.8, 0.9], True])
def test_a_scale_factor_that_is_not_a_number_is_one_line(tiny_model, mask_file, tmp_path, scale_factor):
    spec, weights = own_copy(tiny_model, tmp_path)
    checkpoint = torch.load(weights / UNET, map_location="cpu", weights_only=True)
    checkpoint["scale_factor"] = scale_factor
    torch.save(checkpoint, weights / UNET)
    out = tmp_path / "out"
    assert_one_line_error(generate(spec, mask_file, out, "--weights-dir", str(weights)), 1,
                          f"weights: {weights / UNET} has a 'scale_factor' of", "not one number")
    assert_nothing_written(out)
