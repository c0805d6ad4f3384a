"""`maisi generate` through the CLI runner on a tiny model saved in the released layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.helpers import phantom_labels, write_mask

runner = CliRunner()


def generate(tiny_model: tuple[Path, Path], mask: Path, out: Path, *extra: str, json_output: bool = True):
    # --no-qc: these tests are not about the quality check (tests/cli/test_qc.py is); the tiny random networks
    # fail it at random, and retries would only slow them down.
    spec, weights = tiny_model
    args = ["--json"] if json_output else []
    args += ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask", str(mask),
             "--out", str(out), "--no-qc", *extra]
    return runner.invoke(app, args)


def report_of(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_writes_image_label_and_sidecar(tiny_model, mask_file, tmp_path):
    """One pair: requested shape and spacing, int16 HU in [-1000, 1000], air outside the body, uint8 labels,
    one shared affine, and a sidecar that records the weights' sha256."""
    out = tmp_path / "out"
    report = report_of(generate(tiny_model, mask_file, out, "--seed", "7"))
    assert report["written"] == [0]

    image = nib.load(out / "sample_0000_image.nii.gz")
    label = nib.load(out / "sample_0000_label.nii.gz")
    assert image.shape == label.shape == (32, 32, 32)
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.header.get_zooms(), (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(image.affine, label.affine)

    hu = np.asarray(image.dataobj)
    labels = np.asarray(label.dataobj)
    np.testing.assert_array_equal(labels, phantom_labels((32, 32, 32)))
    assert hu.min() >= -1000 and hu.max() <= 1000
    assert np.all(hu[labels == 0] == -1000)
    assert hu[labels > 0].std() > 0  # the body holds generated intensities, not a constant

    sidecar = json.loads((out / "sample_0000.json").read_text())
    spec, weights = tiny_model
    for component, entry in sidecar["weights"].items():
        expected = hashlib.sha256((weights / entry["file"]).read_bytes()).hexdigest()
        assert entry["sha256"] == expected, component
    assert set(sidecar["weights"]) == {"autoencoder", "diffusion_unet", "controlnet"}
    assert sidecar["seed"] == 7 and sidecar["sample_index"] == 0
    assert sidecar["sample_seed"] == report["samples"][0]["seed"]
    assert sidecar["size"] == [32, 32, 32] and sidecar["spacing"] == [2.0, 2.0, 2.0]
    assert sidecar["mask_source"]["sha256"] == hashlib.sha256(mask_file.read_bytes()).hexdigest()
    from maisi_cli.engine.runtime import cpu_computes_bf16

    expected_precision = "bf16" if cpu_computes_bf16() else "fp32"  # the cpu profile's bf16 needs bf16 arithmetic
    assert sidecar["device"] == "cpu" and sidecar["precision"] == expected_precision
    assert sidecar["profile"]["name"] == "cpu"
    assert sidecar["decode"]["mode"] == "whole" and sidecar["timings"]["denoise_s"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny_model, mask_file, tmp_path):
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    report_of(generate(tiny_model, mask_file, first, "--seed", "3"))
    report_of(generate(tiny_model, mask_file, second, "--seed", "3"))
    report_of(generate(tiny_model, mask_file, third, "--seed", "4"))
    for name in ("sample_0000_image.nii.gz", "sample_0000_label.nii.gz"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "sample_0000_image.nii.gz").read_bytes() != (third / "sample_0000_image.nii.gz").read_bytes()


def test_shards_together_equal_one_run(tiny_model, mask_file, tmp_path):
    """--num-samples 3 in one run gives the same files as shards 0/2 and 1/2 run apart."""
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert report_of(generate(tiny_model, mask_file, whole, "-n", "3", "--seed", "11"))["written"] == [0, 1, 2]
    assert report_of(generate(tiny_model, mask_file, sharded, "-n", "3", "--seed", "11", "--shard", "0/2"))["written"] == [0, 2]
    assert report_of(generate(tiny_model, mask_file, sharded, "-n", "3", "--seed", "11", "--shard", "1/2"))["written"] == [1]
    for k in range(3):
        for suffix in ("_image.nii.gz", "_label.nii.gz"):
            name = f"sample_{k:04d}{suffix}"
            assert (whole / name).read_bytes() == (sharded / name).read_bytes(), name


def test_slurm_array_variables_pick_the_shard(tiny_model, mask_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    out = tmp_path / "out"
    assert report_of(generate(tiny_model, mask_file, out, "-n", "4"))["written"] == [1, 3]
    # --shard beats the environment
    assert report_of(generate(tiny_model, mask_file, out, "-n", "4", "--shard", "0/2"))["written"] == [0, 2]


def test_rerun_writes_only_missing_samples(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    report_of(generate(tiny_model, mask_file, out, "-n", "3"))
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    removed = out / "sample_0001_image.nii.gz"
    original = removed.read_bytes()
    removed.unlink()

    report = report_of(generate(tiny_model, mask_file, out, "-n", "3"))
    assert report["written"] == [1] and report["skipped"] == [0, 2]
    assert removed.read_bytes() == original
    for name in ("sample_0000_image.nii.gz", "sample_0002_label.nii.gz", "sample_0000.json"):
        assert (out / name).stat().st_mtime_ns == kept[name][0]

    report = report_of(generate(tiny_model, mask_file, out, "-n", "3", "--overwrite"))
    assert report["written"] == [0, 1, 2]


def test_mask_at_another_grid_is_resampled_with_a_warning(tiny_model, tmp_path):
    mask = write_mask(tmp_path / "coarse.nii.gz", (16, 16, 24), (4.0, 4.0, 3.0))
    out = tmp_path / "out"
    result = generate(tiny_model, mask, out, "--size", "32x32x32", "--spacing", "2", json_output=False)
    assert result.exit_code == 0, result.stderr
    assert "resampled" in result.stderr
    image = nib.load(out / "sample_0000_image.nii.gz")
    assert image.shape == (32, 32, 32)
    np.testing.assert_allclose(image.header.get_zooms(), (2.0, 2.0, 2.0), rtol=1e-5)
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    assert {0, 1, 3, 200} <= set(np.unique(labels).tolist())


def test_label_mode_requested_keeps_only_named_anatomies(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    report_of(generate(tiny_model, mask_file, out, "--anatomy", "liver", "--anatomy", "Spleen",
                       "--label-mode", "requested"))
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 3}
    hu = np.asarray(nib.load(out / "sample_0000_image.nii.gz").dataobj)
    # The image is still cropped with the full mask: body voxels outside the kept labels hold tissue.
    assert (hu[phantom_labels((32, 32, 32)) == 200] > -1000).any()


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, mask_file, tmp_path):
    out = tmp_path / "out"
    document = report_of(generate(tiny_model, mask_file, out, "--dry-run", "-n", "2"))
    plan = document["plan"]
    assert document["dry_run"] is True
    assert plan["profile"] == "cpu" and plan["device"] == "cpu" and plan["steps"] == 4
    assert plan["decode"]["mode"] == "whole" and plan["latent_shape"] == [4, 8, 8, 8]
    assert [s["files"][0] for s in plan["samples"]] == ["sample_0000_image.nii.gz", "sample_0001_image.nii.gz"]
    memory = plan["memory"]  # the planner's GPU estimate; the cpu profile has no GPU budget to compare with
    assert 0 < memory["diffusion_gib"] and 0 < memory["decode_gib"] and memory["fits"] is None
    assert memory["peak_gib"] == max(memory["diffusion_gib"], memory["decode_gib"])
    assert not out.exists()

    table = generate(tiny_model, mask_file, out, "--dry-run", json_output=False)
    assert table.exit_code == 0 and "decode" in table.stdout and "predicted GPU peak" in table.stdout
    assert not out.exists()


def test_profile_table_drives_the_decode_plan(tiny_model, mask_file, tmp_path):
    """A profile TOML given by path is used: its fallback ROI sends this size to a sliding-window decode."""
    profile = tmp_path / "small.toml"
    profile.write_text('name = "small"\ndevice = "cpu"\nprecision = "fp32"\n'
                       "[fallback]\nmax_roi_latent_voxels = 4096\noverlap = 0.5\ntp_splits = 1\n")
    document = report_of(generate(tiny_model, mask_file, tmp_path / "o", "--profile", str(profile),
                                  "--size", "96x96x96", "--spacing", "1", "--dry-run"))
    assert document["plan"]["decode"]["mode"] == "sliding" and document["plan"]["decode"]["roi"] == [16, 16, 16]
    assert document["plan"]["profile"] == "small" and document["plan"]["decode"]["windows"] == 8


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_on_cpu_runs(tiny_model, mask_file, tmp_path, precision):
    out = tmp_path / "out"
    report_of(generate(tiny_model, mask_file, out, "--precision", precision))
    assert json.loads((out / "sample_0000.json").read_text())["precision"] == precision


def test_ddpm_model_runs_with_body_region_inputs(tmp_path, mask_file):
    """A DDPM model (ddpm-ct's layout: region inputs, no modality) generates; regions come from the mask."""
    from tests.helpers import write_tiny_model

    spec, weights = write_tiny_model(tmp_path / "tiny-ddpm", scheduler="ddpm")
    out = tmp_path / "out"
    result = generate((spec, weights), mask_file, out, "--steps", "2", json_output=False)
    assert result.exit_code == 0, result.stderr
    assert "fewer than the 4" in result.stderr
    hu = np.asarray(nib.load(out / "sample_0000_image.nii.gz").dataobj)
    assert hu.dtype == np.int16 and hu[phantom_labels((32, 32, 32)) > 0].std() > 0

    no_landmark = np.zeros((32, 32, 32), dtype=np.uint8)
    no_landmark[4:28, 4:28, 4:28] = 200
    body_only = write_mask(tmp_path / "body.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0), labels=no_landmark)
    refused = generate((spec, weights), body_only, tmp_path / "out2")
    assert refused.exit_code == 1 and "body-region landmark" in refused.stderr
