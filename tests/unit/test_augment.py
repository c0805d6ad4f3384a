"""Mask augmentation before sampling (reference §9.6): branch choice, the five tumour branches, the body zoom."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_cli.engine.masks import augment as aug
from maisi_cli.engine.masks.augment import (
    BRANCH_BY_LABEL,
    MAX_TRIES,
    acceptance_threshold,
    augment_mask,
    augment_tumour,
    choose_branch,
    dominant_neighbour_lobe,
    tumour_window,
)
from tests.helpers import phantom_labels

ndimage = pytest.importorskip("scipy.ndimage")

BONE = 40  # a vertebra (33–56)


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((grid[i] - centre[i]) ** 2 for i in range(3)) <= radius * radius


def body(size: int) -> np.ndarray:
    labels = np.zeros((size,) * 3, dtype=np.uint8)
    labels[ball(labels.shape, (size / 2 - 0.5,) * 3, size / 2 - 1)] = 200
    return labels


def scene(tumour: int, size: int = 48) -> np.ndarray:
    """Body 200 around a host organ blob with a tumour blob (radius 3) inside it."""
    labels = body(size)
    c = size // 2
    if tumour == 128:
        labels[c - 12:c + 12, c - 12:c + 12, c - 8:c + 8] = BONE
    elif tumour == 23:  # two lobes; the tumour sits in 29, touching 28 on one side
        lungs = ball(labels.shape, (c, c, c), size / 2 - 3)
        labels[lungs] = 29
        labels[:c - 3][lungs[:c - 3]] = 28
    else:
        host = {26: 1, 24: 4, 27: 62}[tumour]
        labels[ball(labels.shape, (c, c, c), 15)] = host
    labels[ball(labels.shape, (c, c, c), 3)] = tumour
    return labels


def closed(mask: np.ndarray, size: int = 5) -> np.ndarray:
    """Independent binary closing of (mask ∪ outside the volume), the reference's 1-padded closing."""
    pad = size
    padded = np.pad(mask, pad, constant_values=True)
    element = np.ones((size,) * 3, dtype=bool)
    grown = ndimage.binary_dilation(padded, element)
    shut = ndimage.binary_erosion(grown, element, border_value=1)
    return shut[pad:-pad, pad:-pad, pad:-pad]


def expected_region(labels: np.ndarray, tumour: int) -> np.ndarray:
    """Where the moved tumour may lie (bone: the closing of bones ∪ lesion, which contains the closed lesion)."""
    old = labels == tumour
    host = {128: np.isin(labels, aug.BONES), 26: labels == 1, 23: np.isin(labels, aug.LUNG_LOBES),
            24: labels == 4, 27: labels == 62}[tumour]
    return closed(host | old)


