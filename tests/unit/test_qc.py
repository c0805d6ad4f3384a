"""The quality check (engine/qc.py): thresholds from the statistics file, organ medians, verdicts, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maisi_cli.engine.qc import NON_FINITE, ORGAN_LABELS, PACKAGED, check_quality, load_statistics, thresholds_from
from maisi_cli.errors import MaskError, StatisticsError

# reference-inference.md §12.2, effective thresholds (HU), with the lung label set fixed (28–32).
REFERENCE_TABLE = {
    "liver": (-21.60, 162.00),
    "spleen": (-43.13, 184.08),
    "pancreas": (-56.59, 149.51),
    "kidney": (-130.56, 267.28),
    "lung": (-1088.56, -366.95),
    "bone": (71.40, 1000.00),
    "brain": (-951.00, 369.51),
}


def statistics_entry(low: float, high: float, **extra) -> dict:
    """A statistics entry whose effective range is [low, high]."""
    return {"percentile_0_5": low, "percentile_99_5": high, "sigma_6_low": low, "sigma_6_high": high, **extra}


def volume(shape=(8, 8, 8), body_hu: float = 0.0):
    """(image, mask): body 200 everywhere, the image at `body_hu`."""
    return np.full(shape, body_hu, dtype=np.float32), np.full(shape, 200, dtype=np.uint8)


def organ(report, name: str):
    return next(r for r in report.organs if r.organ == name)


def test_packaged_thresholds_equal_the_reference_table():
    statistics = load_statistics()
    assert statistics.source == PACKAGED
    table = {t.organ: (round(t.low, 2), round(t.high, 2)) for t in statistics.organs}
    assert table == REFERENCE_TABLE


def test_label_sets_match_the_reference_except_the_lung_fix():
    assert ORGAN_LABELS["liver"] == (1,) and ORGAN_LABELS["spleen"] == (3,) and ORGAN_LABELS["pancreas"] == (4,)
    assert ORGAN_LABELS["kidney"] == (5, 14) and ORGAN_LABELS["brain"] == (22,)
    assert set(ORGAN_LABELS["bone"]) == set(range(33, 57)) | set(range(63, 98)) | {120, 122, 127}
    # The reference has [28, 29, 30, 31, 31]: 31 twice, 32 (right lower lobe) missing.
    assert ORGAN_LABELS["lung"] == (28, 29, 30, 31, 32)


def test_right_lower_lobe_alone_out_of_range_fails_lung():
    """A lung made only of label 32 at soft-tissue HU fails; the reference's label list would not see it."""
    image, mask = volume()
    mask[2:5, 2:5, 2:5] = 32
    image[2:5, 2:5, 2:5] = 40.0  # far above the lung's high of -366.95
    report = check_quality(image, mask, load_statistics())
    lung = organ(report, "lung")
    assert lung.verdict == "fail" and lung.voxels == 27 and lung.median == 40.0
    assert not report.passed and report.failed == ["lung"]
    assert "lung median 40.0 HU outside [-1088.6, -367.0]" in report.summary()


def test_medians_are_over_the_finite_voxels_of_all_an_organs_labels():
    image, mask = volume()
    mask[0, 0, :4] = 5   # right kidney
    mask[1, 0, :2] = 14  # left kidney
    image[0, 0, :4] = [10.0, 20.0, 30.0, np.nan]
    image[1, 0, :2] = [40.0, 1000.0]
    report = check_quality(image, mask, load_statistics())
    kidney = organ(report, "kidney")
    # values 10, 20, 30, 40, 1000 (NaN ignored): median 30; six voxels under the labels
    assert kidney.median == 30.0 and kidney.voxels == 6 and kidney.verdict == "pass"
    assert report.failed == ["non-finite"]  # the NaN itself still fails the image

    mask[2, 0, :2] = 1
    image[2, 0, :2] = [100.0, 160.0]  # even count: the mean of the middle two
    assert organ(check_quality(image, mask, load_statistics()), "liver").median == 130.0


