"""A folder of per-class masks as one label map: TotalSegmentator's default output (`liver.nii.gz`,
`kidney_right.nii.gz`, … one binary NIfTI file per class, named by class, all on the CT's grid) merged into the map
that `--mask FILE` would hold, in a label scheme's class ids, ready for `masks.user.converted_labels`.

- The files: names ending `.nii` or `.nii.gz` (any case) that are not hidden; anything else (TotalSegmentator's
  statistics.json and previews, subfolders, macOS `._liver.nii.gz` forks, maisi's `.partial` files) is ignored, and
  a folder without such a file is refused. The folder may be reached through a link (the user named it, as a
  `--mask` file may be); a file in it may be a link to a regular file inside the folder, but one leading outside it
  or anything but a regular file is refused: a class folder reads nothing the user did not put in it.
- The names: a file's name without `.nii(.gz)` names a class of the scheme, in any case, with underscores or spaces.
  Under maisi/vista3d that is a MAISI anatomy name (`right_kidney`) or TotalSegmentator's name for it
  (`kidney_right`); `body` is the body label 200 unless the scheme names a class body. A file that names no class is
  refused (dropping it would leave an organ out of the CT without a word), as are two files naming one class.
- The values: each file binary, 0 and one other value, 1 or 255 (bool, integer or float files); others are refused.
- The grid: every file on the first file's (by name) shape and affine; another grid is refused.
- Overlaps: a voxel set in several files goes to the smallest structure (the file with the fewest voxels; on a tie
  the higher class id), so a tumour drawn inside its organ stays a tumour, whatever the order of the files; the
  overlaps are counted and named in one warning. The body (200) gives way to every class without a warning: it is
  the envelope the organs lie in.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np

from maisi_cli.config import format_triple
from maisi_cli.cpus import usable_cpus
from maisi_cli.engine.memory import available_host_memory, check_host_memory
from maisi_cli.errors import MaskError, UsageError
from maisi_cli.io.files import kind_of, sha256_of_input
from maisi_cli.io.nifti import NiftiHeader, read_nifti_header
from maisi_cli.label_schemes import LabelScheme
from maisi_cli.labels import BODY_LABEL, maisi_name_for, normalised_name

NIFTI_SUFFIXES = (".nii.gz", ".nii")
BINARY_VALUES = (1, 255)  # the foreground value of a binary file: 1, or 255 as image tools often save masks
GRID_TOLERANCE_MM = 1e-3  # affine entries that differ by less are the same grid (float32 header round-off)
LISTED = 5  # names or overlaps spelled out in one message line; the rest are counted
MAX_READ_THREADS = 8  # class files read at once, at most
Box = tuple[slice, slice, slice]
T = TypeVar("T")


@dataclass(frozen=True)
class ClassFile:
    path: Path
    stem: str  # the file name without .nii/.nii.gz: the class it names
    ident: int | None = None  # the scheme's class id for `stem` (None before names are matched)


@dataclass(frozen=True)
class ClassFolder:
    """A folder checked from its headers alone: its class files and the merged map's grid and dtype."""

    folder: Path
    files: tuple[ClassFile, ...]  # by file name; with a scheme, each with its class id
    header: NiftiHeader  # shape and affine of the files, dtype of the merged map
    read_bytes: int  # bytes per voxel of the widest file as read (nibabel's float64 for a scaled file)


def class_folder_header(folder: Path, field: str = "--mask", scheme: LabelScheme | None = None) -> NiftiHeader:
    """The folder's grid from its files' headers alone (no voxel is read): shape and affine, and the dtype of the
    map `read_class_folder` makes: uint8 when the class ids fit, else uint16. Without `scheme` the names are not
    matched and the dtype is uint16, the widest it returns. Refuses (MaskError, one line naming `field`, the file
    and the fix) a folder without NIfTI files, a link out of it, an unreadable file or one on another grid; with a
    scheme, also names that match no class (UsageError)."""
    return checked_class_folder(Path(folder), field, scheme).header


