"""Decoded image → CT in HU (or MR intensities), body crop, output label selection, NIfTI affine (reference §8,
§11)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

HU_MIN, HU_MAX = -1000.0, 1000.0


def intensity_to_hu(image: np.ndarray) -> np.ndarray:
    """VAE output in [0, 1] → HU: 2000·clip(x, 0, 1) − 1000 (nothing above +1000 HU can come out)."""
    return np.clip(image.astype(np.float32), 0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN


def air_outside_body(hu: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """Voxels where the condition mask is background become air (−1000 HU); body (200) counts as inside."""
    return np.where(label_map > 0, hu, np.float32(HU_MIN)).astype(np.float32)


def hu_to_int16(hu: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(hu, HU_MIN, HU_MAX)).astype(np.int16)


MR_SCALE = 1000.0
INT16_MAX = float(np.iinfo(np.int16).max)


def intensity_to_mr(image: np.ndarray) -> np.ndarray:
    """VAE output → MR intensity: 1000·x clipped below at 0 only (NV-Generate-CTMR `diff_model_infer.py` for MR
    modalities: [0, 1] → [0, 1000]; values above 1 survive, as the MR training data were scaled by the 99.5th
    percentile without clipping)."""
    return np.clip(image.astype(np.float32), 0.0, None) * MR_SCALE


def mr_to_int16(mr: np.ndarray) -> np.ndarray:
    """int16 as the CT images; the top is clipped only where int16 ends (32767, about 33 times the 0..1 range)."""
    return np.rint(np.clip(mr, 0.0, INT16_MAX)).astype(np.int16)


def output_image(decoded: np.ndarray, intensity: str, label_map: np.ndarray | None = None) -> np.ndarray:
    """The written int16 image of a decoded volume: "hu" → HU, "mr" → MR intensities; where a condition mask
    (`label_map`) is background, the range's floor (a_min of NV-Generate-CTMR `infer_image_from_mask.py`: CT −1000,
    MR 0)."""
    if intensity == "mr":
        mr = mr_to_int16(intensity_to_mr(decoded))
        if label_map is not None:
            mr[label_map == 0] = 0  # in place: no second volume
        return mr
    if intensity != "hu":
        raise ValueError(f"output intensity {intensity!r}: use 'hu' or 'mr'")
    hu = intensity_to_hu(decoded)
    return hu_to_int16(air_outside_body(hu, label_map) if label_map is not None else hu)


def output_labels(label_map: np.ndarray, mode: str, requested_ids: Iterable[int] = ()) -> np.ndarray:
    """The label file's content. `full`: the whole condition mask. `requested`: only the requested anatomies,
    keeping their dictionary ids (the reference renumbers them 1..N, which loses what each label is)."""
    labels = label_map.astype(np.uint8)
    if mode == "full":
        return labels
    if mode != "requested":
        raise ValueError(f"label mode {mode!r}: use 'full' or 'requested'")
    keep = np.isin(labels, np.fromiter(requested_ids, dtype=np.int64))
    return np.where(keep, labels, 0).astype(np.uint8)


def ras_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine
