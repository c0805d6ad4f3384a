"""Random augmentation of a condition label map before sampling (reference §9.6, `scripts/augmentation.py`).

Exactly one branch runs: the first tumour label present among 128 (bone lesion), 26 (hepatic), 23 (lung),
24 (pancreatic) and 27 (colon cancer) is moved by a random MONAI transform and kept inside its host region; with no
tumour, the whole map gets a ±1 % random zoom. Differences from the reference, all deliberate:

- Seeding: every call is fully determined by `seed`. The transforms are seeded once per call and successive tries
  draw successive values (the reference re-seeds each call identically and, from its CLI, seeds by `id()` of a
  string, so its augmentation is not reproducible across runs).
- Every retry loop is bounded (`MAX_TRIES`); when no try is accepted the map comes back unchanged, the tumour where
  it was. The reference loops without bound.
- The tumour branches work on a crop around the tumour (see `tumour_window`) and rotate/scale the tumour about its
  own centre. The reference transforms the whole volume about the volume's centre, so a ±15 % scale can carry a
  peripheral lesion tens of voxels away, and the lung branch's ±π turn about z can carry a tumour into the other lung.
- The body branch works on the voxel array only; the caller keeps the requested affine (see `augment_body`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Rand3DElastic, RandAffine, RandZoom
from monai.transforms.utils_morphological_ops import dilate, erode
from monai.utils import convert_to_tensor

from maisi_cli.config import FloatTriple
from maisi_cli.labels import BODY_LABEL

# Bound on every retry loop (the reference has none); after it the map is returned unchanged.
MAX_TRIES = 100
CLOSING_SIZE = 5  # the reference's 5³ closing, for host regions and for the accepted tumour
LUNG_LOBES = (28, 29, 30, 31, 32)
BONES = (*range(33, 57), *range(63, 98), 114, 127)
# Rand3DElastic's offset field is uniform noise in [-1, 1] smoothed by a Gaussian (sigma 5–8) and scaled by the
# magnitude (≤ 200): measured per-axis std ≈ 1.6 voxels, max ≈ 7 over a 160³ grid. 12 voxels is ≈ 7.5 std;
# a try whose field goes further anyway is rejected (see `place_tumour`), so the crop stays exact.
ELASTIC_REACH = 12
# Distance kept between the moved tumour and any crop face that is not a face of the volume: a 5³ closing reads
# 4 voxels around each output voxel, and the crop faces are padded with 1 (see `closing`); 8 keeps every value
# the tumour can meet identical to the whole-volume result.
GUARD = 8


@dataclass(frozen=True)
class TumourBranch:
    name: str
    tumour: int
    host: tuple[int, ...]  # labels of the region the moved tumour must stay in (the old tumour site is added)
    close_host: bool  # close that region with a 5³ element
    fill: int | None  # label painted on the tumour's old site; None: the dominant neighbouring lung lobe
    elastic: bool  # Rand3DElastic (sigma 5–8, magnitude 100–200), else RandAffine
    translate: FloatTriple  # ± voxels per axis
    rotate: FloatTriple  # ± radians per axis
    scale: FloatTriple  # ± fraction per axis
    threshold: float  # accepted when (moved tumour inside the region) / (original tumour) reaches this
    relaxed: tuple[int, float] | None = None  # (tries, threshold): a lower threshold from that try on
    keep_after: int | None = None  # from that try on, the undistorted tumour is tried (and always passes)


# The order is the reference's priority: the first tumour present wins.
BRANCHES: tuple[TumourBranch, ...] = (
    TumourBranch("bone lesion", 128, BONES, close_host=False, fill=BODY_LABEL, elastic=False,
                 translate=(5, 5, 0), rotate=(0, 0, 0.1), scale=(0.15, 0.15, 0), threshold=0.8,
                 relaxed=(40, 0.75)),
    TumourBranch("hepatic tumour", 26, (1,), close_host=True, fill=1, elastic=True,
                 translate=(10, 10, 10), rotate=(math.pi / 36,) * 3, scale=(0.2, 0.2, 0.2), threshold=0.8),
    TumourBranch("lung tumour", 23, LUNG_LOBES, close_host=True, fill=None, elastic=True,
                 translate=(20, 20, 20), rotate=(math.pi / 36, math.pi / 36, math.pi), scale=(0.15, 0.15, 0.15),
                 threshold=0.85),
    TumourBranch("pancreatic tumour", 24, (4,), close_host=True, fill=4, elastic=True,
                 translate=(15, 15, 15), rotate=(math.pi / 36,) * 3, scale=(0.1, 0.1, 0.1), threshold=0.8),
    TumourBranch("colon cancer", 27, (62,), close_host=True, fill=62, elastic=True,
                 translate=(5, 5, 5), rotate=(math.pi / 36,) * 3, scale=(0.1, 0.1, 0.1), threshold=0.8,
                 keep_after=20),
)
BRANCH_BY_LABEL = {b.tumour: b for b in BRANCHES}


def augment_mask(labels: np.ndarray, seed: int, device: str | torch.device = "cpu") -> np.ndarray:
    """A randomly augmented copy of a uint8 (X, Y, Z) label map, fully determined by `seed`."""
    if labels.ndim != 3 or labels.dtype != np.uint8:
        raise ValueError(f"augment_mask needs a uint8 (X, Y, Z) label map, got {labels.dtype} of shape {labels.shape}")
    branch = choose_branch(labels)
    if branch is None:
        return augment_body(labels, seed, device)
    return augment_tumour(labels, branch, seed, device)


def choose_branch(labels: np.ndarray) -> TumourBranch | None:
    """The branch of the first tumour label present (reference order), or None for the body branch."""
    counts = np.bincount(labels.reshape(-1), minlength=256)  # one pass; np.unique would sort 512³ voxels
    return next((b for b in BRANCHES if counts[b.tumour] > 0), None)


# ----- body branch -----


def augment_body(labels: np.ndarray, seed: int, device: str | torch.device = "cpu") -> np.ndarray:
    """Isotropic random zoom in [0.99, 1.01], nearest, same shape (MONAI `RandZoom`, keep_size, edge padding as
    in the reference).

    The reference zoomed a MetaTensor, which also rescaled its affine, so the written spacing drifted by up to ±1 %
    from the requested one. Here only the voxel array is zoomed; the caller writes it with the requested affine.
    """
    zoom = RandZoom(min_zoom=0.99, max_zoom=1.01, mode="nearest", prob=1.0, keep_size=True)
    zoom.set_random_state(seed=seed)
    volume = torch.as_tensor(labels[None], device=torch.device(device))
    out = convert_to_tensor(zoom(volume), track_meta=False)
    return np.rint(out[0].cpu().numpy()).astype(np.uint8)


# ----- morphology (MONAI's helpers, padded with 1 like the reference's own dilate3d/erode3d) -----


def dilation(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary dilation with a size³ cube. The reference pads with 1.0, so voxels near the volume faces dilate."""
    return dilate(mask[None, None].float(), filter_size=size, pad_value=1.0)[0, 0] > 0


