"""`maisi data phantoms`: files, datalist, resume, determinism, `maisi qc` on the result, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app

runner = CliRunner()
SMALL = ["--size", "48", "--spacing", "8"]  # the whole 384 mm phantom, coarsely


def phantoms(out: Path, *args: str):
    return runner.invoke(app, ["--json", "data", "phantoms", "--out", str(out), *SMALL, *args])


def nifti_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_writes_pairs_and_a_datalist(tmp_path):
    out = tmp_path / "phantoms"
    result = phantoms(out, "--num", "3", "--seed", "5")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] == [0, 1, 2] and report["skipped"] == [] and report["phantoms"] == 3
    assert report["size"] == [48, 48, 48] and report["spacing"] == [8.0, 8.0, 8.0] and report["seed"] == 5
    assert "phantoms 3/3" in result.stderr  # progress on stderr, off a TTY one line per stage
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json"] + [
        f"phantom_{k:04d}_{kind}.nii.gz" for k in range(3) for kind in ("image", "label")]

    expected_affine = np.diag([8.0, 8.0, 8.0, 1.0])
    expected_affine[:3, 3] = -188.0  # centred: voxel centres at (i - 23.5) * 8 mm
    for k in range(3):
        image = nib.load(out / f"phantom_{k:04d}_image.nii.gz")
        label = nib.load(out / f"phantom_{k:04d}_label.nii.gz")
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape == (48, 48, 48)
        assert np.allclose(image.affine, expected_affine) and np.allclose(label.affine, expected_affine)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        labels = np.asarray(label.dataobj)
        assert {1, 3, 4, 5, 14, 28, 32, 200} <= set(np.unique(labels).tolist())

    datalist = json.loads((out / "datalist.json").read_text())
    assert list(datalist) == ["training"]
    entries = datalist["training"]
    assert [e["fold"] for e in entries] == [0, 1, 2]
    for k, entry in enumerate(entries):
        assert set(entry) == {"image", "label", "fold", "spacing", "dim", "top_region_index", "bottom_region_index"}
        assert entry["image"] == f"phantom_{k:04d}_image.nii.gz" and entry["label"] == f"phantom_{k:04d}_label.nii.gz"
        assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()  # relative to the folder
        assert entry["spacing"] == [8.0, 8.0, 8.0] and entry["dim"] == [48, 48, 48]
        assert entry["top_region_index"] == [0, 1, 0, 0] and entry["bottom_region_index"] == [0, 0, 1, 0]


def test_folds_cycle_through_five(tmp_path):
    result = runner.invoke(app, ["--quiet", "data", "phantoms", "--out", str(tmp_path), "--num", "7", "--size", "16",
                                 "--spacing", "24"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # --quiet: no summary, no progress
    entries = json.loads((tmp_path / "datalist.json").read_text())["training"]
    assert [e["fold"] for e in entries] == [0, 1, 2, 3, 4, 0, 1]


def test_summary_line_without_json(tmp_path):
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path), "--num", "2", "--size", "16x16x24",
                                 "--spacing", "24x24x16"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("2 phantom(s) of 16x16x24 at 24x24x16 mm")
    assert "2 written, 0 already there" in result.stdout
    assert nib.load(tmp_path / "phantom_0001_image.nii.gz").header.get_zooms() == (24.0, 24.0, 16.0)


def test_default_spacing_shows_the_whole_phantom(tmp_path):
    result = runner.invoke(app, ["--json", "data", "phantoms", "--out", str(tmp_path), "--num", "1", "--size", "32"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["spacing"] == [12.0, 12.0, 12.0]


def test_rerun_skips_complete_phantoms_and_equals_one_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert phantoms(a, "--num", "2", "--seed", "3").exit_code == 0
    first = {p.name: p.stat().st_mtime_ns for p in a.glob("*.nii.gz")}
    grown = phantoms(a, "--num", "4", "--seed", "3")
    assert grown.exit_code == 0, grown.stderr
    assert json.loads(grown.stdout)["skipped"] == [0, 1] and json.loads(grown.stdout)["written"] == [2, 3]
    assert {n: (a / n).stat().st_mtime_ns for n in first} == first  # untouched
    assert len(json.loads((a / "datalist.json").read_text())["training"]) == 4

    whole = phantoms(b, "--num", "4", "--seed", "3")
    assert whole.exit_code == 0, whole.stderr
    assert nifti_files(a) == nifti_files(b)  # byte for byte, datalist included

    # An incomplete phantom (label missing) is made again; a shorter --num lists only the first ones.
    (a / "phantom_0001_label.nii.gz").unlink()
    again = phantoms(a, "--num", "4", "--seed", "3")
    assert json.loads(again.stdout)["written"] == [1]
    assert nifti_files(a) == nifti_files(b)
    fewer = phantoms(a, "--num", "2", "--seed", "3")
    assert json.loads(fewer.stdout)["skipped"] == [0, 1]
    assert len(json.loads((a / "datalist.json").read_text())["training"]) == 2

    other = tmp_path / "other"
    assert phantoms(other, "--num", "1", "--seed", "4").exit_code == 0
    assert (other / "phantom_0000_image.nii.gz").read_bytes() != (b / "phantom_0000_image.nii.gz").read_bytes()


def test_tumours_flag(tmp_path):
    result = phantoms(tmp_path, "--num", "1", "--tumours")
    assert result.exit_code == 0 and json.loads(result.stdout)["tumours"] is True
    labels = np.asarray(nib.load(tmp_path / "phantom_0000_label.nii.gz").dataobj)
    assert {23, 26} <= set(np.unique(labels).tolist())


def test_maisi_qc_passes_on_a_written_phantom(tmp_path):
    out = tmp_path / "p"
    assert runner.invoke(app, ["--quiet", "data", "phantoms", "--out", str(out), "--num", "1", "--size", "64",
                               "--spacing", "4", "--seed", "9"]).exit_code == 0
    result = runner.invoke(app, ["qc", str(out / "phantom_0000_image.nii.gz"), str(out / "phantom_0000_label.nii.gz"),
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert {o["organ"] for o in report["organs"] if o["verdict"] == "pass"} == {
        "liver", "spleen", "pancreas", "kidney", "lung", "bone"}


@pytest.mark.parametrize("args, message", [
    (["--num", "0"], "--num"),
    (["--num", "-2"], "--num"),
    (["--size", "0"], "--size"),
    (["--size", "64x64"], "--size"),
    (["--size", "big"], "--size"),
    (["--spacing", "0"], "--spacing"),
    (["--spacing", "-1.5"], "--spacing"),
    (["--spacing", "1x1"], "--spacing"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_input_is_a_usage_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["data", "phantoms", "--out", str(out), "--size", "16", *args])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith(f"Error: {message}") and result.stderr.strip().count("\n") == 0
    assert not out.exists()


def test_unwritable_out_is_a_runtime_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["data", "phantoms", "--out", str(blocker / "sub"), "--size", "16", "--num", "1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --out") and result.stderr.strip().count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    missing_out = runner.invoke(app, ["data", "phantoms", "--size", "16"])
    assert missing_out.exit_code == 2


def test_a_grid_too_big_for_memory_is_one_line(tmp_path, monkeypatch):
    from maisi_cli.engine import phantoms as engine

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(engine, "make_phantom", out_of_memory)
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path), "--size", "4096", "--num", "1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --size: a 4096x4096x4096 phantom does not fit in memory")
    assert list(tmp_path.iterdir()) == []


def test_phantoms_on_another_grid_are_not_mixed_in(tmp_path):
    assert phantoms(tmp_path, "--num", "1").exit_code == 0
    before = nifti_files(tmp_path)
    result = runner.invoke(app, ["data", "phantoms", "--out", str(tmp_path), "--num", "2", "--size", "32"])
    assert result.exit_code == 1
    assert "exists on a 48x48x48 grid at 8x8x8 mm" in result.stderr and "32x32x32" in result.stderr
    assert nifti_files(tmp_path) == before  # nothing written, datalist unchanged


def test_phantoms_run_without_torch(tmp_path):
    """The command (not only its --help) stays clear of torch and MONAI."""
    code = (
        "import sys\n"
        f"sys.argv = ['maisi', '--quiet', 'data', 'phantoms', '--out', {str(tmp_path)!r}, '--num', '1', "
        "'--size', '16']\n"
        "from maisi_cli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'monai') if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.rstrip().endswith("HEAVY="), done.stderr
    assert (tmp_path / "phantom_0000_label.nii.gz").is_file()
