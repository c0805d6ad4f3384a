"""Checks of a user's label map before any network loads (issue 22, items 3 and 4): another scheme's ids, a mirrored
header, ids outside the dictionary, no body label, a small field of view, and the grid a model takes nearest a
mask's own."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_cli.engine.masks.validation import (check_condition_labels, check_scheme, field_of_view_warning,
                                               lateral_pairs)
from maisi_cli.engine.phantoms import make_phantom
from maisi_cli.errors import UsageError
from maisi_cli.io.label_maps import BLOCK_VOXELS, label_counts
from maisi_cli.label_schemes import label_scheme
from maisi_cli.models import get_model


def in_totalsegmentator_ids(labels: np.ndarray) -> np.ndarray:
    """A MAISI map rewritten in TotalSegmentator ids (the body, which it does not write, dropped)."""
    table = np.zeros(256, dtype=np.uint8)
    for ts_id, maisi_id in label_scheme("totalsegmentator").mapping.items():
        if ts_id == 200:
            continue  # the body label the scheme passes through: TotalSegmentator writes none
        table[maisi_id] = ts_id
    return table[labels]


@pytest.fixture(scope="module", params=[0, 4])
def phantom(request):
    return make_phantom((64, 64, 64), (6.0, 6.0, 6.0), request.param)


def test_left_right_pairs_are_read_from_either_naming():
    maisi_pairs = lateral_pairs(label_scheme("maisi").class_names)
    ts_pairs = lateral_pairs(label_scheme("totalsegmentator").class_names)
    assert (5, 14) in maisi_pairs and (75, 63) in maisi_pairs  # right/left kidney, right/left rib 1
    assert (2, 3) in ts_pairs and (104, 92) in ts_pairs  # kidney_right/kidney_left, rib_right_1/rib_left_1
    assert len(ts_pairs) == 32  # 20 paired organs, bones and muscles, and 12 ribs


def test_a_map_read_in_its_own_scheme_passes(phantom):
    assert check_scheme(phantom.labels, phantom.affine, label_scheme("maisi"), "p.nii.gz") == []
    ts = in_totalsegmentator_ids(phantom.labels)
    assert check_scheme(ts, phantom.affine, label_scheme("totalsegmentator"), "p.nii.gz") == []


def test_totalsegmentator_ids_read_as_maisi_are_refused_naming_the_scheme(phantom):
    ts = in_totalsegmentator_ids(phantom.labels)
    with pytest.raises(UsageError, match="looks like a totalsegmentator map; pass --mask-labels totalsegmentator"):
        check_scheme(ts, phantom.affine, label_scheme("maisi"), "ts.nii.gz")


def test_maisi_ids_read_as_totalsegmentator_are_refused_naming_maisi(phantom):
    with pytest.raises(UsageError, match="pass --mask-labels maisi"):
        check_scheme(phantom.labels, phantom.affine, label_scheme("totalsegmentator"), "m.nii.gz")


def test_a_mirrored_header_is_a_warning(phantom):
    mirrored = np.ascontiguousarray(phantom.labels[::-1])  # left and right swapped, the header unchanged
    warnings = check_scheme(mirrored, phantom.affine, label_scheme("maisi"), "m.nii.gz")
    assert len(warnings) == 1 and "mirrored left-right" in warnings[0]


def test_a_map_with_few_pairs_is_not_judged():
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:5, 5:8, 5:8] = 14  # a left kidney on the patient's left (small x) and a right one on the right
    labels[15:18, 5:8, 5:8] = 5
    assert check_scheme(labels[::-1].copy(), np.eye(4), label_scheme("maisi"), "x") == []


def test_no_body_label_is_refused_with_the_fix():
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    with pytest.raises(UsageError, match=r"no body label \(200\).*--body-from CT.nii.gz"):
        check_condition_labels(labels, "liver.nii.gz")
    labels[0] = 200
    check_condition_labels(labels, "liver.nii.gz")


def test_ids_outside_the_dictionary_are_refused():
    labels = np.full((8, 8, 8), 200, dtype=np.uint8)
    labels[0, 0, 0] = 231
    with pytest.raises(UsageError, match="ids 231 that are not MAISI labels.*--mask-labels"):
        check_condition_labels(labels, "x.nii.gz")


def test_label_counts_equal_a_whole_volume_bincount_in_either_memory_order(monkeypatch):
    import maisi_cli.io.label_maps as label_maps

    monkeypatch.setattr(label_maps, "BLOCK_VOXELS", 64)  # several blocks on a small map
    labels = np.random.default_rng(0).integers(0, 256, (9, 7, 5), dtype=np.uint8)
    for stored in (labels, np.asfortranarray(labels), labels[:, ::2]):
        np.testing.assert_array_equal(label_counts(stored), np.bincount(stored.ravel(), minlength=256))
    assert BLOCK_VOXELS == 1 << 22


def test_field_of_view_under_384_mm_warns_unless_the_head_is_shown():
    counts = np.zeros(256, dtype=np.int64)
    counts[[1, 200]] = 10  # liver: an abdomen
    warning = field_of_view_warning(counts, (256, 256, 128), (1.2, 1.2, 2.0), 384.0, "rflow-ct")
    assert warning is not None and "307.2 mm is under the 384 mm" in warning
    assert field_of_view_warning(counts, (256, 256, 128), (1.5, 1.5, 2.0), 384.0, "rflow-ct") is None
    counts[22] = 10  # the brain: a head CT may be 256 mm across
    assert field_of_view_warning(counts, (256, 256, 128), (1.2, 1.2, 2.0), 384.0, "rflow-ct") is None
    assert field_of_view_warning(counts, (64, 64, 64), (1.0, 1.0, 1.0), None, "demo") is None


@pytest.mark.parametrize("own, expected", [
    # a grid the model takes is kept
    (((512, 512, 256), (0.8, 0.8, 1.5)), ((512, 512, 256), (0.8, 0.8, 1.5))),
    # z 300 is not a choice: 256 slices spanning the same 450 mm
    (((512, 512, 300), (0.8, 0.8, 1.5)), ((512, 512, 256), (0.8, 0.8, 1.7578))),
    # x/y 333 is not a choice: 384 at its spacing (padding, not cropping)
    (((333, 333, 200), (1.2, 1.2, 2.5)), ((384, 384, 256), (1.2, 1.2, 2.5))),
])
def test_nearest_grid_of_rflow_ct(own, expected):
    model = get_model("rflow-ct")
    size, spacing = model.nearest_grid(*own)
    assert (size, spacing) == expected
    assert model.grid_problems(size, spacing) == []


def test_nearest_grid_of_the_demo_keeps_within_its_largest_size():
    model = get_model("demo")
    size, spacing = model.nearest_grid((512, 512, 300), (0.8, 0.8, 1.5))
    assert model.grid_problems(size, spacing) == [] and max(size) <= 128
    assert size[0] * spacing[0] == pytest.approx(512 * 0.8, rel=0.01)  # the field of view is kept


def test_relabelled_equals_a_fancy_index_and_keeps_the_memory_order(monkeypatch):
    import maisi_cli.io.label_maps as label_maps

    monkeypatch.setattr(label_maps, "BLOCK_VOXELS", 50)
    table = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)
    labels = np.random.default_rng(2).integers(0, 300, (9, 7, 5)).astype(np.uint16)
    for stored in (labels, np.asfortranarray(labels)):
        out = label_maps.relabelled(stored, table)
        np.testing.assert_array_equal(out, table[stored])
        assert out.dtype == np.uint8 and out.flags.f_contiguous == stored.flags.f_contiguous
