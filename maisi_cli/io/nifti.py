"""NIfTI reading and atomic, byte-reproducible writing (nibabel)."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np

from maisi_cli.cpus import usable_cpus
from maisi_cli.errors import MaskError
from maisi_cli.io.files import write_atomic

try:  # ISA-L's deflate: about 3.5x zlib's level 1 at the same size (bench/gzip_write_512.py)
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - a platform without the wheel: the standard library's zlib
    _isal_zlib = None


@dataclass(frozen=True)
class NiftiHeader:
    """What a NIfTI file's header says of its volume, read without loading the voxels."""

    shape: tuple[int, int, int]
    dtype: np.dtype  # of the array as read: float64 when the header scales the stored values (scl_slope/scl_inter)
    affine: np.ndarray  # 4×4, finite, with a non-singular 3×3 part

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize


def affine_problem(affine: np.ndarray) -> str | None:
    """Why a voxel-to-world affine cannot place voxels (None when it can): non-finite entries, a zero voxel
    spacing (a zero column) or a singular 3×3 part (two axes along one direction)."""
    if not np.all(np.isfinite(affine)):
        return "non-finite entries"
    columns = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not np.all(columns > 0):
        return f"voxel spacing {'x'.join(f'{c:g}' for c in columns)} mm"
    # relative to the column lengths, so a fine but valid grid (0.01 mm) is not called singular
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(columns)):
        return "a singular 3x3 part: two voxel axes point the same way"
    return None


def _open_nifti(path: Path, field: str, what: str) -> tuple[nib.Nifti1Image, NiftiHeader]:
    """The lazily loaded image and its checked header: 3-D (or 4-D with one volume), a usable affine."""
    if not path.is_file():
        raise MaskError(f"{field}: '{path}' does not exist; give the path of a NIfTI {what} (.nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
        stored = np.dtype(image.get_data_dtype())
        scaled = (getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)) != (1.0, 0.0)
    except Exception as error:  # nibabel raises many types for a corrupt or foreign file
        raise MaskError(f"{field}: '{path}' is not a readable NIfTI file ({_reason(error)})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise MaskError(f"{field}: '{path}' has shape {shape}; a 3-D {what} is needed")
    problem = affine_problem(affine)
    if problem:
        raise MaskError(f"{field}: '{path}' has a degenerate affine ({problem}); fix its header (sform/qform) so "
                        "each voxel axis has a finite, non-zero spacing")
    dtype = np.dtype(np.float64) if scaled else stored
    return image, NiftiHeader(shape, dtype, affine)  # type: ignore[arg-type]


def _reason(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__


def read_nifti_header(path: Path, field: str = "--mask", what: str = "label map") -> NiftiHeader:
    """The checked header alone (shape, dtype, affine): for sizing a volume before reading it."""
    return _open_nifti(path, field, what)[1]


def read_nifti(path: Path, field: str = "--mask", what: str = "label map") -> tuple[np.ndarray, np.ndarray]:
    """(3-D array as stored, 4×4 affine). A missing, unreadable or non-3-D file, or one whose affine cannot place
    its voxels, is a MaskError naming `field`; `what` names the kind of volume expected ("label map", "CT image")."""
    image, header = _open_nifti(path, field, what)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # a truncated or corrupt data part
        raise MaskError(f"{field}: '{path}' is not a readable NIfTI file ({_reason(error)})") from None
    return data.reshape(header.shape), header.affine


def nifti_bytes_uncompressed(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A NIfTI-1 file (`.nii`) as bytes: the array's dtype, the affine as both qform and sform, units mm."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image.to_bytes()


GZIP_LEVEL = 1  # the fastest level of either backend: level 9 takes many times longer for a few per cent smaller files
GZIP_BLOCK = 8 * 1024 * 1024  # input bytes deflated apart (then joined): fixed, so the bytes never depend on threads
GZIP_WINDOW = 32 * 1024  # deflate's window: each block starts from the 32 KiB before it, as if never split
GZIP_MAX_THREADS = 8


def gzip_backend() -> ModuleType:
    """The deflate implementation `gzip_bytes` uses: python-isal's isal_zlib when it imports, else zlib."""
    return _isal_zlib if _isal_zlib is not None else zlib


def gzip_threads() -> int:
    """Threads that deflate blocks at once: the CPUs this process may run on, at most GZIP_MAX_THREADS."""
    return usable_cpus(GZIP_MAX_THREADS)


def gzip_bytes(payload: bytes, backend: ModuleType | None = None, threads: int | None = None) -> bytes:
    """One gzip member of `payload`: no file name, mtime 0, deflated in GZIP_BLOCK blocks on `threads` threads.

    Each block is deflated on its own with the 32 KiB before it as its preset dictionary and ends in a sync flush
    (the last one finishes the stream), and the blocks are joined in order, as pigz does: any gzip reader reads one
    stream. The bytes depend on `payload`, the block size and the backend only, never on the thread count or timing,
    so the same array gives the same file on a re-run. `backend`: a zlib-like module (isal_zlib or zlib; default
    `gzip_backend()`)."""
    backend = backend or gzip_backend()
    view = memoryview(payload).cast("B")
    blocks = [(max(0, start - GZIP_WINDOW), start, min(start + GZIP_BLOCK, len(view)))
              for start in range(0, len(view), GZIP_BLOCK)] or [(0, 0, 0)]

    def deflated(block: tuple[int, int, int]) -> bytes:
        window, start, end = block
        options = {"zdict": bytes(view[window:start])} if start > window else {}
        compressor = backend.compressobj(GZIP_LEVEL, backend.DEFLATED, -15, **options)
        last = end == len(view)
        return compressor.compress(view[start:end]) + compressor.flush(backend.Z_FINISH if last else
                                                                       backend.Z_SYNC_FLUSH)

    workers = min(threads or gzip_threads(), len(blocks))
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="maisi-gzip") as pool:
            parts = list(pool.map(deflated, blocks))  # the deflate calls release the GIL
    else:
        parts = [deflated(block) for block in blocks]
    # ID1 ID2, deflate, no flags, mtime 0, XFL 4 (fastest), OS 255 (unknown): nothing of the machine or the time
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
    trailer = struct.pack("<II", backend.crc32(view) & 0xFFFFFFFF, len(view) & 0xFFFFFFFF)
    return b"".join([header, *parts, trailer])


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file as bytes (`gzip_bytes`: no timestamp or file name in the gzip header), so the same
    array gives the same bytes every time."""
    return gzip_bytes(nifti_bytes_uncompressed(array, affine))


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, compressed: bool = True) -> str:
    """Write a NIfTI atomically, gzipped (`.nii.gz`) or not (`.nii`); returns the sha256 of the file's bytes (recorded
    in the sidecar)."""
    payload = nifti_bytes(array, affine) if compressed else nifti_bytes_uncompressed(array, affine)
    return write_atomic(path, payload)