def read_class_folder(folder: Path, scheme: LabelScheme, field: str = "--mask") -> tuple[np.ndarray, np.ndarray,
                                                                                         list[str]]:
    """(one label map in `scheme`'s class ids, uint8 or uint16; its affine; warnings): the folder is checked from
    its headers first, then each file is read in turn into the merged map, so memory holds the map and one file."""
    checked = checked_class_folder(Path(folder), field, scheme)
    shape = checked.header.shape
    voxels = int(np.prod(shape, dtype=np.float64))
    merged_bytes = checked.header.dtype.itemsize
    # the merged map and one step's overlap mask (bool), plus per file being read: the file as read and nibabel's
    # read buffer, its foreground (bool) and the box's copy of it (at most the volume). One file at a time measured
    # 313 MiB at 512x512x300 (uint8 files).
    per_file = voxels * (checked.read_bytes + 2)
    readers = read_threads(len(checked.files), voxels * (merged_bytes + 1), per_file)
    check_host_memory(voxels * (merged_bytes + 1) + readers * per_file, field,
                      f"reading the {len(checked.files)} class files of '{checked.folder}' "
                      f"({format_triple(shape)}) into one label map", "crop or downsample the masks first")
    merged = np.zeros(shape, dtype=checked.header.dtype, order="F")  # nibabel reads NIfTI voxels in this order
    sizes: dict[int, int] = {}  # class id → voxels in its file
    names: dict[int, str] = {}
    overlaps: list[tuple[str, str, int, str]] = []
    files = sorted(checked.files, key=lambda f: f.ident or 0)  # merged in class order: the same map every time
    for entry, found in zip(files, read_in_order([f.path for f in files],
                                                 lambda path: binary_foreground(path, shape, field), readers)):
        if found is None:
            continue  # an absent class: TotalSegmentator writes an all-zero file for it
        ident = entry.ident or 0
        names[ident] = entry.path.name
        sizes[ident] = merged_into(merged, *found, ident, sizes, names, overlaps)
    return merged, checked.header.affine, [overlap_warning(checked.folder, overlaps, field)] if overlaps else []