def closing(mask: torch.Tensor, size: int = CLOSING_SIZE) -> torch.Tensor:
    """Binary closing (dilate, then erode) with a size³ cube, both padded with 1.0 as in the reference. That is the
    closing of (mask ∪ outside of the volume), so it stays monotone and idempotent: the closing of a set inside a
    closed region stays inside the region."""
    grown = dilate(mask[None, None].float(), filter_size=size, pad_value=1.0)
    return erode(grown, filter_size=size, pad_value=1.0)[0, 0] > 0


# ----- tumour branches -----


@dataclass(frozen=True)
class Window:
    """Where a tumour branch works.

    `work` is a box centred on the tumour's bounding box (it may reach outside the volume: MONAI rotates and scales
    about the centre of the array it is given); `crop` is its part inside the volume; `inner` (in crop coordinates)
    is where an accepted moved tumour must lie.
    """
    work_start: tuple[int, ...]
    work_shape: tuple[int, ...]
    crop: tuple[slice, ...]  # in volume coordinates
    crop_in_work: tuple[slice, ...]  # the same voxels in work-box coordinates
    inner: tuple[slice, ...]  # in crop coordinates


def tumour_reach(extent: np.ndarray, branch: TumourBranch) -> float:
    """How far (voxels, from the tumour's centre) a moved tumour voxel can land.

    Output voxel v (relative to the centre) samples the input at M·(v + δ) + t, with M a rotation times scales
    ≥ s_min, t the translation and δ the elastic offset. It is tumour only if that point is within the tumour's
    half-extent e, so |v| ≤ (|e| + |t|) / s_min + |δ|, with one voxel more for nearest rounding.
    """
    half = np.asarray(extent, dtype=float) / 2 + 0.5
    s_min = 1.0 - max(branch.scale)
    reach = (np.linalg.norm(half) + np.linalg.norm(branch.translate)) / s_min + 1.0
    return float(reach + (ELASTIC_REACH if branch.elastic else 0.0))


