"""Tile-seam measures (engine/seams.py) on synthetic images, and the window geometry against MONAI's inferer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maisi_cli.engine.seams import (
    border_gradients,
    monai_tile_borders,
    seam_excess,
    seam_report,
    seam_score,
    tile_borders,
)

# (latent grid, roi, overlap) including the README Table 3 sliding plans and small bench ones
GEOMETRIES = [
    ((16, 16, 16), (8, 8, 8), 0.0),
    ((16, 16, 16), (8, 8, 8), 0.5),
    ((16, 16, 16), (12, 12, 12), 0.25),
    ((16, 16, 16), (6, 6, 6), 0.4),
    ((64, 64, 64), (48, 48, 64), 0.6666),
    ((128, 128, 32), (64, 64, 32), 0.5),
    ((128, 128, 128), (64, 64, 48), 0.4),
    ((128, 128, 192), (80, 80, 96), 0.4),
    ((16, 16, 16), (32, 32, 8), 0.25),  # a ROI larger than the grid is clipped
]


@pytest.mark.parametrize("grid,roi,overlap", GEOMETRIES)
def test_tile_borders_follow_monai(grid, roi, overlap):
    assert tile_borders(grid, roi, overlap) == monai_tile_borders(grid, roi, overlap)


def test_tile_borders_examples():
    assert tile_borders((16, 16, 16), (8, 8, 8), 0.0) == ((32,), (32,), (32,))
    assert tile_borders((16, 16, 16), (8, 8, 8), 0.5) == ((16, 32, 48),) * 3
    assert tile_borders((16, 16, 16), (16, 16, 8), 0.0, zoom=1) == ((), (), (8,))


def test_borders_are_where_the_inferer_changes_window():
    """A predictor that returns a different constant for each window (no blending weights): along each axis the
    inferer's output changes exactly on the border planes."""
    from monai.inferers import SlidingWindowInferer

    grid, roi, overlap, zoom = (12, 16, 10), (5, 8, 10), 0.4, 2
    values = iter(np.random.default_rng(0).uniform(1, 2, 1000).tolist())

    def predictor(window):
        return torch.full((1, 1, *(s * zoom for s in window.shape[2:])), next(values))

    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=overlap, mode="constant")
    out = inferer(torch.zeros(1, 1, *grid), predictor)[0, 0].numpy()
    borders = tile_borders(grid, roi, overlap, zoom)
    for axis in range(3):
        changes = np.abs(np.diff(out, axis=axis)).max(axis=tuple(a for a in range(3) if a != axis))
        assert tuple(int(i) + 1 for i in np.nonzero(changes > 1e-6)[0]) == borders[axis]


def _smooth(shape=(64, 64, 64)):
    """A ramp with a gentle wave: its gradient is about the same everywhere (no preferred planes)."""
    x, y, z = np.meshgrid(*(np.linspace(0, 1, s) for s in shape), indexing="ij")
    return x + 0.7 * y + 0.4 * z + 0.05 * np.sin(7.3 * x + 5.1 * y) * np.cos(6.2 * z)


def test_smooth_image_scores_about_one():
    image = _smooth()
    for roi, overlap in [((8, 8, 8), 0.0), ((8, 8, 8), 0.5), ((12, 12, 12), 0.25)]:
        assert seam_score(image, roi, overlap) == pytest.approx(1.0, abs=0.1)


def test_noise_scores_about_one():
    image = np.random.default_rng(1).normal(size=(1, 64, 64, 64))
    assert seam_score(image, (8, 8, 8), 0.25) == pytest.approx(1.0, abs=0.05)


def test_step_at_tile_borders_scores_high():
    whole = _smooth()
    roi, overlap = (8, 8, 8), 0.0
    borders = tile_borders((16, 16, 16), roi, overlap)
    sliding = whole.copy()
    rng = np.random.default_rng(2)
    # a different offset per tile: steps exactly on the border planes
    for i, xs in enumerate([slice(0, 32), slice(32, 64)]):
        for j, ys in enumerate([slice(0, 32), slice(32, 64)]):
            for k, zs in enumerate([slice(0, 32), slice(32, 64)]):
                sliding[xs, ys, zs] += rng.uniform(-0.2, 0.2)
    assert borders == ((32,), (32,), (32,))
    assert seam_score(sliding, roi, overlap) > 5
    assert seam_excess(sliding, whole, roi, overlap) > 3
    # a step off the borders is not a seam
    shifted = whole.copy()
    shifted[:20] += 0.2
    assert seam_excess(shifted, whole, roi, overlap) == pytest.approx(0.0, abs=1e-9)


def test_identical_and_uniformly_offset_decodes_have_no_excess():
    whole = _smooth()
    assert seam_excess(whole, whole, (8, 8, 8), 0.25) == 0.0
    assert seam_excess(torch.from_numpy(whole + 0.3), whole, (8, 8, 8), 0.25) == pytest.approx(0.0, abs=1e-6)


def test_single_window_has_no_borders():
    image = _smooth()
    assert math.isnan(seam_score(image, (16, 16, 16), 0.25))
    assert math.isnan(seam_excess(image, image, (32, 32, 32), 0.25))
    report = seam_report(image, image, (16, 16, 16), 0.25)
    assert report["seam_score_sliding"] is None and report["max_abs_diff"] == 0.0


def test_border_gradients_counts_planes():
    image = np.zeros((8, 8, 8))
    image[4:] = 1.0
    result = border_gradients(image, ((4,), (), ()))
    assert result.border_planes == 1
    assert result.border == 1.0 and result.inside == 0.0
    assert math.isnan(result.score)


def test_report_and_shape_checks():
    whole = _smooth()
    report = seam_report(whole + 0.01, whole, (8, 8, 8), 0.5)
    assert report["border_planes"] == [[16, 32, 48]] * 3
    assert report["max_abs_diff"] == pytest.approx(0.01)
    with pytest.raises(ValueError):
        seam_excess(whole, whole[:-4], (8, 8, 8), 0.5)
    with pytest.raises(ValueError):
        seam_score(whole[:-1], (8, 8, 8), 0.5)


def test_anisotropic_image_is_judged_per_axis():
    """Smooth along z (fine spacing), rough along x and y: borders on z planes only compare with z differences."""
    rng = np.random.default_rng(3)
    image = np.repeat(rng.normal(size=(64, 64, 1)), 64, axis=2) + np.linspace(0, 1, 64)[None, None, :]
    roi = (16, 16, 8)  # tiles z only
    assert tile_borders((16, 16, 16), roi, 0.0) == ((), (), (32,))
    assert seam_score(image, roi, 0.0) == pytest.approx(1.0, abs=1e-6)
    stepped = image.copy()
    stepped[..., 32:] += 0.1
    assert seam_excess(stepped, image, roi, 0.0) > 5
