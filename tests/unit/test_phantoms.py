"""Synthetic CT phantoms (engine/phantoms.py): labels, anatomy, tumours, HU statistics, determinism, resolution."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import ndimage

from maisi_cli.engine import phantoms
from maisi_cli.engine.phantoms import (LEFT_RIBS, LUNG_LOBES, ORGANS, PHANTOM_LABELS, RIGHT_RIBS, VERTEBRAE, Grid,
                                       labels_at, make_phantom)
from maisi_cli.engine.qc import check_quality, load_statistics

FULL = ((64, 64, 64), (6.0, 6.0, 6.0))  # the phantom's whole 384 mm field of view
QC_ORGANS = ("liver", "spleen", "pancreas", "kidney", "lung", "bone")


@pytest.fixture(scope="module")
def statistics():
    return load_statistics()


def centroid(labels: np.ndarray, grid: Grid, ids) -> np.ndarray:
    """World (RAS, mm) centre of the voxels carrying any of `ids`."""
    where = np.nonzero(np.isin(labels, np.atleast_1d(ids)))
    assert where[0].size, f"labels {ids} absent"
    return np.array([grid.axis(i)[where[i]].mean() for i in range(3)])


def test_label_ids_are_the_dictionary_ids():
    assert (phantoms.LIVER, phantoms.SPLEEN, phantoms.PANCREAS, phantoms.RIGHT_KIDNEY, phantoms.LEFT_KIDNEY,
            phantoms.AORTA, phantoms.STOMACH) == (1, 3, 4, 5, 14, 6, 12)
    assert LUNG_LOBES == (28, 29, 30, 31, 32)
    assert VERTEBRAE == tuple(range(33, 50))  # L5 … L1, T12 … T1
    assert LEFT_RIBS == tuple(range(63, 75)) and RIGHT_RIBS == tuple(range(75, 87))
    assert (phantoms.HEPATIC_TUMOUR, phantoms.LUNG_TUMOUR) == (26, 23)


def test_label_set_of_a_phantom():
    phantom = make_phantom(*FULL, seed=0)
    present = set(np.unique(phantom.labels).tolist()) - {0}
    assert present <= PHANTOM_LABELS
    assert set(ORGANS) | {200} <= present
    assert len(present & set(VERTEBRAE)) >= 15 and len(present & set(LEFT_RIBS)) >= 10
    assert len(present & set(RIGHT_RIBS)) >= 10
    assert not present & {23, 26}  # tumours only when asked
    assert phantom.labels.dtype == np.uint8 and phantom.image.dtype == np.int16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_organ_lies_inside_the_body_where_it_belongs(seed):
    phantom = make_phantom(*FULL, seed=seed)
    grid, labels = Grid(*FULL), phantom.labels
    outside = ndimage.binary_dilation(labels == 0)
    assert not np.any(outside & (labels != 0) & (labels != 200)), "an organ touches the air"
    # RAS: +x is the patient's right, +z the head.
    for right in (phantoms.LIVER, phantoms.RIGHT_KIDNEY, 30, 31, 32):
        assert centroid(labels, grid, right)[0] > 10, right
    for left in (phantoms.SPLEEN, phantoms.LEFT_KIDNEY, phantoms.STOMACH, 28, 29):
        assert centroid(labels, grid, left)[0] < -10, left
    assert centroid(labels, grid, LEFT_RIBS)[0] < -50 and centroid(labels, grid, RIGHT_RIBS)[0] > 50
    # Lobes: the oblique fissure puts the lower lobes behind and below; the middle lobe lies below the upper one.
    for upper, lower in ((28, 29), (30, 32)):
        upper_centre, lower_centre = centroid(labels, grid, upper), centroid(labels, grid, lower)
        assert upper_centre[2] > lower_centre[2] and upper_centre[1] > lower_centre[1], (upper, lower)
    assert centroid(labels, grid, 30)[2] > centroid(labels, grid, 31)[2]
    lungs, liver = centroid(labels, grid, LUNG_LOBES), centroid(labels, grid, phantoms.LIVER)
    assert lungs[2] > liver[2] + 60
    liver_top = grid.axis(2)[np.nonzero(labels == phantoms.LIVER)[2].max()]
    right_lung_top = grid.axis(2)[np.nonzero(np.isin(labels, (30, 31, 32)))[2].max()]
    assert liver_top < right_lung_top
    heights = [centroid(labels, grid, v)[2] for v in VERTEBRAE if np.any(labels == v)]
    assert heights == sorted(heights)  # L5 at the bottom … T1 at the top
    assert centroid(labels, grid, phantoms.AORTA)[1] > centroid(labels, grid, VERTEBRAE)[1]  # in front of the spine


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tumours_lie_inside_their_host_and_change_nothing_else(seed):
    grid = FULL
    plain, with_tumours = make_phantom(*grid, seed=seed), make_phantom(*grid, seed=seed, tumours=True)
    hepatic, lung = with_tumours.labels == 26, with_tumours.labels == 23
    assert hepatic.sum() >= 5 and lung.sum() >= 3
    assert np.all(plain.labels[hepatic] == phantoms.LIVER)
    hosts = np.unique(plain.labels[lung])
    assert len(hosts) == 1 and int(hosts[0]) in LUNG_LOBES
    rest = ~(hepatic | lung)
    assert np.array_equal(plain.labels[rest], with_tumours.labels[rest])
    assert np.array_equal(plain.image[rest], with_tumours.image[rest])
    assert np.median(with_tumours.image[hepatic]) < np.median(with_tumours.image[with_tumours.labels == 1]) - 15


def assert_passes_qc(phantom, statistics):
    report = check_quality(phantom.image, phantom.labels, statistics)
    assert report.passed, report.summary()
    verdicts = {r.organ: r.verdict for r in report.organs}
    assert all(verdicts[organ] == "pass" for organ in QC_ORGANS), verdicts  # present, not just "absent"


@pytest.mark.parametrize("seed", range(10))
def test_hu_medians_pass_qc_at_64_cubed_4_mm(seed, statistics):
    assert_passes_qc(make_phantom((64, 64, 64), (4.0, 4.0, 4.0), seed, tumours=seed % 2 == 1), statistics)


@pytest.mark.parametrize("size, spacing, seed", [((48, 40, 56), (7.0, 6.0, 7.5), 11),
                                                 ((96, 96, 40), (3.5, 3.5, 9.0), 12),
                                                 ((32, 32, 32), (12.0, 12.0, 12.0), 13)])
def test_hu_medians_pass_qc_at_other_sizes_and_anisotropic_spacing(size, spacing, seed, statistics):
    phantom = make_phantom(size, spacing, seed)
    assert phantom.image.shape == size
    assert_passes_qc(phantom, statistics)


def test_tissue_intensities(statistics):
    phantom = make_phantom((64, 64, 64), (4.0, 4.0, 4.0), 5)
    image, labels = phantom.image, phantom.labels
    assert image.min() >= -1000 and image.max() <= 1000
    assert np.median(image[labels == 0]) <= -990  # air
    assert -900 < np.median(image[np.isin(labels, LUNG_LOBES)]) < -780
    assert 40 < np.median(image[labels == phantoms.LIVER]) < 140
    bone = np.median(image[np.isin(labels, VERTEBRAE + LEFT_RIBS + RIGHT_RIBS)])
    assert 250 < bone < 750
    body = image[labels == 200]
    assert np.percentile(body, 10) < -60 < 20 < np.percentile(body, 90)  # fat and soft tissue both there
    assert 5 < float(np.std(image[labels == phantoms.LIVER])) < 40  # noise and texture, not a flat fill


def test_same_seed_same_arrays_other_seed_other_arrays():
    a, b = make_phantom((40, 40, 40), (9.6, 9.6, 9.6), 7), make_phantom((40, 40, 40), (9.6, 9.6, 9.6), 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.affine, b.affine)
    c = make_phantom((40, 40, 40), (9.6, 9.6, 9.6), 8)
    assert not np.array_equal(a.labels, c.labels) and not np.array_equal(a.image, c.image)


def test_same_anatomy_at_two_resolutions():
    coarse, fine = make_phantom((64, 64, 64), (6.0,) * 3, 3), make_phantom((128, 128, 128), (3.0,) * 3, 3)
    for organ in (phantoms.LIVER, phantoms.SPLEEN, phantoms.RIGHT_KIDNEY, phantoms.STOMACH):
        volume_coarse = np.sum(coarse.labels == organ) * 6.0 ** 3
        volume_fine = np.sum(fine.labels == organ) * 3.0 ** 3
        assert abs(volume_coarse / volume_fine - 1) < 0.05, organ
        shift = centroid(coarse.labels, Grid((64,) * 3, (6.0,) * 3), organ) - centroid(
            fine.labels, Grid((128,) * 3, (3.0,) * 3), organ)
        assert np.all(np.abs(shift) < 3.0), (organ, shift)
    liver_ml = np.sum(fine.labels == phantoms.LIVER) * 27 / 1000
    assert 900 < liver_ml < 2600  # an adult liver


def test_labels_at_points_agree_with_the_grid():
    """The point canvas (used to place tumours) and the grid canvas paint the same anatomy."""
    grid = Grid((48, 48, 48), (8.0, 8.0, 8.0))
    phantom = make_phantom(grid.size, grid.spacing, 4)
    anatomy = phantom.anatomy
    rng = np.random.default_rng(0)
    voxels = np.stack([rng.integers(0, n, 600) for n in grid.size], axis=1)
    world = np.stack([grid.axis(i)[voxels[:, i]] for i in range(3)], axis=1) - np.asarray(anatomy.shift)
    yaw = math.radians(anatomy.yaw)
    frame = np.stack([math.cos(yaw) * world[:, 0] + math.sin(yaw) * world[:, 1],
                      -math.sin(yaw) * world[:, 0] + math.cos(yaw) * world[:, 1], world[:, 2]], axis=1)
    expected = phantom.labels[voxels[:, 0], voxels[:, 1], voxels[:, 2]]
    assert np.mean(labels_at(anatomy, frame) == expected) > 0.98
    assert len(set(expected.tolist())) > 5


def test_grid_is_centred_ras():
    grid = Grid((4, 6, 5), (2.0, 1.5, 3.0))
    assert np.allclose(grid.axis(0), [-3, -1, 1, 3]) and np.allclose(grid.axis(2), [-6, -3, 0, 3, 6])
    expected = np.array([[2, 0, 0, -3], [0, 1.5, 0, -3.75], [0, 0, 3, -6], [0, 0, 0, 1]])
    assert np.allclose(grid.affine, expected)
    assert phantoms.default_spacing((64, 128, 256)) == (6.0, 3.0, 1.5)


def test_a_64_cubed_phantom_is_fast():
    make_phantom((64, 64, 64), (4.0,) * 3, 0)  # warm caches (label dictionary, imports)
    started = time.perf_counter()
    make_phantom((64, 64, 64), (4.0,) * 3, 1, tumours=True)
    seconds = time.perf_counter() - started
    print(f"64^3 phantom: {seconds:.3f} s")
    assert seconds < 10  # about 0.03 s on 2 CPU cores; loose so a loaded machine does not fail it
