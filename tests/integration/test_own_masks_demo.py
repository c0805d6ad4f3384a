"""Bring your own mask, end to end with the demo model (issue 22): a TotalSegmentator-style map of a phantom, as one
file or as TotalSegmentator's folder of per-class files, with `--mask-labels totalsegmentator --body-from CT`,
generates a pair that passes the quality check; without those options the run is refused with the fix; a mask
without --size/--spacing sets the grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from maisi_cli.engine.masks.body import BodyEnvelopeOptions
from maisi_cli.engine.masks.user import BodyEnvelope, prepare_user_mask, user_mask_from_path
from maisi_cli.label_schemes import label_scheme
from tests.cli.test_errors import assert_one_line_error

runner = CliRunner()
STEPS = "10"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def segmented_phantom(tmp_path_factory) -> dict:
    """A demo phantom's CT, and its label map as TotalSegmentator would write it: its ids, no body label; as one
    file and as a folder of one binary file per class (all 117 classes, most of them empty)."""
    root = tmp_path_factory.mktemp("segmented")
    made = runner.invoke(app, ["--quiet", "data", "phantoms", "--num", "1", "--size", "64", "--seed", "3", "--out",
                               str(root / "ph")])
    assert made.exit_code == 0, made.stderr
    image = nib.load(root / "ph" / "phantom_0000_image.nii.gz")
    maisi = np.asarray(nib.load(root / "ph" / "phantom_0000_label.nii.gz").dataobj)
    scheme = label_scheme("totalsegmentator")
    to_ts = np.zeros(256, dtype=np.uint8)
    for ts_id, maisi_id in scheme.mapping.items():
        if ts_id == 200:
            continue  # the body label the scheme passes through: TotalSegmentator writes none
        to_ts[maisi_id] = ts_id
    ts = to_ts[maisi]
    nib.save(nib.Nifti1Image(ts, image.affine), str(root / "ts.nii.gz"))
    folder = root / "ts_folder"
    folder.mkdir()
    for ts_id, name in scheme.class_names.items():
        nib.save(nib.Nifti1Image((ts == ts_id).astype(np.uint8), image.affine), str(folder / f"{name}.nii.gz"))
    organs = np.where(to_ts[maisi] > 0, maisi, 0)  # what the map can carry back: the organs TotalSegmentator has
    return {"ct": root / "ph" / "phantom_0000_image.nii.gz", "file": root / "ts.nii.gz", "folder": folder,
            "organs": organs, "body": maisi > 0}


def generate(mask: Path, out: Path, *extra: str, json_output: bool = True):
    return runner.invoke(app, ["--json"] * json_output + ["generate", "--model", "demo", "--mask", str(mask), "--out", str(out),
                               "--steps", STEPS, *extra])


def test_a_totalsegmentator_map_is_refused_with_the_fix_until_both_options_are_given(segmented_phantom, tmp_path):
    out = tmp_path / "out"
    refused = generate(segmented_phantom["file"], out, json_output=False)
    assert_one_line_error(refused, 2, "--mask-labels totalsegmentator")
    no_body = generate(segmented_phantom["file"], out, "--mask-labels", "totalsegmentator", json_output=False)
    assert_one_line_error(no_body, 2, "--body-from CT.nii.gz")
    assert not out.exists() or not any(out.iterdir())


def test_a_totalsegmentator_map_with_its_ct_generates_a_pair_that_passes_qc(segmented_phantom, tmp_path):
    out = tmp_path / "out"
    result = generate(segmented_phantom["file"], out, "--mask-labels", "totalsegmentator", "--body-from",
                      str(segmented_phantom["ct"]))
    assert result.exit_code == 0, result.stderr
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    organs = segmented_phantom["organs"]
    np.testing.assert_array_equal(np.where(labels == 200, 0, labels), organs)  # each organ in its MAISI id
    assert dice(labels > 0, segmented_phantom["body"]) >= 0.98  # the body envelope found the phantom's body
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["qc"]["passed"] is True
    assert sidecar["mask_source"]["labels"]["scheme"] == "totalsegmentator"
    assert sidecar["mask_source"]["body"]["method"] == "ct"
    assert sidecar["mask_source"]["body"]["options"]["hu_threshold"] == -800.0


def test_the_folder_of_per_class_files_gives_the_same_condition_as_the_file(segmented_phantom):
    body = BodyEnvelope("ct", segmented_phantom["ct"], BodyEnvelopeOptions())
    scheme = label_scheme("totalsegmentator")
    prepared = {form: prepare_user_mask(user_mask_from_path(segmented_phantom[form], scheme), scheme, body, (64, 64, 64),
                                        (6.0, 6.0, 6.0), require_body=True) for form in ("file", "folder")}
    np.testing.assert_array_equal(prepared["folder"].mask.labels, prepared["file"].mask.labels)
    np.testing.assert_array_equal(prepared["folder"].mask.affine, prepared["file"].mask.affine)
    planned = runner.invoke(app, ["--json", "generate", "--model", "demo", "--mask", str(segmented_phantom["folder"]),
                                  "--mask-labels", "totalsegmentator", "--body-from", str(segmented_phantom["ct"]),
                                  "--dry-run"])
    assert planned.exit_code == 0, planned.stderr
    assert json.loads(planned.stdout)["plan"]["mask"]["path"] == str(segmented_phantom["folder"])


def demo_plan_for_phantom_mask(folder: Path, size: str, spacing: str) -> dict:
    """The demo's `generate --dry-run` plan for a phantom's label map of that grid, given no --size/--spacing."""
    made = runner.invoke(app, ["--quiet", "data", "phantoms", "--num", "1", "--size", size, "--spacing", spacing,
                               "--out", str(folder / "ph")])
    assert made.exit_code == 0, made.stderr
    mask = folder / "ph" / "phantom_0000_label.nii.gz"
    result = runner.invoke(app, ["--json", "generate", "--model", "demo", "--mask", str(mask), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["plan"]


def test_the_mask_sets_the_grid_when_no_size_is_given(tmp_path):
    plan = demo_plan_for_phantom_mask(tmp_path, "48x48x32", "8")
    assert (plan["size"], plan["spacing"]) == ([48, 48, 32], [8.0, 8.0, 8.0])
    assert plan["warnings"] == []


def test_a_grid_the_model_does_not_take_gives_the_nearest_with_a_warning(tmp_path):
    plan = demo_plan_for_phantom_mask(tmp_path, "40", "9")
    assert all(s % 16 == 0 for s in plan["size"])  # the demo's networks take multiples of 16
    assert plan["size"][0] * plan["spacing"][0] == pytest.approx(360.0)  # its 360 mm field of view is kept
    note = next(w for w in plan["warnings"] if "does not take" in w)
    assert "40x40x40 at 9x9x9 mm" in note and f"{plan['size'][0]}x" in note
