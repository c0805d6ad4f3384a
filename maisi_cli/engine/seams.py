"""Tile-seam artefacts of a sliding-window decode: how much sharper the image changes on the planes where windows
meet than elsewhere. numpy only (torch tensors are accepted and converted); no typer or rich.

Geometry
--------
The decode slides a window of `roi` voxels over the latent grid (engine/decode.py, MONAI `SlidingWindowInferer`);
each window becomes `zoom` (4 for the MAISI VAE) times as many image voxels per axis. `tile_borders` places the
windows exactly as the inferer does (`monai.inferers.utils._get_scan_interval` + `monai.data.utils.
dense_patch_slices`, the last start pulled back to fit; a ROI larger than the grid is clipped to it, as
`decode_plan.make_decode_plan` does) and returns, per spatial axis, every window start > 0 and end < length, in image
voxels. A "border plane" `p` on an axis is the plane between voxels `p - 1` and `p`; with overlap every window edge
inside the volume is one (the set of windows blended at a voxel changes there), without overlap they are the planes
where neighbouring tiles abut.

Measures
--------
Gradient: the absolute forward difference ``|x[p] - x[p - 1]|`` along each spatial axis (leading axes, e.g.
channels, are pooled). For an image ``x``:

- ``g_border(x)``: the mean gradient over the border planes of all three axes, each difference taken across the
  plane (along the axis the plane is normal to);
- ``g_inside(x)``: the mean over every other plane *of the axes that have border planes* (so an image smoother
  along one axis, e.g. finer z spacing, is compared with itself: a ROI that tiles only z is judged against the
  z differences alone). With no border at all, every axis counts.

``seam_score(x) = g_border(x) / g_inside(x)``: about 1 when the borders look like the rest of the image, ≫ 1 for a
visible seam. It is NaN when the plan has no border (one window).

``seam_excess(sliding, whole) = (g_border(sliding) − g_border(whole)) / g_inside(whole)``: the extra gradient the
tiling adds on the border planes, in units of the whole decode's typical gradient. 0 when the sliding decode equals
the whole one; 0.1 means the borders change 10 % of a typical voxel-to-voxel difference more than they should.
Unlike `seam_score`, it does not count real anatomy that happens to lie on a border plane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

Triple = tuple[int, int, int]


def window_starts(length: int, roi: int, overlap: float) -> list[int]:
    """Starts of the windows MONAI's sliding window places along one axis of `length` (grid voxels)."""
    roi = min(int(roi), int(length))
    if roi == length:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)  # monai.inferers.utils._get_scan_interval
    count = math.ceil(length / interval)
    # monai.data.utils.dense_patch_slices: the first index whose window reaches the end, starts pulled back to fit
    last = next((d for d in range(count) if d * interval + roi >= length), 0)
    return [i * interval - max(i * interval + roi - length, 0) for i in range(last + 1)]


def tile_borders(grid_shape: Sequence[int], roi: Sequence[int], overlap: float,
                 zoom: int = 4) -> tuple[tuple[int, ...], ...]:
    """Per spatial axis, the border planes (image voxels, sorted) of a sliding window of `roi` over a grid of
    `grid_shape` (the latent's spatial shape) whose output is `zoom` times as large per axis."""
    borders = []
    for length, r in zip(grid_shape, roi):
        r = min(int(r), int(length))
        planes = set()
        for start in window_starts(int(length), r, overlap):
            planes.update(p for p in (start, start + r) if 0 < p < length)
        borders.append(tuple(sorted(p * zoom for p in planes)))
    return tuple(borders)


def monai_tile_borders(grid_shape: Sequence[int], roi: Sequence[int], overlap: float,
                       zoom: int = 4) -> tuple[tuple[int, ...], ...]:
    """`tile_borders` computed with MONAI's own functions (to check the local copy of its rule against)."""
    shape = tuple(int(s) for s in grid_shape)
    clipped = tuple(min(int(r), s) for r, s in zip(roi, shape))
    interval = _get_scan_interval(shape, clipped, len(shape), (overlap,) * len(shape))
    slices = dense_patch_slices(shape, clipped, interval)
    borders = []
    for axis, length in enumerate(shape):
        planes = {p for window in slices for p in (window[axis].start, window[axis].stop) if 0 < p < length}
        borders.append(tuple(sorted(p * zoom for p in planes)))
    return tuple(borders)


def _as_array(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image, dtype=np.float64)
    if array.ndim < 3:
        raise ValueError(f"seams: expected an image with 3 spatial axes (last three), got shape {array.shape}")
    return array


@dataclass(frozen=True)
class BorderGradients:
    border: float  # mean |forward difference| across the border planes
    inside: float  # mean |forward difference| across every other plane
    border_planes: int  # border planes counted, all axes

    @property
    def score(self) -> float:
        if self.border_planes == 0 or self.inside == 0:
            return float("nan")
        return self.border / self.inside


