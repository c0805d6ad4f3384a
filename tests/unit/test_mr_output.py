"""MR outputs keep background 0: NV-Generate-CTMR maps the decoder output x of an MR modality (id >= 8) to
1000·max(x, 0) (scripts/diff_model_infer.py, scripts/utils_infer.py `run_controlnet_conditioned_image_dm`:
a_min 0, a_max 1000, clipped below only) and, with a condition mask, sets every voxel where the mask is 0 to a_min
(scripts/infer_image_from_mask.py `crop_img_body_mask`: CT −1000, MR 0)."""

from __future__ import annotations

import numpy as np

from maisi_cli.engine.postprocess import output_image


def upstream_mr(decoded: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Upstream's arithmetic written out in float64 (maisi rounds to the nearest int16 where upstream truncates)."""
    a_min, a_max, b_min, b_max = 0.0, 1000.0, 0.0, 1.0
    image = (np.clip(decoded.astype(np.float64), b_min, None) - b_min) / (b_max - b_min) * (a_max - a_min) + a_min
    if mask is not None:
        image[mask == 0] = a_min
    return np.rint(image).astype(np.int16)


DECODED = np.array([[[-0.3, 0.0, 0.25], [0.5004, 1.0, 1.7]], [[2.0, -1.0, 0.999], [0.1, 0.2, 0.3]]], np.float32)
MASK = np.array([[[0, 1, 22], [177, 0, 200]], [[200, 0, 3], [0, 0, 1]]], np.uint8)  # maisi label maps are uint8


def test_mr_image_only_is_clipped_below_at_zero_only():
    out = output_image(DECODED, "mr")
    assert out.dtype == np.int16 and out.min() == 0 and out.max() == 2000
    np.testing.assert_array_equal(out, upstream_mr(DECODED, None))


def test_mr_with_a_mask_is_zero_where_the_mask_is_background():
    out = output_image(DECODED, "mr", MASK)
    np.testing.assert_array_equal(out, upstream_mr(DECODED, MASK))
    assert (out[MASK == 0] == 0).all() and out[0, 0, 2] == 250 and out[1, 0, 0] == 2000


def test_ct_with_a_mask_keeps_air_outside():
    out = output_image(DECODED, "hu", MASK)
    assert (out[MASK == 0] == -1000).all() and out[1, 0, 0] == 1000
