"""NIfTI reading and atomic, byte-reproducible writing (nibabel)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from maisi_cli.errors import MaskError


def read_nifti(path: Path, field: str = "--mask", what: str = "label map") -> tuple[np.ndarray, np.ndarray]:
    """(3-D array as stored, 4×4 affine). A missing, unreadable or non-3-D file is a MaskError naming `field`;
    `what` names the kind of volume expected ("label map", "CT image")."""
    if not path.is_file():
        raise MaskError(f"{field}: '{path}' does not exist; give the path of a NIfTI {what} (.nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for a corrupt or foreign file
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise MaskError(f"{field}: '{path}' is not a readable NIfTI file ({reason})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskError(f"{field}: '{path}' has shape {data.shape}; a 3-D {what} is needed")
    return data, np.asarray(image.affine, dtype=np.float64)


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file as bytes, with no timestamp or file name in the gzip header, so the same array gives
    the same bytes every time."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    write_atomic(path, nifti_bytes(array, affine))
