"""engine/postprocess.output_image converts the decoded volume slab by slab on threads: its int16 image equals the
whole-volume formulation (intensity_to_hu → air_outside_body → hu_to_int16; intensity_to_mr → mr_to_int16 → 0 outside
the body) voxel for voxel, for either memory order of the label map and any slab size."""

from __future__ import annotations

import numpy as np
import pytest

from maisi_cli.engine import postprocess as pp


def whole_volume(decoded: np.ndarray, intensity: str, label_map: np.ndarray | None) -> np.ndarray:
    if intensity == "mr":
        mr = pp.mr_to_int16(pp.intensity_to_mr(decoded))
        if label_map is not None:
            mr[label_map == 0] = 0
        return mr
    hu = pp.intensity_to_hu(decoded)
    return pp.hu_to_int16(pp.air_outside_body(hu, label_map) if label_map is not None else hu)


@pytest.mark.parametrize("intensity", ["hu", "mr"])
@pytest.mark.parametrize("block", [7 * 11, 1 << 20])  # many slabs of a row or less; one slab
def test_slabs_equal_the_whole_volume_formulation(intensity, block, monkeypatch):
    monkeypatch.setattr(pp, "BLOCK_VOXELS", block)
    rng = np.random.default_rng(1)
    decoded = rng.normal(0.5, 0.7, (23, 7, 11)).astype(np.float32)  # outside [0, 1] too: clipped
    # values on the rounding edges of 2000·x − 1000 and 1000·x
    decoded.flat[:12] = [0.0, 1.0, 0.5, 0.00025, 0.00075, 0.49975, 1.0000001, 0.9999999, -0.0, 33.0, 0.0005, 0.0015]
    labels = rng.integers(0, 3, decoded.shape).astype(np.uint8)
    for label_map in (None, labels, np.asfortranarray(labels)):
        expected = whole_volume(decoded, intensity, label_map)
        got = pp.output_image(decoded, intensity, label_map)
        assert got.dtype == np.int16 and got.shape == decoded.shape
        np.testing.assert_array_equal(got, expected)


def test_a_label_map_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="label map shape"):
        pp.output_image(np.zeros((4, 4, 4), np.float32), "hu", np.zeros((4, 4, 5), np.uint8))