def read_threads(files: int, fixed: int, per_file: int) -> int:
    """How many class files to read at once: up to MAX_READ_THREADS (zlib inflates without the GIL, so the reads
    overlap), as many as the CPUs and the free host memory allow; 1 where the memory cannot be read."""
    available = available_host_memory()
    wanted = min(usable_cpus(MAX_READ_THREADS), max(files, 1))
    if available is None:
        return 1
    return max(1, min(wanted, (available - fixed) // max(per_file, 1)))


def read_in_order(paths: list[Path], read: Callable[[Path], T], threads: int) -> Iterator[T]:
    """`read(path)` of each path, yielded in the paths' order, with at most `threads` reads in flight (a result
    waits for its turn, so memory holds `threads` files, not all of them). The first failure in order is raised."""
    if threads <= 1:
        yield from (read(path) for path in paths)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="maisi-class-read") as pool:
        in_flight: deque[Future[T]] = deque()
        try:
            for path in paths:
                in_flight.append(pool.submit(read, path))
                if len(in_flight) >= threads:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:  # a failure (or a consumer that stopped): read nothing more
                future.cancel()


def sha256_of_class_folder(folder: Path, field: str = "--mask") -> str:
    """One digest of the folder's content as maisi reads it: each class file's name and sha256, sorted by name
    (ignored files leave it alone, a renamed, added, removed or changed class file changes it)."""
    digest = hashlib.sha256()
    for entry in class_files(Path(folder), field):
        digest.update(f"{entry.path.name}\0{sha256_of_input(entry.path)}\n".encode())
    return digest.hexdigest()


# --- the folder's files -----------------------------------------------------------------------------------------

def nifti_stem(name: str) -> str | None:
    """`liver` for `liver.nii.gz` or `liver.nii` (any case); None for a name that is not a NIfTI file's."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def class_files(folder: Path, field: str) -> list[ClassFile]:
    """The folder's NIfTI files by name, each checked to be a regular file inside it."""
    if not folder.is_dir():
        raise MaskError(f"{field}: '{folder}' is not a folder; give TotalSegmentator's output folder (one file per "
                        "class) or one label-map file")
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
        root = folder.resolve()
    except OSError as error:
        raise MaskError(f"{field}: cannot read the folder '{folder}' ({error.strerror}); give a folder you can "
                        "read") from None
    files = []
    for name in names:
        stem = nifti_stem(name)
        if stem is None or name.startswith("."):
            continue
        check_regular_inside(folder / name, root, field)
        files.append(ClassFile(folder / name, stem))
    if not files:
        raise MaskError(f"{field}: the folder '{folder}' holds no .nii or .nii.gz file; give TotalSegmentator's "
                        "output folder (one binary file per class, named by class) or one label-map file")
    return files


def check_regular_inside(path: Path, root: Path, field: str) -> None:
    """Refuse a link leading out of the folder, a broken one, and anything but a regular file."""
    try:
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise MaskError(f"{field}: '{path}' is a link to '{os.readlink(path)}', outside the folder; a class "
                            "folder reads only its own files: copy the file into the folder")
        mode = os.stat(path).st_mode  # a link inside the folder is followed
    except (OSError, RuntimeError) as error:  # RuntimeError: a link loop (Path.resolve)
        reason = getattr(error, "strerror", None) or "a link loop"
        raise MaskError(f"{field}: cannot read '{path}' ({reason}); remove it from the folder or fix it") from None
    if not stat.S_ISREG(mode):
        raise MaskError(f"{field}: '{path}' is {kind_of(mode)}, not a mask file; remove it from the folder")


def checked_class_folder(folder: Path, field: str, scheme: LabelScheme | None) -> ClassFolder:
    """The files, their common grid and (with a scheme) their class ids, from the headers alone."""
    files = class_files(folder, field)
    if scheme is not None:
        files = matched_files(folder, files, scheme, field)
    first = read_nifti_header(files[0].path, field, "binary mask")
    read_bytes = 0
    for entry in files:
        header = read_nifti_header(entry.path, field, "binary mask")
        if header.dtype.kind not in "biuf":
            raise MaskError(f"{field}: '{entry.path}' holds {header.dtype} values; each class file must be a "
                            "binary mask (0 and 1)")
        if header.shape != first.shape or not np.allclose(header.affine, first.affine, rtol=0,
                                                          atol=GRID_TOLERANCE_MM):
            raise MaskError(f"{field}: '{entry.path}' is on another grid ({grid_text(header)}) than "
                            f"'{files[0].path.name}' ({grid_text(first)}); all class files must lie on the CT's "
                            "grid: segment one CT into the folder, or resample the file onto it")
        read_bytes = max(read_bytes, header.dtype.itemsize)
    wide = scheme is None or max(entry.ident or 0 for entry in files) > 255
    header = NiftiHeader(first.shape, np.dtype(np.uint16 if wide else np.uint8), first.affine)
    return ClassFolder(folder, tuple(files), header, read_bytes)


def grid_text(header: NiftiHeader) -> str:
    spacing = np.sqrt((header.affine[:3, :3] ** 2).sum(axis=0))
    origin = header.affine[:3, 3]
    return (f"{format_triple(header.shape)} voxels of {'x'.join(f'{s:g}' for s in spacing)} mm at "
            f"({', '.join(f'{o:g}' for o in origin)}) mm")


# --- names → class ids ------------------------------------------------------------------------------------------

def class_lookup(scheme: LabelScheme) -> dict[str, int]:
    """Normalised class name → class id (a segmenter's scheme names the body label 200 `body`, label_schemes)."""
    lookup: dict[str, int] = {}
    for ident, name in sorted(scheme.class_names.items()):
        if ident == 0:
            continue  # background is what a class file leaves unset
        lookup.setdefault(normalised_name(name), ident)
    return lookup


def class_id_for(stem: str, scheme: LabelScheme, lookup: dict[str, int]) -> int | None:
    key = normalised_name(stem)
    if key in lookup:
        return lookup[key]
    # MAISI's own ids: TotalSegmentator's name of an anatomy (kidney_right) names it too, as --anatomy accepts
    return lookup.get(maisi_name_for(stem)) if scheme.identity else None


def matched_files(folder: Path, files: list[ClassFile], scheme: LabelScheme, field: str) -> list[ClassFile]:
    """Each file with its class id; refuses names that match no class, and two files naming one class."""
    lookup = class_lookup(scheme)
    matched, unknown = [], []
    taken: dict[int, ClassFile] = {}
    for entry in files:
        ident = class_id_for(entry.stem, scheme, lookup)
        if ident is None:
            unknown.append(entry.path.name)
            continue
        if ident in taken:
            raise MaskError(f"{field}: '{taken[ident].path.name}' and '{entry.path.name}' in '{folder}' both name "
                            f"class {ident} ({scheme.class_names.get(ident, 'body')}); keep one of them")
        taken[ident] = entry
        matched.append(ClassFile(entry.path, entry.stem, ident))
    if unknown:
        listed = ", ".join(unknown[:LISTED]) + (f" and {len(unknown) - LISTED} more" if len(unknown) > LISTED else "")
        shown = "`maisi labels`" if scheme.identity else f"`maisi labels --scheme {scheme.name}`"
        raise UsageError(f"{field}: in '{folder}', {listed} name{'s' if len(unknown) == 1 else ''} no class of "
                         f"--mask-labels {scheme.name}; name each file after a class ({shown} lists them), give the "
                         "--mask-labels of the segmenter that wrote them, or move the file out of the folder")
    return matched


# --- voxels -----------------------------------------------------------------------------------------------------

def binary_foreground(path: Path, shape: tuple[int, int, int], field: str) -> tuple[Box, np.ndarray] | None:
    """(the box around the file's foreground, the foreground (bool) in it), None when the file is all zero; a file
    with values other than 0 and one of BINARY_VALUES is refused. Read as stored (a scaled file as float32): no
    float64 copy."""
    try:
        proxy = nib.load(str(path)).dataobj
        scaled = (getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)) != (1.0, 0.0)
        data = np.asarray(proxy, dtype=np.float32) if scaled else np.asanyarray(proxy)
    except Exception as error:  # noqa: BLE001 — nibabel raises many types for a truncated or corrupt file
        raise MaskError(f"{field}: '{path}' is not a readable NIfTI file ({str(error).strip()[:120] or error!r})"
                        ) from None
    data = data.reshape(shape)
    foreground = data != 0
    box = bounding_box(foreground)
    if box is None:
        return None
    low, high = foreground_extremes(data[box], foreground[box])
    if not (low == high and low in BINARY_VALUES):
        found = ("non-finite values" if not np.isfinite([low, high]).all() else
                 f"the value {low:g}" if low == high else f"values from {low:g} to {high:g}")
        raise MaskError(f"{field}: '{path}' holds {found} besides 0; each class file must be binary (0 and 1, or 0 "
                        "and 255): a multi-label map goes alone as --mask FILE")
    return box, foreground[box].copy()  # a copy: the volume-sized arrays go with this read


def foreground_extremes(data: np.ndarray, foreground: np.ndarray) -> tuple[float, float]:
    """The least and greatest value on the foreground, without copying it out (NaN stays NaN)."""
    if data.dtype == np.bool_:
        return 1.0, 1.0
    info = np.iinfo(data.dtype) if np.issubdtype(data.dtype, np.integer) else np.finfo(data.dtype)
    low = data.min(where=foreground, initial=info.max)
    high = data.max(where=foreground, initial=info.min)
    return float(low), float(high)


def bounding_box(foreground: np.ndarray) -> Box | None:
    """The smallest box holding the foreground (None: there is none): the checks and the merge work on it, not on
    the whole grid. Two passes over the volume: an organ's file is mostly zeros."""
    plane = foreground.any(axis=2)
    extents = [np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))]
    if extents[0].size == 0:
        return None
    extents.append(np.flatnonzero(foreground.any(axis=(0, 1))))
    x, y, z = (slice(int(hits[0]), int(hits[-1]) + 1) for hits in extents)
    return x, y, z


def precedence(ident: int, voxels: int) -> tuple[float, int]:
    """Lower wins a voxel: the smaller structure, on equal sizes the higher id (the same result in any order of the
    files); the body (200) loses to every class, as the envelope the organs lie in."""
    return (float("inf") if ident == BODY_LABEL else voxels, -ident)


def merged_into(merged: np.ndarray, box: Box, mine: np.ndarray, ident: int, sizes: dict[int, int],
                names: dict[int, str], overlaps: list[tuple[str, str, int, str]]) -> int:
    """Write class `ident` where its file is set, except on voxels a smaller structure already holds; each overlap
    is appended to `overlaps` as (file, file, voxels, the winner's file). Returns the file's voxel count."""
    here = merged[box]
    voxels = int(np.count_nonzero(mine))
    claimed = here != 0
    claimed &= mine
    if claimed.any():
        held = here[claimed]
        owners, counts = np.unique(held, return_counts=True)
        kept = [int(o) for o in owners if precedence(int(o), sizes[int(o)]) < precedence(ident, voxels)]
        for owner, count in zip(owners.tolist(), counts.tolist()):
            if BODY_LABEL not in (owner, ident):  # the body envelope lies under every organ by design
                winner = owner if owner in kept else ident
                overlaps.append((names[owner], names[ident], int(count), names[winner]))
        if kept:
            mine[claimed] = ~np.isin(held, kept)
    here[mine] = ident
    return voxels


def overlap_warning(folder: Path, overlaps: list[tuple[str, str, int, str]], field: str) -> str:
    listed = "; ".join(f"{a} and {b} share {n} voxel{'' if n == 1 else 's'}, given to {w}"
                       for a, b, n, w in overlaps[:LISTED])
    more = f"; and {len(overlaps) - LISTED} more pairs" if len(overlaps) > LISTED else ""
    return (f"{field}: class files of '{folder.name}' overlap: {listed}{more}; a voxel set in several files goes to "
            "the smallest structure (the file with the fewest voxels)")