def tumour_window(tumour: np.ndarray, branch: TumourBranch) -> Window:
    """The crop a tumour branch works on.

    The crop is exact: nothing outside it can change. The old site is inside the tumour's bounding box, and the moved
    tumour lands within `tumour_reach` of the tumour's centre (an accepted try is checked to lie in `inner`); its
    closing cannot leave the moved tumour's bounding box except towards a volume face, where the crop reaches the
    face. The host region and the closing read at most 4 voxels around each voxel they decide, and `inner` keeps
    `GUARD` voxels from every crop face that is not a volume face, so they see exactly what they would see in the
    whole volume. Cropped faces that are volume faces get the same 1-padding as the whole volume would.
    """
    coords = np.nonzero(tumour)
    lo = np.array([c.min() for c in coords])
    hi = np.array([c.max() for c in coords])
    reach = tumour_reach(hi - lo, branch)
    shape = np.array(tumour.shape)
    margin = np.ceil(reach - (hi - lo) / 2).astype(int)  # reach measured from the centre, margin from the box
    work_start = lo - margin - GUARD
    work_stop = hi + 1 + margin + GUARD  # symmetric about the tumour's centre
    crop_start = np.maximum(work_start, 0)
    crop_stop = np.minimum(work_stop, shape)
    inner_start = np.maximum(lo - margin, 0) - crop_start
    inner_stop = np.minimum(hi + 1 + margin, shape) - crop_start
    return Window(
        work_start=tuple(int(v) for v in work_start),
        work_shape=tuple(int(v) for v in work_stop - work_start),
        crop=tuple(slice(int(a), int(b)) for a, b in zip(crop_start, crop_stop)),
        crop_in_work=tuple(slice(int(a - w), int(b - w)) for a, b, w in zip(crop_start, crop_stop, work_start)),
        inner=tuple(slice(int(a), int(b)) for a, b in zip(inner_start, inner_stop)),
    )


def make_transform(branch: TumourBranch, seed: int, device: torch.device):
    """The branch's MONAI transform (nearest, zero padding), seeded once: successive calls draw successive values."""
    common = dict(prob=1.0, translate_range=branch.translate, rotate_range=branch.rotate,
                  scale_range=branch.scale, mode="nearest", padding_mode="zeros", device=device)
    if branch.elastic:
        transform = Rand3DElastic(sigma_range=(5, 8), magnitude_range=(100, 200), **common)
    else:
        transform = RandAffine(**common)
    transform.set_random_state(seed=seed)
    return transform


def dominant_neighbour_lobe(crop: torch.Tensor, tumour: torch.Tensor) -> int | None:
    """The most frequent lung lobe (28–32) in the 1-voxel ring around the tumour (ties: the lower id), or None."""
    lobes = torch.tensor(LUNG_LOBES, dtype=crop.dtype, device=crop.device)
    ring = dilation(tumour, 3) & ~tumour & torch.isin(crop, lobes)
    if not bool(ring.any()):
        return None
    counts = torch.bincount(crop[ring].long(), minlength=256)
    return int(torch.argmax(counts))  # argmax returns the first maximum


