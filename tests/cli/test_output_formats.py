"""`maisi generate --format nifti|nii|nrrd|dicom` and `maisi convert RUN_DIR --format …` (issue 23, item 1): the same
pair in each format, the sidecar listing every file written, and a converted folder equal byte for byte to a run
written in that format directly."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.outputs import output_sha256
from tests.cli.test_errors import assert_one_line_error
from tests.cli.test_generate import generate, report_of

runner = CliRunner()


def files_of(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name → sha256), sidecars and the run record aside."""
    return {str(p.relative_to(folder)): output_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".json" and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def nifti_run(tiny_model, tmp_path_factory) -> Path:
    from tests.helpers import write_mask

    root = tmp_path_factory.mktemp("formats")
    mask = write_mask(root / "mask.nii.gz", (32, 32, 32), (2.0, 2.0, 2.0))
    out = root / "nifti"
    report_of(generate(tiny_model, mask, out, "--steps", "2", "--seed", "5"))
    return out


def test_a_nifti_run_lists_its_files_and_writes_the_colour_tables(nifti_run):
    sidecar = json.loads((nifti_run / "sample_0000.json").read_text())
    assert set(sidecar["files_written"]) == {"sample_0000_image.nii.gz", "sample_0000_label.nii.gz", "maisi_labels.ctbl",
                                     "maisi_labels_itksnap.txt"}
    for name, sha in sidecar["files_written"].items():
        assert output_sha256(nifti_run / name) == sha
    assert "format" not in sidecar  # a NIfTI run's sidecar keeps its earlier form
    assert sidecar["files"] == {"image": "sample_0000_image.nii.gz", "label": "sample_0000_label.nii.gz"}


@pytest.mark.parametrize("output_format", ["nii", "nrrd"])
def test_each_format_holds_the_same_pair(tiny_model, nifti_run, tmp_path, output_format):
    out = tmp_path / output_format
    report_of(generate(tiny_model, nifti_run.parent / "mask.nii.gz", out, "--steps", "2", "--seed", "5", "--format",
                       output_format))
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["format"] == output_format
    assert all(output_sha256(out / name) == sha for name, sha in sidecar["files_written"].items())
    image = np.asarray(nib.load(nifti_run / "sample_0000_image.nii.gz").dataobj)
    labels = np.asarray(nib.load(nifti_run / "sample_0000_label.nii.gz").dataobj)
    if output_format == "nii":
        np.testing.assert_array_equal(np.asarray(nib.load(out / "sample_0000_image.nii").dataobj), image)
        np.testing.assert_array_equal(np.asarray(nib.load(out / "sample_0000_label.nii").dataobj), labels)
    else:
        import nrrd

        np.testing.assert_array_equal(nrrd.read(str(out / "sample_0000_image.nrrd"))[0], image)
        np.testing.assert_array_equal(nrrd.read(str(out / "sample_0000_label.seg.nrrd"))[0], labels)
    again = generate(tiny_model, nifti_run.parent / "mask.nii.gz", out, "--steps", "2", "--seed", "5", "--format",
                     output_format)
    assert report_of(again)["skipped"] == [0]  # complete in its format: not made again


@pytest.mark.parametrize("output_format", ["nrrd", "dicom"])
def test_convert_writes_what_generate_writes_in_that_format(tiny_model, nifti_run, tmp_path, output_format):
    if output_format == "dicom":
        pytest.importorskip("highdicom", reason="the dicom extra is not installed")
    direct = tmp_path / "direct"
    report_of(generate(tiny_model, nifti_run.parent / "mask.nii.gz", direct, "--steps", "2", "--seed", "5",
                       "--format", output_format))
    converted = tmp_path / "converted"
    converted.mkdir()
    for path in nifti_run.iterdir():
        (converted / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(app, ["--json", "convert", str(converted), "--format", output_format])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["converted"] == ["sample_0000"]
    wanted = files_of(direct)
    got = {name: sha for name, sha in files_of(converted).items() if name in wanted}
    assert got == wanted  # the same bytes, DICOM UIDs included
    entry = json.loads((converted / "sample_0000.json").read_text())["converted"][output_format]
    assert all(output_sha256(converted / name) == sha for name, sha in entry["files_written"].items())
    second = runner.invoke(app, ["--json", "convert", str(converted), "--format", output_format])
    assert json.loads(second.stdout)["skipped"] == ["sample_0000"]


def test_convert_refuses_a_changed_file_and_a_bad_format(nifti_run, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in nifti_run.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    (changed / "sample_0000_label.nii.gz").write_bytes(b"not the label")
    result = runner.invoke(app, ["convert", str(changed), "--format", "nii"])
    assert result.exit_code == 1 and "sample_0000_label.nii.gz is missing or does not match" in result.stderr
    assert not (changed / "sample_0000_image.nii").exists()
    assert_one_line_error(runner.invoke(app, ["convert", str(changed), "--format", "tiff"]), 2,
                          "--format: 'tiff' is not an output format")


def test_the_recorded_digest_of_a_series_is_what_reading_it_back_gives(tiny_model, nifti_run, tmp_path):
    """The sidecar's files_sha256 is taken from what the writers returned, not read back: for a DICOM series folder it
    must still equal the digest a later completeness check computes from the files."""
    pytest.importorskip("highdicom", reason="the dicom extra is not installed")
    out = tmp_path / "dicom"
    report_of(generate(tiny_model, nifti_run.parent / "mask.nii.gz", out, "--steps", "2", "--seed", "5", "--format",
                       "dicom"))
    recorded = json.loads((out / "sample_0000.json").read_text())["files_sha256"]
    assert recorded == {"image": output_sha256(out / "sample_0000_image"),
                        "label": output_sha256(out / "sample_0000_label.dcm")}
    assert (out / "sample_0000_image").is_dir() and recorded["image"] is not None
