"""Where a sample's image and label go in each output format, and the writers behind `--format`.

| format | image | label |
|---|---|---|
| nifti (default) | `…_image.nii.gz` | `…_label.nii.gz` (+ colour tables once per folder) |
| nii | `…_image.nii` | `…_label.nii` (+ colour tables) |
| nrrd | `…_image.nrrd` | `…_label.seg.nrrd` (3D Slicer segmentation: names, colours) |
| dicom | `…_image/` (a CT series, one file per slice) | `…_label.dcm` (DICOM SEG referencing the series) |

A DICOM series is a folder: it is written into a temporary sibling and renamed into place, and recorded by a digest
of its files' names and sha256 (`output_sha256`), so a sample's completeness is checked the same way for every
format.
"""

from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from maisi_cli.errors import OutputError, UsageError
from maisi_cli.io.label_maps import present_labels
from maisi_cli.io.nifti import write_nifti
from maisi_cli.io.files import kind_of, sha256_of_file, temporary_name, write_atomic

OUTPUT_FORMATS = ("nifti", "nii", "nrrd", "dicom")
SUFFIXES = {"nifti": ("_image.nii.gz", "_label.nii.gz"), "nii": ("_image.nii", "_label.nii"),
            "nrrd": ("_image.nrrd", "_label.seg.nrrd"), "dicom": ("_image", "_label.dcm")}
SLICER_COLOUR_TABLE = "maisi_labels.ctbl"  # beside NIfTI labels: 3D Slicer's colour table
ITKSNAP_LABELS = "maisi_labels_itksnap.txt"  # and ITK-SNAP's label description file


def checked_format(name: str, field: str = "--format") -> str:
    key = name.strip().lower()
    if key not in OUTPUT_FORMATS:
        raise UsageError(f"{field}: '{name}' is not an output format; use {', '.join(OUTPUT_FORMATS)}")
    if key == "dicom":
        from maisi_cli.io.dicom import dicom_available  # pydicom and highdicom come with the dicom extra
        dicom_available()
    return key


def pair_paths(folder: Path, stem: str, output_format: str) -> tuple[Path, Path]:
    """(image, label) paths of sample `stem` in `output_format`."""
    image, label = SUFFIXES[output_format]
    return folder / f"{stem}{image}", folder / f"{stem}{label}"


def output_sha256(path: Path) -> str | None:
    """sha256 of a file; of a folder (a DICOM series): of its files' names and sha256, in name order; None when
    missing or unreadable."""
    if path.is_dir() and not path.is_symlink():
        members = {}
        for member in sorted(path.iterdir()):
            member_sha = sha256_of_file(member) if member.is_file() and not member.is_symlink() else None
            if member_sha is None:
                return None
            members[member.name] = member_sha
        return folder_sha256(members)
    return sha256_of_file(path)


def first_changed_file(files: Iterable[tuple[Path, str | None]]) -> Path | None:
    """The first of (path, recorded sha256) whose file is missing or has another sha256 now, or None when all
    match: a sample whose files are not those its sidecar describes."""
    return next((path for path, recorded in files if output_sha256(path) != recorded), None)


def folder_sha256(members: dict[str, str]) -> str:
    """The digest of a folder from its files' names and sha256, in name order."""
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(f"{name} {members[name]}\n".encode())
    return digest.hexdigest()


def written_sha256(path: Path, written: dict[str, str]) -> str:
    """`output_sha256` of what a writer here just wrote at `path`, from the sha256 it returned ({name relative to
    the folder: sha256}), without reading the files again."""
    if path.name in written:
        return written[path.name]
    prefix = f"{path.name}/"
    return folder_sha256({name[len(prefix):]: sha for name, sha in written.items() if name.startswith(prefix)})


@dataclass(frozen=True)
class PairIdentity:
    """What names a sample inside formats that carry it (DICOM UIDs and descriptions)."""
    uid_key: str  # the run's settings digest and the sample index: the same run writes the same UIDs
    model: str
    seed: int
    sample_index: int


def write_image(path: Path, image: np.ndarray, affine: np.ndarray, output_format: str,
                identity: PairIdentity) -> dict[str, str]:
    """Write the int16 HU image; {file name relative to the folder: sha256} of every file written."""
    if output_format in ("nifti", "nii"):
        return {path.name: write_nifti(path, image, affine, compressed=output_format == "nifti")}
    if output_format == "nrrd":
        from maisi_cli.io.nrrd import write_nrrd_image
        return {path.name: write_nrrd_image(path, image, affine)}
    from maisi_cli.io.dicom import write_ct_series
    with folder_replaced(path):
        written = write_ct_series(path, image, affine, dicom_identity(identity))
    return {f"{path.name}/{name}": sha for name, sha in sorted(written.items())}


@contextmanager
def folder_replaced(path: Path) -> Iterator[None]:
    """Make room for a new series folder at `path`: the old one (a re-run with --overwrite) is moved aside under a
    `.partial` name, removed once the new one is in place, and put back if writing it fails."""
    if not path.exists() and not path.is_symlink():
        yield
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"--out: {path} is {kind_of(path.lstat().st_mode)}, not a series folder maisi wrote; "
                          "move it away")
    aside = temporary_name(path)
    path.rename(aside)
    try:
        yield
    except BaseException:
        if not path.exists():
            aside.rename(path)
        raise
    shutil.rmtree(aside)


def write_label(path: Path, labels: np.ndarray, affine: np.ndarray, output_format: str, identity: PairIdentity,
                image_path: Path) -> dict[str, str]:
    """Write the uint8 label map (for DICOM, a SEG referencing the series at `image_path`); {file name: sha256}."""
    if output_format in ("nifti", "nii"):
        return {path.name: write_nifti(path, labels, affine, compressed=output_format == "nifti")}
    from maisi_cli.colours import label_colour_table
    entries = label_colour_table(present_labels(labels))
    if output_format == "nrrd":
        from maisi_cli.io.nrrd import write_seg_nrrd
        return {path.name: write_seg_nrrd(path, labels, affine, entries)}
    from maisi_cli.io.dicom import write_segmentation
    names = {ident: name for ident, name, _ in entries}
    colours = {ident: colour for ident, _, colour in entries}
    return {path.name: write_segmentation(path, labels, affine, image_path, dicom_identity(identity), names,
                                          colours)}


def dicom_identity(identity: PairIdentity) -> Any:
    from maisi_cli._version import __version__
    from maisi_cli.io.dicom import DicomIdentity
    return DicomIdentity(uid_key=identity.uid_key, model=identity.model, seed=identity.seed,
                         sample_index=identity.sample_index, software_version=__version__)


def write_colour_tables(folder: Path) -> dict[str, str]:
    """The label dictionary's colour tables beside NIfTI labels (3D Slicer, ITK-SNAP); {file name: sha256}. The same
    bytes every time: each sample's write checks them, and writes them only when missing or changed."""
    from maisi_cli.colours import label_colour_table
    from maisi_cli.io.colour_tables import itksnap_label_description_bytes, slicer_colour_table_bytes
    entries = label_colour_table()
    tables = {SLICER_COLOUR_TABLE: slicer_colour_table_bytes(entries),
              ITKSNAP_LABELS: itksnap_label_description_bytes(entries)}
    return {name: written_once(folder / name, payload) for name, payload in tables.items()}


def written_once(path: Path, payload: bytes) -> str:
    """Write `payload` unless the file holds it already (a re-run leaves what is done untouched); its sha256."""
    wanted = hashlib.sha256(payload).hexdigest()
    if sha256_of_file(path) == wanted:
        return wanted
    return write_atomic(path, payload)
