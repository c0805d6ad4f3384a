"""`maisi data body MASK [--ct CT] --out FILE`: the body envelope as a command."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.phantoms import make_phantom

runner = CliRunner()
SIZE, SPACING = (48, 48, 48), (8.0, 8.0, 8.0)


def write_case(tmp_path):
    """A phantom's organs (its 200 removed) and its CT, as a segmenter's output beside its input."""
    phantom = make_phantom(SIZE, SPACING, 3)
    organs = np.where(phantom.labels == 200, 0, phantom.labels).astype(np.uint8)
    mask, ct = tmp_path / "organs.nii.gz", tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(organs, phantom.affine), str(mask))
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), str(ct))
    return phantom, organs, mask, ct


def test_body_from_the_ct_is_written_and_summarised(tmp_path):
    phantom, organs, mask, ct = write_case(tmp_path)
    out = tmp_path / "with_body.nii.gz"
    result = runner.invoke(app, ["--json", "data", "body", str(mask), "--ct", str(ct), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    written = nib.load(str(out))
    labels = np.asarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8 and np.allclose(written.affine, phantom.affine)
    assert np.array_equal(labels[organs > 0], organs[organs > 0])
    assert document["ok"] and document["method"] == "ct" and document["added"] == int((labels == 200).sum()) > 0
    truth, got = phantom.labels > 0, labels > 0
    assert 2 * (truth & got).sum() / (truth.sum() + got.sum()) >= 0.98

    again = runner.invoke(app, ["data", "body", str(mask), "--ct", str(ct), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    replaced = runner.invoke(app, ["data", "body", str(mask), "--ct", str(ct), "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0 and "body voxel(s) (200) added from the CT" in replaced.stdout


def test_label_only_method_warns_and_covers_the_labels(tmp_path):
    _, organs, mask, _ = write_case(tmp_path)
    out = tmp_path / "approx.nii"
    result = runner.invoke(app, ["data", "body", str(mask), "--out", str(out), "--margin-mm", "15"])
    assert result.exit_code == 0, result.stderr
    assert "Warning:" in result.stderr and "approximated" in result.stderr
    labels = np.asarray(nib.load(str(out)).dataobj)  # a plain .nii
    assert np.array_equal(labels[organs > 0], organs[organs > 0]) and (labels == 200).any()


def test_a_mask_with_its_body_is_kept_unless_replaced(tmp_path):
    phantom, _, _, ct = write_case(tmp_path)
    full = tmp_path / "full.nii.gz"
    nib.save(nib.Nifti1Image(phantom.labels, phantom.affine), str(full))
    kept = runner.invoke(app, ["--json", "data", "body", str(full), "--ct", str(ct), "--out", str(tmp_path / "k.nii.gz")])
    assert kept.exit_code == 0 and "already holds the body label 200" in kept.stderr
    assert json.loads(kept.stdout)["method"] == "kept" and json.loads(kept.stdout)["added"] == 0
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "k.nii.gz")).dataobj), phantom.labels)
    redone = runner.invoke(app, ["--json", "data", "body", str(full), "--ct", str(ct), "--out",
                                 str(tmp_path / "r.nii.gz"), "--replace-body"])
    assert redone.exit_code == 0 and json.loads(redone.stdout)["method"] == "ct"


def test_bad_options_exit_2_without_a_file(tmp_path):
    _, _, mask, ct = write_case(tmp_path)
    out = tmp_path / "never.nii.gz"
    cases = [
        (["--ct", str(ct), "--closing-kernel", "4"], "--closing-kernel"),
        (["--ct", str(ct), "--bed-kernel", "0"], "--bed-kernel"),
        (["--ct", str(ct), "--table-fraction", "0"], "--table-fraction"),
        (["--ct", str(ct), "--margin-mm", "10"], "--margin-mm"),
        (["--margin-mm", "-1"], "--margin-mm"),
        (["--ct", str(ct), "--hu-threshold", "air"], "--hu-threshold"),
        (["--bed-size", "3"], "--bed-size"),
    ]
    for extra, field in cases:
        result = runner.invoke(app, ["data", "body", str(mask), "--out", str(out), *extra])
        assert result.exit_code == 2, (extra, result.stderr)
        assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert runner.invoke(app, ["data", "body", str(mask)]).exit_code == 2  # --out is required
    bad_name = runner.invoke(app, ["data", "body", str(mask), "--out", str(tmp_path / "x.nrrd")])
    assert bad_name.exit_code == 2 and "--out" in bad_name.stderr
    assert list(tmp_path.glob("never*")) == [] and list(tmp_path.glob(".*partial")) == []


def test_a_ct_on_another_grid_is_refused_in_one_line(tmp_path):
    phantom, _, mask, _ = write_case(tmp_path)
    other = tmp_path / "other_ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image[:, :, :40], phantom.affine), str(other))
    out = tmp_path / "never.nii.gz"
    result = runner.invoke(app, ["data", "body", str(mask), "--ct", str(other), "--out", str(out)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--ct:" in result.stderr and "48x48x40" in result.stderr and "48x48x48" in result.stderr
    assert not out.exists()
    missing = runner.invoke(app, ["data", "body", str(tmp_path / "nope.nii.gz"), "--out", str(out)])
    assert missing.exit_code == 1 and "MASK" in missing.stderr and not out.exists()