def refill_old_site(crop: torch.Tensor, tumour: torch.Tensor, branch: TumourBranch) -> torch.Tensor | None:
    """The crop with the tumour's old site relabelled, or None when the lung tumour has no lobe around it."""
    fill = branch.fill if branch.fill is not None else dominant_neighbour_lobe(crop, tumour)
    if fill is None:
        return None
    refilled = crop.clone()
    refilled[tumour] = fill
    return refilled


def host_region(refilled: torch.Tensor, tumour: torch.Tensor, branch: TumourBranch) -> torch.Tensor:
    """Where the moved tumour may lie: the host labels plus the old site, closed 5³ where the branch says so."""
    region = torch.isin(refilled, torch.tensor(branch.host, dtype=refilled.dtype, device=refilled.device)) | tumour
    return closing(region) if branch.close_host else region


def acceptance_threshold(branch: TumourBranch, attempt: int) -> float:
    """The retained fraction try `attempt` (0-based) must reach."""
    if branch.relaxed is not None and attempt >= branch.relaxed[0]:
        return branch.relaxed[1]
    return branch.threshold


def inside(mask: torch.Tensor, box: tuple[slice, ...]) -> bool:
    """Whether every voxel of `mask` lies in `box`."""
    outside = mask.clone()
    outside[box] = False
    return not bool(outside.any())


def move_tumour(transform, tumour: torch.Tensor, window: Window) -> torch.Tensor:
    """One random draw of the tumour moved: transformed in the work box, returned on the crop (parts moved outside
    the volume are lost, as in the reference)."""
    work = torch.zeros((1, *window.work_shape), dtype=torch.float32, device=tumour.device)
    work[(0, *window.crop_in_work)] = tumour.float()
    moved = convert_to_tensor(transform(work), track_meta=False)
    return moved[(0, *window.crop_in_work)] > 0.5


def place_tumour(tumour: torch.Tensor, region: torch.Tensor, window: Window, branch: TumourBranch,
                 seed: int, max_tries: int = MAX_TRIES) -> torch.Tensor | None:
    """The accepted, smoothed (closed 5³) new tumour on the crop, or None when no try is accepted."""
    size = int(tumour.sum())
    transform = make_transform(branch, seed, tumour.device)
    for attempt in range(max_tries):
        if branch.keep_after is not None and attempt >= branch.keep_after:
            kept = tumour & region  # the undistorted tumour, inside its (closed) host: always accepted
        else:
            kept = move_tumour(transform, tumour, window) & region
            if not inside(kept, window.inner):
                continue  # the elastic field reached beyond ELASTIC_REACH: the crop would not be exact
        if int(kept.sum()) >= size * acceptance_threshold(branch, attempt):
            return closing(kept)
    return None


def augment_tumour(labels: np.ndarray, branch: TumourBranch, seed: int, device: str | torch.device = "cpu",
                   max_tries: int = MAX_TRIES) -> np.ndarray:
    """Move the branch's tumour inside its host region and refill its old site; the map unchanged when the tumour
    is absent, its lung tumour has no neighbouring lobe, or no try is accepted within `max_tries`."""
    tumour_full = labels == branch.tumour
    if not tumour_full.any():
        return labels.copy()
    window = tumour_window(tumour_full, branch)
    dev = torch.device(device)
    crop = torch.as_tensor(np.ascontiguousarray(labels[window.crop]), device=dev)
    tumour = crop == branch.tumour
    refilled = refill_old_site(crop, tumour, branch)
    if refilled is None:
        return labels.copy()
    region = host_region(refilled, tumour, branch)
    moved = place_tumour(tumour, region, window, branch, seed, max_tries)
    if moved is None:
        return labels.copy()
    refilled[moved] = branch.tumour
    out = labels.copy()
    out[window.crop] = refilled.cpu().numpy()
    return out
