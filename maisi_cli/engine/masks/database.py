"""The candidate-mask database (reference-inference.md §9): find label maps that hold the requested anatomy, exactly
at the requested grid or else the closest ones, ordered by the sample's seed.

The database is a JSON list of entries {pseudo_label_filename, label_list, dim, spacing, [top|bottom]_region_index};
the masks themselves come from a zip archive unpacked once under MAISI_HOME (see `archive.py`).
"""

from __future__ import annotations

import os
import posixpath
import random
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from maisi_cli.config import FloatTriple, Triple, format_triple
from maisi_cli.engine.masks.regions import region_one_hots
from maisi_cli.engine.masks.user import checked_labels, converted_labels, voxel_spacing
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent, no_progress
from maisi_cli.errors import MaisiError, UsageError, first_validation_problem
from maisi_cli.io.documents import read_document
from maisi_cli.io.label_maps import present_labels
from maisi_cli.io.nifti import read_nifti
from maisi_cli.label_schemes import LabelScheme

# Tumours a candidate may hold only when they are requested (reference `find_masks`).
TUMOR_LABELS = frozenset({23, 24, 26, 27, 128})
# Region names → index of the 4-slot one-hot (0 head/neck, 1 chest, 2 abdomen, 3 pelvis/lower).
REGION_INDEX = {"head": 0, "neck": 0, "head/neck": 0, "chest": 1, "thorax": 1, "chest/thorax": 1, "abdomen": 2,
                "pelvis": 3, "lower": 3, "pelvis/lower": 3}
# "cannot upsample too much": a candidate may be at most this many voxels smaller than the output on any axis.
MAX_UPSAMPLE_VOXELS = 64
# `maisi generate` reads entries outside the mask folder only when asked to.
OUTSIDE_OPTION = "--allow-outside-database"


class MaskDatabaseError(MaisiError):
    """The candidate-mask database cannot be read, or nothing in it fits the request."""


class MaskEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    pseudo_label_filename: str
    label_list: tuple[int, ...]
    dim: Triple
    spacing: FloatTriple
    top_region_index: tuple[int, int, int, int] | None = None
    bottom_region_index: tuple[int, int, int, int] | None = None
    # The label scheme of the map's ids (`maisi data masks index --mask-labels`); label_list is in MAISI ids.
    mask_labels: str = "maisi"

    @field_validator("label_list", mode="before")
    @classmethod
    def _whole_numbers(cls, value):
        return tuple(int(v) for v in value)

    def region_span(self) -> tuple[int, int] | None:
        """(top, bottom) region indices: the position of the first 1 in each one-hot; None without region fields."""
        if self.top_region_index is None or self.bottom_region_index is None:
            return None
        if 1 not in self.top_region_index or 1 not in self.bottom_region_index:
            return None
        return self.top_region_index.index(1), self.bottom_region_index.index(1)


def read_database(path: Path) -> list[MaskEntry]:
    document = read_document(path, "mask database", kind="json", expect=list, shape="a JSON list of entries",
                             error=MaskDatabaseError)
    entries = []
    for number, item in enumerate(document):
        try:
            entries.append(MaskEntry.model_validate(item))
        except ValidationError as error:
            field, problem = first_validation_problem(error)
            raise MaskDatabaseError(
                f"mask database: '{path}' entry {number} field '{field or 'entry'}': {problem.lower()}; "
                "each entry needs pseudo_label_filename, label_list, dim and spacing"
            ) from None
    if not entries:
        raise MaskDatabaseError(f"mask database: '{path}' holds no entries")
    return entries


def climbs_out(name: str) -> bool:
    """A path that leaves its folder before any link is followed: absolute, drive-qualified, or climbing with '..'
    past its start."""
    path = name.replace("\\", "/")
    normal = posixpath.normpath(path)
    return posixpath.isabs(normal) or normal == ".." or normal.startswith("../") or (len(path) > 1 and path[1] == ":")


def resolves_outside(root: Path, name: str) -> bool:
    """A path that leaves `root` once every symbolic link is followed."""
    start = root.resolve()
    return climbs_out(name) or not (start / name).resolve().is_relative_to(start)


def outside_error(database: Path, name: str, folder: str) -> MaskDatabaseError:
    return MaskDatabaseError(f"mask database: '{database}' entry '{name}' lies outside {folder}, the folder its masks "
                             f"are read from; move the mask inside it, or pass {OUTSIDE_OPTION} to read it anyway")


def region_indices(names: Iterable[str]) -> tuple[int, ...]:
    indices = []
    for name in names:
        key = name.strip().lower()
        if key not in REGION_INDEX:
            raise UsageError(f"--body-region: '{name}' is not a region; use head, chest, abdomen or pelvis")
        indices.append(REGION_INDEX[key])
    return tuple(sorted(set(indices)))


def rejection(entry: MaskEntry, anatomy: Sequence[int], regions: Sequence[int]) -> str | None:
    """Why an entry cannot serve this request (None when it can), ignoring size and spacing."""
    labels = set(entry.label_list)
    if not set(anatomy) <= labels:
        return "anatomy"
    span = entry.region_span()
    if span is not None and any(not (span[0] <= r <= span[1]) for r in regions):
        return "body region"
    if (labels & TUMOR_LABELS) - set(anatomy):
        return "unrequested tumour"
    return None