def test_absent_organs_pass():
    image, mask = volume(body_hu=5000.0)  # body alone at any HU is not checked
    mask[0, 0, 0] = 10  # gallbladder: in no organ set
    report = check_quality(image, mask, load_statistics())
    assert report.passed and report.failed == [] and report.non_finite_voxels == 0
    assert {r.verdict for r in report.organs} == {"absent"}
    assert organ(report, "liver").voxels == 0


def test_an_all_nan_image_fails_on_its_non_finite_voxels():
    """Every organ unmeasurable used to read as "absent", so an all-NaN CT passed."""
    image, mask = volume()
    mask[:2] = 1
    image[:] = np.nan
    report = check_quality(image, mask, load_statistics())
    assert not report.passed and report.failed == [NON_FINITE]
    assert report.non_finite_voxels == 512 and report.image_voxels == 512
    assert organ(report, "liver").verdict == "non-finite" and organ(report, "liver").median is None
    assert organ(report, "spleen").verdict == "absent"
    assert "512 of 512 voxels are non-finite (NaN or inf)" in report.summary()
    document = report.as_dict()
    assert document["passed"] is False and document["non_finite_voxels"] == 512


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_voxel_fails_and_organs_use_their_finite_voxels(bad):
    image, mask = volume()
    mask[:2] = 1
    image[:2] = 50.0
    image[0, 0, 0] = bad  # inside the liver
    report = check_quality(image, mask, load_statistics())
    assert not report.passed and report.failed == [NON_FINITE] and report.non_finite_voxels == 1
    liver = organ(report, "liver")
    assert liver.verdict == "pass" and liver.median == 50.0 and liver.voxels == 128
    assert report.summary().startswith("1 of 512 voxels are non-finite")


def test_non_finite_voxels_and_a_failing_organ_are_both_reported():
    image, mask = volume()
    mask[:2] = 1
    image[:2] = 500.0
    image[7, 7, 7] = np.nan  # in the body, under no checked organ
    report = check_quality(image, mask, load_statistics())
    assert report.failed == [NON_FINITE, "liver"]
    assert "1 of 512 voxels are non-finite" in report.summary() and "liver median 500.0 HU" in report.summary()


def test_bounds_are_inclusive_and_outside_fails():
    statistics = thresholds_from({"liver": statistics_entry(0.0, 100.0)}, "test")
    image, mask = volume()
    mask[:2] = 1
    for value, verdict in [(0.0, "pass"), (100.0, "pass"), (-0.5, "fail"), (100.5, "fail")]:
        image[:2] = value
        assert organ(check_quality(image, mask, statistics), "liver").verdict == verdict, value


def test_low_and_high_take_the_wider_of_sigma_and_percentile():
    entry = {"percentile_0_5": 10.0, "percentile_99_5": 90.0, "sigma_6_low": 20.0, "sigma_6_high": 95.0}
    (threshold,) = thresholds_from({"spleen": entry}, "test").organs
    assert (threshold.low, threshold.high) == (10.0, 95.0)
    entry = {"percentile_0_5": 30.0, "percentile_99_5": 99.0, "sigma_6_low": 20.0, "sigma_6_high": 95.0}
    (threshold,) = thresholds_from({"spleen": entry}, "test").organs
    assert (threshold.low, threshold.high) == (20.0, 99.0)


def test_bone_high_is_forced_to_1000():
    statistics = thresholds_from({"bone": statistics_entry(100.0, 500.0)}, "test")
    assert statistics.organs[0].high == 1000.0
    image, mask = volume()
    mask[:2] = 40
    image[:2] = 900.0
    assert check_quality(image, mask, statistics).passed


def test_extra_organ_with_its_own_labels():
    statistics = thresholds_from({"heart": statistics_entry(0.0, 100.0, labels=[115])}, "test")
    image, mask = volume()
    mask[:2] = 115
    image[:2] = 500.0
    report = check_quality(image, mask, statistics)
    assert report.failed == ["heart"]


def test_float_label_maps_as_the_reference_writes_them_are_accepted():
    image, mask = volume()
    mask[:2] = 1
    image[:2] = 50.0
    report = check_quality(image, mask.astype(np.float32), load_statistics())
    assert organ(report, "liver").voxels == 2 * 64 and report.passed
    fractional = mask.astype(np.float32)
    fractional[0, 0, 0] = 1.5
    with pytest.raises(MaskError, match="fractional"):
        check_quality(image, fractional, load_statistics())


