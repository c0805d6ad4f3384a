"""Voxels per label id of a uint8 label map, counted in blocks: a whole-volume `np.bincount` first converts its input
to intp (8 bytes a voxel: 1 GiB at 512³). Every writer, check and sidecar that asks "which labels, how many voxels"
calls this."""

from __future__ import annotations

import numpy as np

BLOCK_VOXELS = 1 << 22  # per np.bincount call: a 32 MiB intp copy at most


def label_counts(labels: np.ndarray, length: int = 256) -> np.ndarray:
    """Voxels per id 0..length-1 (int64) of an unsigned integer map (uint8; uint16 with a larger `length`), in
    whatever memory order it is stored."""
    flat = labels.ravel(order="K")  # a view of a C- or Fortran-ordered array (nibabel's are Fortran); no copy
    counts = np.zeros(length, dtype=np.int64)
    for start in range(0, flat.size, BLOCK_VOXELS):
        counts += np.bincount(flat[start:start + BLOCK_VOXELS], minlength=length)
    return counts


def relabelled(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`table[labels]` as uint8, in blocks of the array's own memory order: one uint8 copy, no whole-volume intp
    index (a fancy index converts its index array to intp first)."""
    order = "F" if labels.flags.f_contiguous and not labels.flags.c_contiguous else "C"  # nibabel's arrays: F
    out = np.empty(labels.shape, dtype=np.uint8, order=order)
    source, target = labels.ravel(order=order), out.ravel(order=order)  # target is a view of out
    for start in range(0, source.size, BLOCK_VOXELS):
        target[start:start + BLOCK_VOXELS] = table[source[start:start + BLOCK_VOXELS]]
    return out


def present_labels(labels: np.ndarray) -> list[int]:
    """The ids a uint8 map holds, background (0) excluded, in increasing order."""
    return [int(i) for i in np.flatnonzero(label_counts(labels)) if i != 0]
