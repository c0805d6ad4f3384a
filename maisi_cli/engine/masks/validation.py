"""Checks of a user's label map before any network loads: a map the ControlNet cannot use is refused with the fix,
one it can use with caveats is accepted with a warning.

- ids outside the label dictionary: refused (a segmenter's ids read as MAISI's);
- no body label 200: refused (the released ControlNet was trained with every body voxel not in an organ labelled
  200; without it the CT comes out as air): `--body-from CT` adds it;
- ids of another scheme: refused when the map's left/right organ pairs sit on the wrong sides as read, and on the
  right sides as read in another scheme (TotalSegmentator's ids read as MAISI's put e.g. the liver, 5, where the right
  kidney should be); mirrored pairs under every scheme mean a flipped header: a warning;
- a field of view under what the model was trained on for the region the map shows: a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maisi_cli.config import FloatTriple, Triple, format_triple
from maisi_cli.engine.masks.regions import region_span
from maisi_cli.errors import UsageError
from maisi_cli.io.label_maps import label_counts
from maisi_cli.label_schemes import BUILTIN_SCHEMES, LabelScheme, label_scheme
from maisi_cli.labels import BODY_LABEL, label_dictionary, normalised_name

# The map's layout is judged from its left/right pairs only when it holds this many of them; the thresholds keep a
# real map of the scheme it is read in (all pairs on their sides) far from a refusal.
MIN_PAIRS = 4
WRONG_SCHEME_AT_MOST = 0.75  # share of pairs on their sides, as read, at or below which another scheme is tried
OTHER_SCHEME_AT_LEAST = 0.9  # share on their sides in another scheme for it to be named
MIRRORED_AT_MOST = 0.2  # share on their sides, in the scheme read and every other, for a flipped header
CENTROID_GRID = 96  # the map is subsampled to about this many voxels per axis to place the organs


@dataclass(frozen=True)
class LateralFit:
    """How many of a map's left/right pairs (both present) lie on their sides in a scheme."""
    on_side: int
    measured: int

    @property
    def share(self) -> float:
        return self.on_side / self.measured if self.measured else 1.0

    @property
    def judged(self) -> bool:
        return self.measured >= MIN_PAIRS


def lateral_pairs(class_names: dict[int, str]) -> list[tuple[int, int]]:
    """(right id, left id) of each anatomy the names give on both sides: 'right kidney'/'left kidney' (MAISI),
    'kidney_right'/'kidney_left' (TotalSegmentator), 'rib_left_1'/'rib_right_1'."""
    sides: dict[tuple[str, ...], dict[str, int]] = {}
    for ident, name in class_names.items():
        words = normalised_name(name).split()
        side = [w for w in words if w in ("left", "right")]
        if len(side) != 1:
            continue
        base = tuple(w for w in words if w not in ("left", "right"))
        sides.setdefault(base, {})[side[0]] = ident
    return sorted((pair["right"], pair["left"]) for pair in sides.values() if len(pair) == 2)


def centroids_x(labels: np.ndarray, affine: np.ndarray) -> dict[int, float]:
    """The RAS x (mm) of each label's centroid, from a subsampled copy of the map."""
    step = max(1, math.ceil(max(labels.shape) / CENTROID_GRID))
    sub = np.ascontiguousarray(labels[::step, ::step, ::step])
    i, j, k = np.meshgrid(*(np.arange(0, n * step, step, dtype=np.float32)[:n] for n in sub.shape), indexing="ij",
                          sparse=True)
    world_x = affine[0, 0] * i + affine[0, 1] * j + affine[0, 2] * k + affine[0, 3]
    flat = sub.ravel().astype(np.int64)
    counts = np.bincount(flat)
    sums = np.bincount(flat, weights=np.broadcast_to(world_x, sub.shape).ravel())
    return {int(ident): float(sums[ident] / counts[ident]) for ident in np.flatnonzero(counts) if ident != 0}


