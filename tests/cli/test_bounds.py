"""Bounded before any allocation (issue 20): a spacing outside [0.01, 100] mm, a mask whose affine cannot place its
voxels, and a request the host memory cannot hold are each refused in one line, under --dry-run too, before the
mask's voxels are read or resampled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.request import GenerateRequest
from maisi_cli.errors import UsageError
from tests.cli.test_errors import assert_nothing_written, assert_one_line_error
from tests.helpers import phantom_labels

runner = CliRunner()


def dry_run(tmp_path: Path, *args: str, quiet: bool = True):
    """`maisi generate --model demo --dry-run` (the bundled 64³ model) with `args`."""
    return runner.invoke(app, [*(["--quiet"] if quiet else []), "generate", "--model", "demo", "--out",
                               str(tmp_path / "out"), "--dry-run", *args])


def write_mask_with_rows(path: Path, rows: list[list[float]]) -> Path:
    """A 32³ label map whose sform rows are `rows` (qform off, so the sform is the affine nibabel reads)."""
    header = nib.Nifti1Header()
    header.set_data_shape((32, 32, 32))
    header.set_data_dtype(np.uint8)
    header["sform_code"] = 1
    header["qform_code"] = 0
    header["srow_x"], header["srow_y"], header["srow_z"] = rows
    nib.save(nib.Nifti1Image(phantom_labels((32, 32, 32)), None, header), str(path))
    return path


@pytest.mark.parametrize("spacing", ["inf", "1e-300", "0.001", "1000", "nan", "1x1x-inf"])
def test_a_spacing_outside_the_range_is_refused(tmp_path, spacing):
    """On main `inf` and `1e-300` planned (and ran to the end), `0.001` asked for 10^17 bytes."""
    assert_one_line_error(dry_run(tmp_path, "--spacing", spacing), 2, "--spacing", f"'{spacing}'",
                          "finite numbers in mm within [0.01, 100]")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("spacing", [(math.inf, 1.0, 1.0), (1e-300, 1.0, 1.0), (1.0, 1.0, 101.0)])
def test_a_request_built_in_code_is_bounded_the_same(spacing):
    with pytest.raises(UsageError, match=r"--spacing: .* within \[0.01, 100\]"):
        GenerateRequest(model="demo", spacing=spacing)


@pytest.mark.parametrize(("rows", "fragment"), [
    ([[2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]], "degenerate affine (voxel spacing 2x0x2 mm)"),  # a zero column
    ([[2, 0, 0, 0], [0, math.nan, 0, 0], [0, 0, 2, 0]], "degenerate affine (non-finite entries)"),
    ([[2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]], "degenerate affine (a singular 3x3 part"),  # i and j both along x
    ([[2, 0, 0, 0], [0, 0.001, 0, 0], [0, 0, 2, 0]], "voxel spacing 2x0.001x2 mm in its header, outside [0.01, 100]"),
])
def test_a_mask_whose_affine_cannot_place_its_voxels_is_one_line(tmp_path, rows, fragment):
    mask = write_mask_with_rows(tmp_path / "bad.nii.gz", rows)
    assert_one_line_error(dry_run(tmp_path, "--mask", str(mask)), 1, "--mask", str(mask), fragment)
    assert_nothing_written(tmp_path / "out")


def test_a_mask_too_large_for_memory_is_refused_from_its_header(tmp_path):
    """A header claiming 30000³ voxels with no data behind it: refused on its size alone, so the voxels were never
    read (reading them would fail as 'not a readable NIfTI file', as it did on main)."""
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    mask = tmp_path / "huge.nii"
    mask.write_bytes(header.binaryblock + b"\0" * 4)
    result = dry_run(tmp_path, "--mask", str(mask))
    assert_one_line_error(result, 2, "--mask", str(mask), "30000x30000x30000, uint8", "GiB of host memory but",
                          "GiB is available", "crop or downsample the mask")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("with_mask", [True, False])
def test_an_output_grid_too_large_for_memory_is_refused_under_dry_run(tmp_path, mask_file, with_mask):
    """4096³ (lifted by --allow-any-size) needs terabytes: refused before the mask is fitted (main tried to allocate
    it) or the database searched."""
    args = ["--mask", str(mask_file)] if with_mask else []
    result = dry_run(tmp_path, "--size", "4096", "--allow-any-size", *args)
    assert_one_line_error(result, 2, "--size:", "4096x4096x4096", "GiB of host memory but", "smaller --size")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_spacing_whose_mask_resampling_cannot_fit_is_refused(tmp_path, mask_file, with_mask):
    """0.01 mm is a valid spacing, but resampling a 2 mm (--mask) or 6 mm (the demo's database) mask to it needs
    terabytes: refused naming --spacing before MONAI's Spacing allocates its grid (main: a traceback)."""
    args = ["--mask", str(mask_file)] if with_mask else []
    result = dry_run(tmp_path, "--spacing", "0.01", *args)
    assert_one_line_error(result, 2, "--spacing:", "(mask resampling)", "GiB of host memory but", "larger --spacing")
    assert_nothing_written(tmp_path / "out")


def test_the_check_reads_the_available_memory_and_can_be_skipped(tmp_path, mask_file, monkeypatch):
    """With 64 MiB free, even the demo's 64³ plan (about 0.4 GiB on the CPU) is refused, naming both figures;
    MAISI_SKIP_MEMORY_CHECK=1 plans it all the same, and the plan shows the host estimate stage by stage."""
    from maisi_cli.engine import memory

    monkeypatch.setattr(memory, "available_host_memory", lambda: 64 * 1024**2)
    result = dry_run(tmp_path, "--mask", str(mask_file), "--device", "cpu", "--size", "64")  # not the mask's 32³
    assert_one_line_error(result, 2, "--size: 64x64x64 voxels", "GiB of host memory but 0.1 GiB is available",
                          "MAISI_SKIP_MEMORY_CHECK=1")

    monkeypatch.setenv("MAISI_SKIP_MEMORY_CHECK", "1")
    result = dry_run(tmp_path, "--mask", str(mask_file), "--device", "cpu", "--size", "64", "--json")
    assert result.exit_code == 0, result.stderr
    host = json.loads(result.stdout)["plan"]["host_memory"]
    assert {"mask", "condition", "diffusion", "decode", "output", "write"} == set(host["stages_gib"])
    assert {"mask as read", "mask as uint8", "mask pad/crop"} <= set(host["stages_gib"]["mask"])
    assert host["peak_stage"] in host["stages_gib"] and 0.3 < host["peak_gib"] < 2
    table = dry_run(tmp_path, "--mask", str(mask_file), "--device", "cpu", "--size", "64", quiet=False)
    assert table.exit_code == 0 and "host memory" in table.stdout and "predicted peak" in table.stdout


def test_fitting_any_mask_refuses_a_resampling_that_cannot_fit():
    """fit_to_grid serves every mask source (the generated masks too, at their native 1.5 mm): resampling a 16³ mask
    at 6 mm to 0.01 mm (a 9001³ grid) is refused before MONAI's Spacing asks for its terabytes."""
    from maisi_cli.engine.masks.user import fit_to_grid

    labels = np.full((16, 16, 16), 200, dtype=np.uint8)
    with pytest.raises(UsageError, match=r"--spacing: resampling the mask \(16x16x16 at 6x6x6 mm\) to 0.01x0.01x0.01 "
                                         r"mm needs about .* GiB of host memory but"):
        fit_to_grid(labels, np.diag([6.0, 6.0, 6.0, 1.0]), (64, 64, 64), (0.01, 0.01, 0.01))
