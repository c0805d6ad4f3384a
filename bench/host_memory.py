"""Measure the host bytes per voxel behind engine/memory.py's host-memory constants (Linux: VmHWM, the peak resident
memory, reset through /proc/self/clear_refs before each step). One step per process, so no step inherits another's
freed pages:

    python bench/host_memory.py                 # every step at the sizes below, one line each
    python bench/host_memory.py resample 96     # one step: resample | reorient | pad | bit_planes | output | write

Each line is the rise of the peak over the step, per voxel of the volume that step scales with, less the fixed cost
of MONAI's first call (measured as the intercept between two sizes, about 100 MB). Round up and paste into
MASK_FIT_BYTES, RESAMPLE_BYTES, PAD_CROP_BYTES, BIT_PLANE_BYTES and OUTPUT_BYTES.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the bench's own helpers
from rss import reset_peak, status_bytes  # noqa: E402

STEPS = {"reorient": (96, 192), "resample": (64, 96), "pad": (64, 96), "bit_planes": (96, 128),
         "output": (96, 160), "write": (128, 256)}


def measure(step: str, n: int) -> tuple[int, int]:
    """(peak rise in bytes, voxels it scales with) of one step on an n³ volume."""
    import torch

    from maisi_cli.engine.masks.user import fit_to_grid
    from maisi_cli.engine.postprocess import output_image, output_labels
    from maisi_cli.engine.sampling import label_bit_planes
    from maisi_cli.io.nifti import nifti_bytes

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    # made in their own dtypes: a freed int64 temporary would leave pages that the step then reuses unseen
    labels = rng.integers(0, 4, (n, n, n), dtype=np.uint8) * np.uint8(50)
    decoded = rng.random((n, n, n), dtype=np.float32) if step == "output" else None
    image = rng.integers(-1000, 1000, (n, n, n), dtype=np.int16) if step == "write" else None
    base = reset_peak()
    if step == "reorient":  # same grid: the int16 copy and the reorientation only
        fit_to_grid(labels, np.eye(4), (n, n, n), (1.0, 1.0, 1.0))
        voxels = n**3
    elif step == "resample":  # 1 mm → 0.5 mm: a grid of (2n - 1)³, cropped back to n³
        fit_to_grid(labels, np.eye(4), (n, n, n), (0.5, 0.5, 0.5))
        voxels = (2 * n - 1) ** 3
    elif step == "pad":  # same spacing, padded to 2n
        fit_to_grid(labels, np.eye(4), (2 * n,) * 3, (1.0, 1.0, 1.0))
        voxels = (2 * n) ** 3
    elif step == "bit_planes":
        label_bit_planes(torch.from_numpy(labels)[None, None])  # as pipeline.condition_inputs: uint8 labels
        voxels = n**3
    elif step == "output":
        output_image(decoded, "hu", labels), output_labels(labels, "full")
        voxels = n**3
    else:
        nifti_bytes(image, np.eye(4))
        voxels = n**3
    return status_bytes("VmHWM") - base, voxels


def main() -> None:
    if len(sys.argv) == 3:
        rise, voxels = measure(sys.argv[1], int(sys.argv[2]))
        print(rise, voxels)
        return
    for step, (small, large) in STEPS.items():
        points = []
        for n in (small, large):
            out = subprocess.run([sys.executable, __file__, step, str(n)], capture_output=True, text=True, check=True)
            points.append(tuple(int(v) for v in out.stdout.split()))
        (rise_a, voxels_a), (rise_b, voxels_b) = points
        per_voxel = (rise_b - rise_a) / (voxels_b - voxels_a)
        print(f"{step:11s} {per_voxel:6.1f} B/voxel (fixed {(rise_a - per_voxel * voxels_a) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
