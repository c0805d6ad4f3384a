"""Decoded image → CT in HU, body crop, output label selection, NIfTI affine (reference §8, §11)."""

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
