"""Decoded image → CT in HU, body crop, written label content, affine (reference §8, §11; checklist item 7)."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_cli.engine.postprocess import air_outside_body, hu_to_int16, intensity_to_hu, output_labels, ras_affine


def test_intensity_to_hu_linear_map():
    """0 → −1000 HU (air), 0.5 → 0 HU (water), 1 → +1000 HU, linear in between (HU = 2000·x − 1000)."""
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0], dtype=np.float32)
    hu = intensity_to_hu(x)
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu, [-1000, -500, 0, 500, 1000], atol=1e-3)


def test_intensity_to_hu_clips():
    """Values outside [0, 1] clip: nothing below −1000 or above +1000 HU can come out."""
    hu = intensity_to_hu(np.array([-0.5, -1e-3, 1.001, 7.0], dtype=np.float32))
    np.testing.assert_array_equal(hu, [-1000, -1000, 1000, 1000])


def test_intensity_to_hu_keeps_shape_and_accepts_fp16():
    """A 3-D fp16 decoder output maps voxel by voxel, as float32."""
    x = np.random.default_rng(0).random((4, 5, 6)).astype(np.float16)
    hu = intensity_to_hu(x)
    assert hu.shape == (4, 5, 6) and hu.dtype == np.float32
    np.testing.assert_allclose(hu, 2000 * x.astype(np.float32) - 1000, atol=1e-3)


def test_air_outside_body():
    """Where the condition mask is 0 the image becomes −1000 HU; every labelled voxel, body (200) included, keeps
    its value."""
    hu = np.array([[[10.0, 20.0, 30.0, 40.0]]], dtype=np.float32)
    mask = np.array([[[0, 200, 1, 0]]], dtype=np.uint8)
    out = air_outside_body(hu, mask)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[[-1000, 20, 30, -1000]]])
    np.testing.assert_array_equal(hu, [[[10, 20, 30, 40]]])  # input untouched


def test_air_outside_body_whole_volume():
    """On a full volume: outside voxels are all −1000, inside voxels unchanged."""
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1000, 1000, (8, 8, 8)).astype(np.float32)
    mask = (rng.random((8, 8, 8)) > 0.5).astype(np.uint8) * 200
    out = air_outside_body(hu, mask)
    assert (out[mask == 0] == -1000).all()
    np.testing.assert_array_equal(out[mask > 0], hu[mask > 0])


def test_hu_to_int16_rounds_and_clips():
    """HU are written as int16, rounded to the nearest integer, within [−1000, 1000]."""
    hu = np.array([12.4, 12.6, -3.7, -0.2, 999.9, 1500.0, -2000.0, -999.6], dtype=np.float32)
    out = hu_to_int16(hu)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [12, 13, -4, 0, 1000, 1000, -1000, -1000])


def test_hu_to_int16_full_range():
    """The whole HU range survives the int16 conversion to within half an HU."""
    hu = intensity_to_hu(np.linspace(0, 1, 4001, dtype=np.float32))
    out = hu_to_int16(hu)
    assert out.min() == -1000 and out.max() == 1000
    assert np.abs(out.astype(np.float32) - hu).max() <= 0.5 + 1e-3


LABELS = np.array([[[0, 1, 3, 28], [200, 1, 29, 0]]], dtype=np.int16)


def test_output_labels_full_mode():
    """`full` writes the condition mask itself, as uint8."""
    out = output_labels(LABELS, "full")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, LABELS)


def test_output_labels_requested_mode():
    """`requested` keeps only the requested anatomies, with their own ids (not renumbered); body and the rest → 0."""
    out = output_labels(LABELS, "requested", [1, 28])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 1, 0, 28], [0, 1, 0, 0]]])


def test_output_labels_requested_accepts_any_iterable():
    """Requested ids may come as a tuple, set or generator; none requested gives an empty label map."""
    expected = [[[0, 0, 3, 0], [0, 0, 29, 0]]]
    np.testing.assert_array_equal(output_labels(LABELS, "requested", (3, 29)), expected)
    np.testing.assert_array_equal(output_labels(LABELS, "requested", {29, 3}), expected)
    np.testing.assert_array_equal(output_labels(LABELS, "requested", (i for i in (3, 29))), expected)
    assert not output_labels(LABELS, "requested", []).any()


@pytest.mark.parametrize("spacing,origin", [((1.5, 1.5, 2.0), (0.0, 0.0, 0.0)), ((0.75, 0.8, 1.25), (-10.0, 5.5, 3.0))])
def test_ras_affine(spacing, origin):
    """The NIfTI affine is diag(spacing) with the origin in the last column."""
    affine = ras_affine(spacing, origin)
    assert affine.shape == (4, 4)
    expected = np.eye(4)
    expected[0, 0], expected[1, 1], expected[2, 2] = spacing
    expected[:3, 3] = origin
    np.testing.assert_array_equal(affine, expected)


def test_ras_affine_default_origin_is_zero():
    """Without an origin the volume starts at (0, 0, 0)."""
    np.testing.assert_array_equal(ras_affine((1.5, 1.5, 1.5))[:3, 3], [0, 0, 0])
    np.testing.assert_array_equal(np.diag(ras_affine((1.5, 1.5, 1.5))), [1.5, 1.5, 1.5, 1.0])