def test_shape_mismatch_names_both_shapes():
    image, _ = volume((8, 8, 8))
    _, mask = volume((8, 8, 6))
    with pytest.raises(MaskError, match=r"shape \(8, 8, 6\) differs from IMAGE shape \(8, 8, 8\)"):
        check_quality(image, mask, load_statistics())


def test_report_as_dict():
    image, mask = volume()
    mask[:2] = 1
    image[:2] = 500.0
    document = check_quality(image, mask, load_statistics()).as_dict()
    assert document["passed"] is False and document["failed"] == ["liver"]
    assert document["statistics"] == PACKAGED and document["non_finite_voxels"] == 0
    liver = document["organs"][0]
    assert liver == {"organ": "liver", "median_hu": 500.0, "low": -21.596, "high": 162.0, "voxels": 128,
                     "verdict": "fail"}
    assert json.loads(json.dumps(document)) == document


@pytest.mark.parametrize("field", ["percentile_0_5", "percentile_99_5", "sigma_6_low", "sigma_6_high"])
def test_statistics_file_missing_a_field_names_it(tmp_path: Path, field: str):
    document = json.loads(json.dumps({"liver": statistics_entry(0.0, 1.0), "lung": statistics_entry(0.0, 1.0)}))
    del document["lung"][field]
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(document))
    with pytest.raises(StatisticsError, match=f"organ 'lung' lacks the field '{field}'") as caught:
        load_statistics(path)
    assert str(path) in str(caught.value) and "--stats" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not a readable JSON file"),
        ("[]", "JSON object of organ"),
        ("{}", "JSON object of organ"),
        ('{"liver": 3}', "organ 'liver' must map to an object"),
        ('{"liver": {"percentile_0_5": "low", "percentile_99_5": 1, "sigma_6_low": 0, "sigma_6_high": 1}}',
         "'percentile_0_5' is 'low'"),
        ('{"heart": {"percentile_0_5": 0, "percentile_99_5": 1, "sigma_6_low": 0, "sigma_6_high": 1}}',
         "organ 'heart' has no built-in label set"),
        ('{"heart": {"percentile_0_5": 0, "percentile_99_5": 1, "sigma_6_low": 0, "sigma_6_high": 1, '
         '"labels": [300]}}', "'labels' must be a list of label ids"),
    ],
)
def test_bad_statistics_files(tmp_path: Path, content: str, fragment: str):
    path = tmp_path / "stats.json"
    path.write_text(content)
    with pytest.raises(StatisticsError, match=fragment):
        load_statistics(path)


def test_missing_statistics_file(tmp_path: Path):
    with pytest.raises(StatisticsError, match="does not exist"):
        load_statistics(tmp_path / "nope.json")


def test_attempt_seeds_keep_attempt_zero_and_differ_after():
    from maisi_cli.engine.sampling import derive_attempt_seed, derive_sample_seed

    for seed, index in [(0, 0), (7, 3)]:
        assert derive_attempt_seed(seed, index, 0) == derive_sample_seed(seed, index)
        seeds = {derive_attempt_seed(seed, index, a) for a in range(4)}
        assert len(seeds) == 4
        assert all(0 <= s < 2**63 for s in seeds)
    # an attempt of sample 0 is not another sample's first seed
    assert derive_attempt_seed(0, 0, 1) not in {derive_sample_seed(0, k) for k in range(50)}


def test_changing_the_loaded_packaged_statistics_does_not_change_the_next_load():
    from maisi_cli.resources import load_json

    document = load_json("image_median_statistics.json")
    document["liver"]["sigma_6_low"] = -1000.0  # a caller editing its copy (a test's narrowed statistics)
    assert load_json("image_median_statistics.json")["liver"]["sigma_6_low"] != -1000.0
    liver = next(t for t in load_statistics().organs if t.organ == "liver")
    assert round(liver.low, 2) == REFERENCE_TABLE["liver"][0]