@pytest.fixture(scope="module")
def augmented() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each tumour branch run once on its scene with seed 0: {tumour label: (input, output)}."""
    results = {}
    for tumour in (128, 26, 23, 24, 27):
        labels = scene(tumour)
        results[tumour] = (labels, augment_mask(labels, seed=0))
    return results


# ----- branch choice -----


@pytest.mark.parametrize(("present", "expected"), [
    ((200, 1, 26, 23, 128), 128),
    ((200, 1, 26, 23, 24, 27), 26),
    ((200, 28, 23, 24, 27), 23),
    ((200, 4, 24, 27), 24),
    ((200, 62, 27), 27),
    ((200, 1, 28, 3), None),
    ((0,), None),
])
def test_choose_branch_follows_the_reference_priority(present, expected):
    labels = np.array(present, dtype=np.uint8).reshape(1, 1, -1)
    branch = choose_branch(labels)
    assert (branch.tumour if branch else None) == expected


def test_only_the_first_branch_runs():
    """With a hepatic (26) and a lung (23) tumour present, only the hepatic one moves; the lung is untouched."""
    labels = body(64)
    labels[ball(labels.shape, (20, 32, 32), 14)] = 1
    labels[ball(labels.shape, (22, 32, 32), 3)] = 26
    lung = ball(labels.shape, (48, 32, 32), 10)
    labels[lung] = 28
    labels[ball(labels.shape, (48, 32, 32), 3)] = 23
    out = augment_mask(labels, seed=0)
    assert not np.array_equal(out == 26, labels == 26)  # the hepatic tumour moved
    np.testing.assert_array_equal(out[lung], labels[lung])  # the lung tumour and its lobe did not


# ----- determinism, dtype, shape -----


@pytest.mark.parametrize("labels", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 8), np.int16)])
def test_rejects_anything_but_a_uint8_volume(labels):
    with pytest.raises(ValueError, match="uint8"):
        augment_mask(labels, seed=0)


def test_same_seed_same_output_other_seed_different_output():
    labels = scene(27)
    first = augment_mask(labels, seed=7)
    assert first.dtype == np.uint8 and first.shape == labels.shape
    np.testing.assert_array_equal(augment_mask(labels, seed=7), first)
    assert not np.array_equal(augment_mask(labels, seed=8), first)


def test_bone_branch_seeds():
    labels = scene(128)
    outputs = [augment_mask(labels, seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_device_argument_accepts_torch_device():
    import torch

    labels = scene(27)
    np.testing.assert_array_equal(augment_mask(labels, 3, torch.device("cpu")), augment_mask(labels, 3, "cpu"))


# ----- body branch -----


def test_body_branch_keeps_shape_and_most_labels():
    """Tumour-free: a ±1 % zoom on the voxel array only (the caller keeps the requested affine), so the shape is the
    same, the label set the same and ≥ 95 % of the voxels keep their label. A 1 % zoom moves whole voxels only along
    a long axis, hence the 160-voxel one; some seed does change the map."""
    labels = phantom_labels((160, 24, 32))
    changed = False
    for seed in range(4):
        out = augment_mask(labels, seed=seed)
        assert out.dtype == np.uint8 and out.shape == labels.shape
        assert (out == labels).mean() >= 0.95
        assert set(np.unique(out)) == set(np.unique(labels))
        changed |= not np.array_equal(out, labels)
    assert changed


def test_body_branch_is_monai_randzoom():
    import torch
    from monai.transforms import RandZoom

    labels = phantom_labels((160, 24, 32))
    zoom = RandZoom(min_zoom=0.99, max_zoom=1.01, mode="nearest", prob=1.0, keep_size=True)
    zoom.set_random_state(seed=2)
    expected = np.asarray(zoom(torch.as_tensor(labels[None]))[0]).astype(np.uint8)
    assert not np.array_equal(expected, labels)
    np.testing.assert_array_equal(augment_mask(labels, seed=2), expected)


def test_body_branch_on_an_empty_volume_changes_nothing():
    labels = np.zeros((48, 48, 48), dtype=np.uint8)
    np.testing.assert_array_equal(augment_mask(labels, seed=1), labels)


# ----- tumour branches -----

TUMOURS = (128, 26, 23, 24, 27)
FILL = {128: 200, 26: 1, 23: 29, 24: 4, 27: 62}  # lung: 29 surrounds the tumour, 28 touches one side


@pytest.mark.parametrize("tumour", TUMOURS)
def test_tumour_volume_within_the_accepted_fraction(augmented, tumour):
    labels, out = augmented[tumour]
    before, after = int((labels == tumour).sum()), int((out == tumour).sum())
    branch = BRANCH_BY_LABEL[tumour]
    lowest = min(branch.threshold, branch.relaxed[1] if branch.relaxed else 1.0)
    assert after >= lowest * before
    assert after <= 2.5 * before  # scale ≤ 1.2 per axis, then a closing


@pytest.mark.parametrize("tumour", TUMOURS)
def test_tumour_stays_inside_its_host_region(augmented, tumour):
    labels, out = augmented[tumour]
    moved = out == tumour
    assert moved.any()
    assert not (moved & ~expected_region(labels, tumour)).any()


@pytest.mark.parametrize("tumour", TUMOURS)
def test_moved_tumour_is_smoothed_by_a_closing(augmented, tumour):
    """After acceptance the tumour is closed with a 5³ element, so closing it again changes nothing."""
    _, out = augmented[tumour]
    moved = out == tumour
    np.testing.assert_array_equal(closed(moved), moved)


@pytest.mark.parametrize("tumour", TUMOURS)
def test_old_site_refilled_and_nothing_else_changed(augmented, tumour):
    labels, out = augmented[tumour]
    old, new = labels == tumour, out == tumour
    assert not np.array_equal(old, new)  # seed 0 moves every tumour here
    vacated = old & ~new
    assert vacated.any()
    assert set(np.unique(out[vacated])) == {FILL[tumour]}
    untouched = ~old & ~new
    np.testing.assert_array_equal(out[untouched], labels[untouched])


def test_lung_fill_is_the_dominant_neighbouring_lobe():
    import torch

    labels = np.full((9, 9, 9), 28, dtype=np.uint8)
    labels[4:] = 29
    labels[3:6, 3:6, 3:6] = 23  # ring: one slab of 28 (x = 2), the rest 29
    tumour = torch.as_tensor(labels == 23)
    assert dominant_neighbour_lobe(torch.as_tensor(labels), tumour) == 29
    labels[labels == 29] = 30
    labels[labels == 28] = 31
    assert dominant_neighbour_lobe(torch.as_tensor(labels), torch.as_tensor(labels == 23)) == 30


@pytest.mark.parametrize("tumour", (128, 27))
def test_labels_outside_the_crop_unchanged(tumour):
    """A tumour near a corner of a 64³ volume: the branch works on a crop, and nothing outside it changes."""
    labels = body(64)
    host = BONE if tumour == 128 else 62
    labels[ball(labels.shape, (16, 16, 20), 12)] = host
    labels[ball(labels.shape, (16, 16, 20), 3)] = tumour
    window = tumour_window(labels == tumour, BRANCH_BY_LABEL[tumour])
    outside = np.ones(labels.shape, dtype=bool)
    outside[window.crop] = False
    assert outside.sum() > 0.25 * outside.size  # the crop is a real crop here
    out = augment_mask(labels, seed=2)
    assert not np.array_equal(out, labels)
    np.testing.assert_array_equal(out[outside], labels[outside])


# ----- totality and the loop bound -----


@pytest.mark.parametrize("tumour", TUMOURS)
def test_absent_tumour_leaves_the_map_unchanged(tumour):
    labels = scene(26)
    labels[labels == 26] = 1
    out = augment_tumour(labels, BRANCH_BY_LABEL[tumour], seed=0)
    np.testing.assert_array_equal(out, labels)


def test_lung_tumour_without_a_neighbouring_lobe_is_left_alone():
    labels = body(48)
    labels[ball(labels.shape, (24, 24, 24), 3)] = 23
    np.testing.assert_array_equal(augment_mask(labels, seed=0), labels)


def test_loop_is_bounded_and_returns_the_map_unchanged(monkeypatch):
    """A draw that never keeps the tumour: exactly MAX_TRIES tries, then the map as it was."""
    calls = []

    def nowhere(transform, tumour, window):
        calls.append(1)
        return tumour & False

    monkeypatch.setattr(aug, "move_tumour", nowhere)
    labels = scene(24)
    np.testing.assert_array_equal(augment_mask(labels, seed=0), labels)
    assert len(calls) == MAX_TRIES


def test_colon_keeps_the_undistorted_tumour_after_20_tries(monkeypatch):
    calls = []

    def nowhere(transform, tumour, window):
        calls.append(1)
        return tumour & False

    monkeypatch.setattr(aug, "move_tumour", nowhere)
    labels = scene(27)
    np.testing.assert_array_equal(augment_mask(labels, seed=0), labels)  # a ball is its own closing
    assert len(calls) == 20


def test_tiny_host_region_returns_unchanged_in_bounded_time():
    """A pancreatic tumour with no pancreas around it: a ±15-voxel move never keeps 80 % of it."""
    labels = body(48)
    labels[ball(labels.shape, (24, 24, 24), 3)] = 24
    out = augment_tumour(labels, BRANCH_BY_LABEL[24], seed=0, max_tries=3)
    np.testing.assert_array_equal(out, labels)


def test_acceptance_thresholds():
    bone, lung, colon = BRANCH_BY_LABEL[128], BRANCH_BY_LABEL[23], BRANCH_BY_LABEL[27]
    assert [acceptance_threshold(bone, k) for k in (0, 39, 40, 99)] == [0.8, 0.8, 0.75, 0.75]
    assert acceptance_threshold(lung, 0) == 0.85
    assert acceptance_threshold(colon, 19) == 0.8 and colon.keep_after == 20