def lateral_fit(centroids: dict[int, float], class_names: dict[int, str]) -> LateralFit:
    """RAS x grows towards the patient's right, so the right organ of a pair has the larger centroid x."""
    pairs = [(right, left) for right, left in lateral_pairs(class_names) if right in centroids and left in centroids]
    return LateralFit(sum(centroids[right] > centroids[left] for right, left in pairs), len(pairs))


def check_scheme(raw: np.ndarray, affine: np.ndarray, scheme: LabelScheme, name: str) -> list[str]:
    """Refuse a map whose ids belong to another built-in scheme (UsageError naming the --mask-labels to give); warn
    when its left/right pairs are mirrored whatever the scheme (a flipped header). `raw` holds the ids as given."""
    centroids = centroids_x(raw, affine)
    fit = lateral_fit(centroids, scheme.class_names)
    if not fit.judged or fit.share > WRONG_SCHEME_AT_MOST:
        return []
    wrong = fit.measured - fit.on_side
    for other in BUILTIN_SCHEMES:
        candidate = label_scheme(other)
        if other == "vista3d" or candidate.mapping == scheme.mapping:  # vista3d writes MAISI's ids
            continue
        other_fit = lateral_fit(centroids, candidate.class_names)
        if other_fit.judged and other_fit.share >= OTHER_SCHEME_AT_LEAST:
            raise UsageError(
                f"--mask-labels: '{name}' read as {scheme.name} ids puts {wrong} of {fit.measured} left/right organ "
                f"pairs on the wrong side, and read as {other} ids {other_fit.on_side} of {other_fit.measured} on "
                f"their side: it looks like a {other} map; pass --mask-labels {other}")
    if fit.share <= MIRRORED_AT_MOST:
        return [f"--mask: '{name}' puts {wrong} of {fit.measured} left/right organ pairs on the wrong side: its "
                "header looks mirrored left-right; check its affine (the CT is generated as the header says)"]
    return []


def check_condition_labels(labels: np.ndarray, name: str, counts: np.ndarray | None = None) -> None:
    """Refuse a map (MAISI ids, uint8) with ids outside the label dictionary, or without the body label."""
    counts = label_counts(labels) if counts is None else counts
    known = set(label_dictionary().values())
    unknown = [int(i) for i in np.flatnonzero(counts) if i != 0 and int(i) not in known]
    if unknown:
        listed = ", ".join(map(str, unknown[:8])) + (", …" if len(unknown) > 8 else "")
        raise UsageError(f"--mask: '{name}' holds ids {listed} that are not MAISI labels (see `maisi labels`); a "
                         "segmenter's map needs --mask-labels totalsegmentator, vista3d or a .json table")
    if not counts[BODY_LABEL]:
        raise UsageError(
            f"--mask: '{name}' has no body label (200), which the ControlNet needs on every body voxel outside the "
            "organs (no segmenter writes it); add it with --body-from CT.nii.gz (the CT the map was segmented from) "
            "or --body-from labels (approximate), or with `maisi data body`")


def field_of_view_warning(counts: np.ndarray, size: Triple, spacing: FloatTriple, min_fov_mm: float | None,
                          model_name: str) -> str | None:
    """A warning when the x/y field of view is under what the model was trained on for a map that shows no head
    (MAISI: 256 mm for head CTs, 384 mm otherwise); None when it is enough or the model sets no such rule."""
    fov = min(size[0] * spacing[0], size[1] * spacing[1])
    if not min_fov_mm or fov >= min_fov_mm - 1e-6:
        return None
    span = region_span(int(i) for i in np.flatnonzero(counts))
    if span is not None and span[0] == 0:  # the head (brain, skull) is in it: the smaller field of view is fine
        return None
    return (f"--size/--spacing: the x/y field of view {format_triple(size)} × {format_triple(spacing)} mm = "
            f"{fov:g} mm is under the {min_fov_mm:g} mm model {model_name} was trained on for chest, abdomen and "
            "pelvis CTs (less is for head CTs); expect noisy organs: raise --spacing or --size")
