"""The unconditional mask of tumour-presence guidance (maisi_cli/engine/masks/tumours.py) against NV-Generate-CTMR
`scripts/augmentation.py::remove_tumors` (no pseudo labels). Expected maps are written by hand from upstream's rules;
one test also replays upstream's steps in torch (padded conv3d dilation, torch.mode) on random maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maisi_cli.engine.masks import tumours
from maisi_cli.engine.masks.tumours import remove_tumours

def empty(shape=(9, 9, 9), dtype=np.uint8) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


def removed_unchanged_input(labels: np.ndarray) -> np.ndarray:
    """remove_tumours(labels), checking that the input is left as it was and the output is a new array."""
    before = labels.copy()
    out = remove_tumours(labels)
    np.testing.assert_array_equal(labels, before)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert not np.shares_memory(out, labels)
    return out


def lung_case(centre=(4, 4, 4)) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """A one-voxel lung tumour at `centre` and the slices of its 3x3x3 neighbourhood."""
    labels = empty()
    labels[centre] = 23
    return labels, tuple(slice(c - 1, c + 2) for c in centre)


# ----- organ and brain tumours -----


def test_every_uint8_id_is_kept_but_the_organ_and_brain_tumours():
    labels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    labels[labels == 23] = 0  # the lung tumour has its own tests
    expected = labels.copy()
    expected[0, 3, 2] = 1  # 26 hepatic tumour -> 1 liver (id i sits at flat index i: (i // 64, i % 64 // 8, i % 8))
    expected[0, 3, 0] = 4  # 24 pancreatic tumour -> 4 pancreas
    expected[0, 3, 3] = 62  # 27 colon cancer primaries -> 62 colon
    expected[1, 6, 4] = 14  # 116 left kidney cyst -> 14 left kidney
    expected[1, 6, 5] = 5  # 117 right kidney cyst -> 5 right kidney
    expected[2, 6, 0] = 22  # 176 brain tumour -> 22 brain
    out = removed_unchanged_input(labels)
    np.testing.assert_array_equal(out, expected)
    assert out[2, 0, 0] == 128  # bone lesion stays: upstream replaces it only from pseudo labels
    assert out[3, 1, 0] == 200  # body


def test_brats_tumours_map_to_brain_in_a_ctmr_uint16_map():
    labels = empty((2, 3, 4), np.uint16)
    labels[0, 0, :] = (401, 402, 403, 176)
    labels[1, 2, :] = (22, 500, 220, 128)  # brain, CT-MR body 500, brain stem, bone lesion
    expected = labels.copy()
    expected[0, 0, :] = 22
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


def test_a_map_without_tumours_comes_back_equal_as_a_new_array():
    labels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    for tumour in (23, 24, 26, 27, 116, 117, 176):
        labels[labels == tumour] = 0
    out = removed_unchanged_input(labels)  # a copy, never the same object: the caller may write either
    assert out is not labels
    np.testing.assert_array_equal(out, labels)


def test_wrong_arrays_are_refused():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        remove_tumours(np.zeros((4, 4, 4), np.int64))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        remove_tumours(np.zeros((4, 4), np.uint8))


# ----- lung tumour: majority vote -----


def test_lung_tumour_takes_the_lobe_most_of_its_neighbourhood_has():
    labels, around = lung_case()
    labels[around] = np.where(labels[around] == 23, 23, 29)  # 26 neighbours: 17 of 29 ...
    labels[3, 3:6, 3:6] = 28  # ... and 9 of 28
    labels[6:8, 1:3, 6:8] = 30  # a bigger lobe away from the tumour (and from the faces) does not vote
    labels[1:3, 6:8, 1:8] = 30
    labels[2, 2, 2] = 26  # a hepatic tumour in the same map still goes to the liver
    expected = labels.copy()
    expected[4, 4, 4] = 29
    expected[2, 2, 2] = 1
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


def test_lung_tumour_tie_goes_to_the_lowest_lobe_id():
    labels, around = lung_case()
    labels[around] = np.where(labels[around] == 23, 23, 30)
    labels[3, 3:6, 3:6] = 31  # 31 comes first in memory: 9 + 3 + 1 = 13 of 31, 13 of 30 left
    labels[4, 3, 3:6] = 31
    labels[4, 4, 3] = 31
    assert np.count_nonzero(labels == 30) == np.count_nonzero(labels == 31) == 13
    expected = labels.copy()
    expected[4, 4, 4] = 30  # as torch.mode on the CPU: the smallest of the tied values
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


def test_lung_tumour_without_a_lobe_nearby_takes_the_biggest_lobe_of_the_volume():
    labels, around = lung_case((2, 2, 2))
    labels[around] = np.where(labels[around] == 23, 23, 200)  # only body around it
    labels[5:7, 5:7, 5:7] = 31  # 8 voxels, not touching the faces (0 and 8)
    labels[5, 2, 5:7] = 29  # 2 voxels
    expected = labels.copy()
    expected[2, 2, 2] = 31
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)
    labels[6, 2, 5:7] = 29  # 4 of 29
    labels[6, 3, 5:7] = 29  # 6
    labels[5, 3, 5:7] = 29  # 8 of 29, 8 of 31: the lowest id, as upstream's argmax over counts in id order
    expected = labels.copy()
    expected[2, 2, 2] = 29
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


def test_lung_tumour_with_no_lobe_anywhere_becomes_left_upper_lobe():
    labels, _ = lung_case()
    labels[1, 1, 1] = 1
    expected = labels.copy()
    expected[4, 4, 4] = 28  # upstream: argmax over five zero counts picks the first lobe, 28
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


def test_all_lung_tumours_share_one_vote():
    labels, around_a = lung_case((2, 2, 2))
    labels[around_a] = np.where(labels[around_a] == 23, 23, 28)  # 26 of 28 around tumour A
    labels[6, 6, 6] = 23
    labels[5:8, 5:8, 5:7] = np.where(labels[5:8, 5:8, 5:7] == 23, 23, 32)  # 17 of 32 around tumour B
    expected = labels.copy()
    expected[2, 2, 2] = 28
    expected[6, 6, 6] = 28  # upstream takes one torch.mode over every tumour's neighbourhood, not one per tumour
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


def test_lobes_on_the_volume_faces_vote_as_in_upstreams_padded_dilation():
    # Upstream dilates with MONAI dilate(..., pad_value=1.0): the outermost voxel layer is always in the dilation,
    # so lobe voxels on the faces vote wherever the tumour is. Kept for parity; 9 face voxels beat 8 neighbours.
    labels, around = lung_case()
    labels[around] = np.where(labels[around] == 23, 23, 200)
    labels[3, 3:6, 3:5] = 29  # 6 of 29 around the tumour
    labels[5, 3, 3:5] = 29  # 8
    labels[0, 0, :] = 30  # 9 voxels on the edge shared by faces x=0 and y=0
    expected = labels.copy()
    expected[4, 4, 4] = 30
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)
    labels[5, 4, 3:5] = 29  # 10 of 29: wins, so the edge voxels counted once (twice would make 18 of 30)
    expected = labels.copy()
    expected[4, 4, 4] = 29
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


def test_lung_tumour_on_a_face_counts_its_face_neighbours_once(monkeypatch):
    monkeypatch.setattr(tumours, "SLAB_VOXELS", 81)  # one X slice per slab: the bounding box spans slabs
    labels = empty()
    labels[0, 4, 4] = 23
    labels[0, 3:6, 3:6] = np.where(labels[0, 3:6, 3:6] == 23, 23, 30)  # 8 of 30 on the face x=0
    labels[1, 3:6, 3:6] = 31  # 9 of 31 inside: wins unless the face neighbours were counted twice (16)
    expected = labels.copy()
    expected[0, 4, 4] = 31
    np.testing.assert_array_equal(removed_unchanged_input(labels), expected)


# ----- upstream's steps replayed in torch -----


def upstream_lung_vote(labels: np.ndarray) -> np.ndarray:
    """Upstream's remove_tumors_majority_vote step by step: a 3x3x3 conv of the tumour mask padded with ones, minus
    the tumour, lobes only, torch.mode (fallback: the lobe with the most voxels, first on ties)."""
    volume = torch.from_numpy(labels.astype(np.int64))
    tumour = volume == 23
    padded = torch.nn.functional.pad(tumour.float()[None, None], (1,) * 6, value=1.0)
    grown = torch.nn.functional.conv3d(padded, torch.ones(1, 1, 3, 3, 3))[0, 0] > 0
    lobes = torch.tensor([28, 29, 30, 31, 32])
    ring = grown & ~tumour & torch.isin(volume, lobes)
    if ring.any():
        lobe = int(torch.mode(volume[ring], 0)[0])
    else:
        lobe = int(lobes[torch.stack([(volume == v).sum() for v in lobes]).argmax()])
    volume[tumour] = lobe
    return volume.numpy().astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_random_maps_match_upstreams_steps(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 14, size=3))
    labels = rng.choice(np.array([0, 200, 28, 29, 30, 31, 32], np.uint8), size=shape,
                        p=[0.3, 0.3, 0.1, 0.1, 0.1, 0.05, 0.05])
    labels[tuple(rng.integers(0, shape, size=(4, 3)).T)] = 23  # a few lung tumours, faces included
    if seed % 3 == 0:
        labels[np.isin(labels, (28, 29, 30, 31, 32)) & (rng.random(shape) < 0.9)] = 200  # sparse lobes
    np.testing.assert_array_equal(removed_unchanged_input(labels), upstream_lung_vote(labels))
