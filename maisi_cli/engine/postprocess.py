"""Decoded image → CT in HU (or MR intensities), body crop, output label selection, NIfTI affine (reference §8,
§11)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from maisi_cli.cpus import usable_cpus

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


BLOCK_VOXELS = 1 << 20  # output_image converts the volume in slabs of about this many voxels (4 MiB of float32)
MAX_THREADS = 8


def output_threads() -> int:
    """Threads that convert slabs at once: the CPUs this process may run on, at most MAX_THREADS."""
    return usable_cpus(MAX_THREADS)


def _hu_slab(decoded: np.ndarray, body: np.ndarray | None) -> np.ndarray:
    """intensity_to_hu, air_outside_body and hu_to_int16's float32 operations, in place on one slab's copy: the
    same operations in the same order, so the same values."""
    hu = decoded.astype(np.float32)
    np.clip(hu, 0.0, 1.0, out=hu)
    hu *= HU_MAX - HU_MIN
    hu += HU_MIN
    if body is not None:
        np.copyto(hu, np.float32(HU_MIN), where=~(body > 0))
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return np.rint(hu, out=hu)


def _mr_slab(decoded: np.ndarray, body: np.ndarray | None) -> np.ndarray:
    """intensity_to_mr and mr_to_int16 in place on one slab's copy; 0 where the condition mask is background."""
    mr = decoded.astype(np.float32)
    np.clip(mr, 0.0, None, out=mr)
    mr *= MR_SCALE
    np.clip(mr, 0.0, INT16_MAX, out=mr)
    np.rint(mr, out=mr)
    if body is not None:
        np.copyto(mr, np.float32(0.0), where=body == 0)
    return mr


def output_image(decoded: np.ndarray, intensity: str, label_map: np.ndarray | None = None) -> np.ndarray:
    """The written int16 image of a decoded volume: "hu" → HU, "mr" → MR intensities; where a condition mask
    (`label_map`) is background, the range's floor (a_min of NV-Generate-CTMR `infer_image_from_mask.py`: CT −1000,
    MR 0).

    The volume is converted slab by slab on several threads (NumPy releases the GIL): each slab's float32 copy stays
    in the cache and no whole-volume float32 temporary is made; the values are those of intensity_to_hu,
    air_outside_body and hu_to_int16 (or intensity_to_mr and mr_to_int16) applied to the whole volume."""
    if intensity not in ("hu", "mr"):
        raise ValueError(f"output intensity {intensity!r}: use 'hu' or 'mr'")
    if label_map is not None and label_map.shape != decoded.shape:
        raise ValueError(f"label map shape {label_map.shape} differs from the image's {decoded.shape}")
    convert: Callable[[np.ndarray, np.ndarray | None], np.ndarray] = _hu_slab if intensity == "hu" else _mr_slab
    output = np.empty(decoded.shape, dtype=np.int16)
    if decoded.ndim == 0 or decoded.size == 0:
        output[...] = convert(decoded, label_map)
        return output
    rows = max(1, BLOCK_VOXELS // max(1, decoded[0].size))
    slabs = [slice(start, start + rows) for start in range(0, decoded.shape[0], rows)]

    def run(slab: slice) -> None:
        output[slab] = convert(decoded[slab], None if label_map is None else label_map[slab])

    threads = min(output_threads(), len(slabs))
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="maisi-output") as pool:
            list(pool.map(run, slabs))
    else:
        for slab in slabs:
            run(slab)
    return output


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