def same_grid(entry: MaskEntry, size: Triple, spacing: FloatTriple) -> bool:
    """Exact match, as the reference: the same dims and the same spacing, float for float."""
    return tuple(entry.dim) == tuple(size) and tuple(entry.spacing) == tuple(spacing)


def closeness(entry: MaskEntry, size: Triple, spacing: FloatTriple) -> float:
    """The reference score (lower is closer): field-of-view difference in cm + voxel-count difference / 100 +
    spacing difference in mm, summed over the axes."""
    return sum(
        abs(d * s - o * t) / 10 + abs(d - o) / 100 + abs(s - t)
        for d, s, o, t in zip(entry.dim, entry.spacing, size, spacing)
    )


def too_small(entry: MaskEntry, size: Triple) -> bool:
    return any(d < o - MAX_UPSAMPLE_VOXELS for d, o in zip(entry.dim, size))


def find_candidates(entries: Sequence[MaskEntry], anatomy: Sequence[int], regions: Sequence[int], size: Triple,
                    spacing: FloatTriple, needed: int) -> tuple[list[MaskEntry], bool]:
    """(candidates, need_resample). Exact grid matches when there are at least `needed`; else every entry that is
    not too small, closest first, to be resampled (the caller keeps the first that survive resampling)."""
    usable = [e for e in entries if rejection(e, anatomy, regions) is None]
    exact = [e for e in usable if same_grid(e, size, spacing)]
    if len(exact) >= needed:
        return exact, False
    near = sorted((e for e in usable if not too_small(e, size)), key=lambda e: closeness(e, size, spacing))
    if not near:
        raise MaskDatabaseError(no_match_message(entries, anatomy, regions, size, spacing))
    return near, True


def no_match_message(entries: Sequence[MaskEntry], anatomy: Sequence[int], regions: Sequence[int], size: Triple,
                     spacing: FloatTriple) -> str:
    reasons = Counter(rejection(e, anatomy, regions) or "too small" for e in entries)
    why = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    fitting = [e for e in entries if rejection(e, anatomy, regions) is None] or list(entries)
    near_text = "; ".join(nearest_grids(fitting, size, spacing))
    return (f"mask database: no candidate for anatomy {list(anatomy) or 'any'} regions {list(regions) or 'any'} "
            f"at {format_triple(size)} (of {len(entries)}: {why}); nearest: {near_text}. Drop a constraint, "
            f"ask for a nearer size, or pass --mask FILE")


def shuffled(candidates: Sequence[MaskEntry], seed: int) -> list[MaskEntry]:
    """The candidates in an order fixed by `seed` alone (the reference shuffles with the global random stream)."""
    ordered = list(candidates)
    random.Random(seed).shuffle(ordered)
    return ordered


def nearest_grids(entries: Sequence[MaskEntry], size: Triple, spacing: FloatTriple, count: int = 3) -> list[str]:
    closest = sorted(entries, key=lambda e: closeness(e, size, spacing))[:count]
    return [f"{format_triple(e.dim)} at {format_triple(e.spacing)} mm" for e in closest]


def entry_for_file(path: Path, base: Path, scheme: LabelScheme | None = None) -> dict:
    """A database entry for one label map (used by `maisi data masks index`); its path is relative to `base`, the
    folder of the database file. A map in a segmenter's ids (`scheme`, --mask-labels) is listed by the MAISI ids
    they convert to, and the entry names the scheme so `maisi generate` converts the map as it reads it."""
    data, affine = read_nifti(path, field="mask folder")
    if scheme is None or scheme.identity:
        labels = checked_labels(data, path, field="mask folder")
    else:
        labels = converted_labels(data, scheme, path, field="mask folder")[0]
    present = present_labels(labels)
    entry = {
        "pseudo_label_filename": Path(os.path.relpath(path.resolve(), base.resolve())).as_posix(),
        "label_list": present,
        "dim": [int(s) for s in labels.shape],
        "spacing": [round(s, 6) for s in voxel_spacing(affine)],
    }
    entry.update(region_one_hots(present))
    if scheme is not None and not scheme.identity:
        entry["mask_labels"] = scheme.name
    return entry


def index_folder(root: Path, on_progress: ProgressCallback = no_progress, base: Path | None = None,
                 scheme: LabelScheme | None = None) -> list[dict]:
    """Entries for every NIfTI label map under `root`, sorted by path, with paths relative to `base` (the folder
    the database file will be in; default `root`); the maps' ids read in `scheme` (default MAISI's)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and (p.name.endswith(".nii.gz") or p.suffix == ".nii"))
    if not files:
        raise MaskDatabaseError(f"mask folder: '{root}' holds no .nii or .nii.gz files")
    entries = []
    for number, path in enumerate(files, 1):
        entry = entry_for_file(path, base or root, scheme)
        if climbs_out(entry["pseudo_label_filename"]):  # `maisi generate` would refuse it: say so now
            raise MaskDatabaseError(
                f"mask folder: '{path}' would be listed as '{entry['pseudo_label_filename']}', outside "
                f"{(base or root).resolve()}, the database's folder, which `maisi generate` refuses; keep the label "
                "maps themselves (not links) in the folder and write the database there or in a folder above it")
        entries.append(entry)
        on_progress(ProgressEvent("index", number, len(files), subject="masks"))
    return entries
