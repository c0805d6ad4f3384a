"""`--mask-labels`: label maps from TotalSegmentator (v2, task "total"), VISTA3D or a user's table become MAISI ids
before generation; `maisi labels --scheme` shows the mapping (issue 22, item 1 and part of 5)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from maisi_cli.cli.app import app
from tests.cli.test_errors import assert_one_line_error
from tests.cli.test_generate import generate, report_of
from tests.helpers import phantom_labels

runner = CliRunner()

# TotalSegmentator v2, task "total": class id → name, as published in wasserth/TotalSegmentator
# totalsegmentator/map_to_binary.py (class_map["total"]), written out here so the packaged table is checked against it.
TS_TOTAL = ("spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
            "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right "
            "lung_lower_lobe_right esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate "
            "kidney_cyst_left kidney_cyst_right sacrum vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 "
            "vertebrae_L2 vertebrae_L1 vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 "
            "vertebrae_T7 vertebrae_T6 vertebrae_T5 vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 "
            "vertebrae_C6 vertebrae_C5 vertebrae_C4 vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein "
            "brachiocephalic_trunk subclavian_artery_right subclavian_artery_left common_carotid_artery_right "
            "common_carotid_artery_left brachiocephalic_vein_left brachiocephalic_vein_right atrial_appendage_left "
            "superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right "
            "iliac_vena_left iliac_vena_right humerus_left humerus_right scapula_left scapula_right clavicula_left "
            "clavicula_right femur_left femur_right hip_left hip_right spinal_cord gluteus_maximus_left "
            "gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left "
            "gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain skull "
            + " ".join(f"rib_left_{i}" for i in range(1, 13)) + " " + " ".join(f"rib_right_{i}" for i in range(1, 13))
            + " sternum costal_cartilages").split()
TS_ID = {name: ident for ident, name in enumerate(TS_TOTAL, start=1)}
# The phantom's MAISI labels (tests/helpers.phantom_labels) and the TotalSegmentator class of each anatomy.
MAISI_TO_TS = {1: TS_ID["liver"], 3: TS_ID["spleen"], 28: TS_ID["lung_upper_lobe_left"],
               29: TS_ID["lung_lower_lobe_left"]}


def totalsegmentator_phantom(path, size=(32, 32, 32), spacing=2.0, extra: dict[int, int] | None = None):
    """The phantom in TotalSegmentator ids, the body (200) kept as the body envelope a later step adds."""
    maisi = phantom_labels(size)
    ts = np.where(maisi == 200, 200, 0).astype(np.uint8)
    for maisi_id, ts_id in {**MAISI_TO_TS, **(extra or {})}.items():
        ts[maisi == maisi_id] = ts_id
    nib.save(nib.Nifti1Image(ts, np.diag([spacing] * 3 + [1.0])), str(path))
    return maisi


def test_the_packaged_table_maps_every_class_of_the_published_map_to_the_same_anatomy():
    result = runner.invoke(app, ["--json", "labels", "--scheme", "totalsegmentator"])
    assert result.exit_code == 0, result.stderr
    classes = json.loads(result.stdout)["classes"]
    # the published classes, then the body label 200 that every segmenter's scheme passes through as itself
    assert [(c["id"], c["name"]) for c in classes] == [*enumerate(TS_TOTAL, start=1), (200, "body")]
    assert classes[-1]["maisi_id"] == 200
    by_name = {c["name"]: c for c in classes}
    assert all(c["maisi_id"] is not None for c in classes)  # v2 "total" has a MAISI counterpart for each class
    for ts_name, maisi_name in (("liver", "liver"), ("kidney_right", "right kidney"), ("urinary_bladder", "bladder"),
                                ("lung_middle_lobe_right", "right lung middle lobe"), ("rib_left_7", "left rib 7"),
                                ("vertebrae_L5", "vertebrae L5"), ("portal_vein_and_splenic_vein",
                                                                   "portal vein and splenic vein")):
        assert by_name[ts_name]["maisi_name"] == maisi_name
    assert (by_name["liver"]["id"], by_name["liver"]["maisi_id"]) == (5, 1)  # TS 5 is the liver, MAISI 5 a kidney
    shown = runner.invoke(app, ["labels", "--scheme", "totalsegmentator", "kidney_right"])
    assert "right kidney" in shown.stdout and "spleen" not in shown.stdout


def test_generate_converts_a_totalsegmentator_map_and_records_it(tiny_model, tmp_path):
    mask = tmp_path / "ts.nii.gz"
    expected = totalsegmentator_phantom(mask)
    out = tmp_path / "out"
    report = report_of(generate(tiny_model, mask, out, "--mask-labels", "totalsegmentator", "--steps", "2",
                                "--anatomy", "spleen"))
    assert report["written"] == [0]
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, expected)
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["mask_source"]["labels"] == {"scheme": "totalsegmentator", "unmapped": []}
    # another scheme for the same file is another run: refused in that folder
    again = generate(tiny_model, mask, out, "--steps", "2")
    assert again.exit_code == 2 and "mask source" in again.stderr


def test_a_table_of_ones_own_maps_names_and_ids_and_warns_about_classes_left_out(tiny_model, tmp_path):
    mask = tmp_path / "mine.nii.gz"
    expected = totalsegmentator_phantom(mask, extra={3: 77})  # the spleen (MAISI 3) written as class 77
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"5": "liver", "77": 3, "10": 28, "11": "left lung lower lobe", "200": 200,
                                 "3": None}))
    out = tmp_path / "out"
    result = generate(tiny_model, mask, out, "--mask-labels", str(table), "--steps", "2")
    report = report_of(result)
    assert report["written"] == [0] and "no MAISI label" not in result.stderr
    np.testing.assert_array_equal(np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj), expected)

    # class 5 left out of a second table: one warning naming it, recorded in the sidecar; it becomes background
    ts_liver_voxels = int((expected == 1).sum())
    table.write_text(json.dumps({"77": 3, "10": 28, "11": 29, "200": 200}))
    result = generate(tiny_model, mask, tmp_path / "out2", "--mask-labels", str(table), "--steps", "2")
    report_of(result)
    warning = [line for line in result.stderr.splitlines() if "no MAISI label" in line]
    assert len(warning) == 1 and f"5 class 5 ({ts_liver_voxels} voxels)" in warning[0]
    sidecar = json.loads((tmp_path / "out2" / "sample_0000.json").read_text())
    assert sidecar["mask_source"]["labels"]["unmapped"] == [{"id": 5, "name": "class 5", "voxels": ts_liver_voxels}]
    assert any("no MAISI label" in w for w in sidecar["warnings"])
    written = np.asarray(nib.load(tmp_path / "out2" / "sample_0000_label.nii.gz").dataobj)
    assert not (written == 1).any() and (written[expected == 1] == 0).all()


def test_bad_schemes_are_one_line_usage_errors(tiny_model, mask_file, tmp_path):
    unknown = generate(tiny_model, mask_file, tmp_path / "a", "--mask-labels", "nnunet", json_output=False)
    assert_one_line_error(unknown, 2, "--mask-labels: 'nnunet' is not a label scheme")
    table = tmp_path / "bad.json"
    table.write_text(json.dumps({"5": "not an organ"}))
    bad = generate(tiny_model, mask_file, tmp_path / "b", "--mask-labels", str(table), json_output=False)
    assert_one_line_error(bad, 2, "class 5 maps to 'not an organ', which is not a MAISI label")
    spec, weights = tiny_model
    no_mask = runner.invoke(app, ["generate", "--model", str(spec), "--weights-dir", str(weights), "--mask-labels",
                                  "totalsegmentator", "--out", str(tmp_path / "c")])
    assert_one_line_error(no_mask, 2, "--mask-labels: says how to read --mask")
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_anatomy_names_take_underscores_and_totalsegmentator_names(tiny_model, mask_file, tmp_path):
    from maisi_cli.engine.masks.generation import check_size_requests

    for query, expected in (("kidney_right", "right kidney"), ("hepatic_tumor", "hepatic tumor"),
                            ("Lung_Upper_Lobe_Left", "left lung upper lobe"), ("urinary_bladder", "bladder")):
        listed = json.loads(runner.invoke(app, ["--json", "labels", query]).stdout)["labels"]
        assert expected in [entry["name"] for entry in listed], (query, listed)
    found = generate(tiny_model, mask_file, tmp_path / "a", "--anatomy", "lung_upper_lobe_left", "--dry-run")
    assert found.exit_code == 0, found.stderr
    missing = generate(tiny_model, mask_file, tmp_path / "b", "--anatomy", "kidney_right", "--dry-run",
                       json_output=False)
    assert_one_line_error(missing, 1, "'kidney_right' (label 5) is not in the mask")
    assert check_size_requests([("Hepatic_Tumor", 0.5), ("liver", 0.2)]) == [("hepatic tumor", 0.5), ("liver", 0.2)]


def test_a_database_of_totalsegmentator_maps_lists_maisi_ids_and_generate_converts_them(tiny_model, tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    expected = totalsegmentator_phantom(folder / "a.nii.gz")
    bodiless = np.asarray(nib.load(folder / "a.nii.gz").dataobj).copy()
    bodiless[bodiless == 200] = 0
    nib.save(nib.Nifti1Image(bodiless, np.diag([2.0] * 3 + [1.0])), str(folder / "b.nii.gz"))
    indexed = runner.invoke(app, ["--json", "data", "masks", "index", str(folder), "--mask-labels",
                                  "totalsegmentator"])
    assert indexed.exit_code == 0, indexed.stderr
    summary = json.loads(indexed.stdout)
    assert summary["without_body"] == ["b.nii.gz"] and "maisi data body" in indexed.stderr
    entries = json.loads((folder / "candidate_masks.json").read_text())
    assert entries[0]["label_list"] == [1, 3, 28, 29, 200] and entries[0]["mask_labels"] == "totalsegmentator"
    spec, weights = tiny_model
    out = tmp_path / "out"
    result = runner.invoke(app, ["--json", "generate", "--model", str(spec), "--weights-dir", str(weights),
                                 "--mask-database", str(folder / "candidate_masks.json"), "--anatomy", "spleen",
                                 "--size", "32", "--spacing", "2", "--no-augment", "--no-qc", "--steps", "2",
                                 "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    labels = np.asarray(nib.load(out / "sample_0000_label.nii.gz").dataobj)
    assert set(np.unique(labels).tolist()) <= set(np.unique(expected).tolist())
    assert (labels == 3).any() and not (labels == 5).any()  # the spleen as MAISI 3; no TotalSegmentator id 5 left