def border_gradients(image: Any, borders: Sequence[Sequence[int]]) -> BorderGradients:
    """Mean absolute forward difference on the `borders` planes (per spatial axis, as `tile_borders` gives) and on
    the other planes of the axes that have borders (all axes when none has); the last three axes are spatial."""
    array = _as_array(image)
    spatial = array.ndim - 3
    border_sum = inside_sum = 0.0
    border_count = inside_count = 0
    planes = 0
    tiled = any(0 < p < array.shape[spatial + a] for a in range(3) for p in borders[a])
    for axis in range(3):
        diff = np.abs(np.diff(array, axis=spatial + axis))  # index i: the plane between voxels i and i + 1
        per_plane = diff.sum(axis=tuple(a for a in range(diff.ndim) if a != spatial + axis))
        per_plane_count = diff.size // diff.shape[spatial + axis]
        mask = np.zeros(diff.shape[spatial + axis], dtype=bool)
        indices = [p - 1 for p in borders[axis] if 0 < p < array.shape[spatial + axis]]
        mask[indices] = True
        if not mask.any() and tiled:
            continue  # an axis without borders is not compared with those that have them
        planes += int(mask.sum())
        border_sum += float(per_plane[mask].sum())
        border_count += int(mask.sum()) * per_plane_count
        inside_sum += float(per_plane[~mask].sum())
        inside_count += int((~mask).sum()) * per_plane_count
    return BorderGradients(border=border_sum / border_count if border_count else float("nan"),
                           inside=inside_sum / inside_count if inside_count else float("nan"), border_planes=planes)


def _grid_shape(image_shape: Sequence[int], zoom: int) -> Triple:
    shape = tuple(int(s) for s in image_shape[-3:])
    if any(s % zoom for s in shape):
        raise ValueError(f"seams: image shape {shape} is not a multiple of zoom {zoom}")
    return (shape[0] // zoom, shape[1] // zoom, shape[2] // zoom)


def seam_score(image: Any, roi: Sequence[int], overlap: float, zoom: int = 4) -> float:
    """Border-plane gradient / gradient elsewhere of `image` (…, X, Y, Z) for a sliding window of `roi` grid voxels
    (latent voxels for a VAE decode) at `overlap`, each grid voxel `zoom` image voxels per axis. ≈ 1: no seam;
    NaN: the plan has a single window."""
    array = _as_array(image)
    borders = tile_borders(_grid_shape(array.shape, zoom), roi, overlap, zoom)
    return border_gradients(array, borders).score


def seam_excess(sliding: Any, whole: Any, roi: Sequence[int], overlap: float, zoom: int = 4) -> float:
    """(border gradient of `sliding` − border gradient of `whole`) / gradient of `whole` off the borders: the
    gradient the tiling adds on its border planes, in units of the image's typical gradient (0: none)."""
    a, b = _as_array(sliding), _as_array(whole)
    if a.shape != b.shape:
        raise ValueError(f"seams: sliding {a.shape} and whole {b.shape} differ in shape")
    borders = tile_borders(_grid_shape(a.shape, zoom), roi, overlap, zoom)
    if not any(borders):
        return float("nan")
    of_sliding, of_whole = border_gradients(a, borders), border_gradients(b, borders)
    if of_whole.inside == 0:
        return float("nan")
    return (of_sliding.border - of_whole.border) / of_whole.inside


def seam_report(sliding: Any, whole: Any, roi: Sequence[int], overlap: float, zoom: int = 4) -> dict[str, Any]:
    """Every measure of one sliding decode against the whole decode, as plain data (NaN → None)."""
    a, b = _as_array(sliding), _as_array(whole)
    grid = _grid_shape(a.shape, zoom)
    borders = tile_borders(grid, roi, overlap, zoom)
    of_sliding, of_whole = border_gradients(a, borders), border_gradients(b, borders)
    delta = np.abs(a - b)

    def clean(value: float, digits: int = 4) -> float | None:
        return None if not math.isfinite(value) else round(float(value), digits)

    return {
        "border_planes": [list(axis) for axis in borders],
        "seam_score_sliding": clean(of_sliding.score),
        "seam_score_whole": clean(of_whole.score),
        "seam_excess": clean(seam_excess(a, b, roi, overlap, zoom)),
        # the same difference off the borders: how much of the excess is not specific to the border planes
        "inside_excess": clean((of_sliding.inside - of_whole.inside) / of_whole.inside
                               if of_whole.inside and any(borders) else float("nan")),
        "max_abs_diff": clean(float(delta.max()), 5),
        "mean_abs_diff": clean(float(delta.mean()), 6),
    }
