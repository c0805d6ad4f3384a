"""Seconds and megabytes to write a 512x512x128 CT as NRRD (maisi_cli/io/nrrd.write_nrrd_image) and its label map as
a 3D Slicer segmentation (write_seg_nrrd, 20 labels and the body), beside the gzipped NIfTI pair for comparison.

The volume is synthetic: an elliptical torso (40 HU, noise 20 HU, air -1000 HU outside) at 0.8 x 0.8 x 2.5 mm with
20 ellipsoid organs labelled inside the body (200), so the data compress as a CT does (noise), not as zeros.
Peak memory: the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before each
write, per voxel.

Usage: python bench/nrrd_write_512.py [--depth 128] [--repeats 2]  → bench/results/nrrd_write_512.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maisi_cli.colours import label_colour_table
from maisi_cli.io.nifti import write_nifti
from maisi_cli.io.nrrd import write_nrrd_image, write_seg_nrrd

sys.path.insert(0, str(Path(__file__).parent))  # the bench's own helpers
from rss import reset_peak, status_bytes  # noqa: E402

HERE = Path(__file__).parent
ORGAN_IDS = (1, 3, 4, 5, 6, 7, 10, 12, 14, 15, 17, 19, 28, 29, 30, 31, 32, 35, 36, 37)  # 20 labels


def synthetic_pair(depth: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ct int16, labels uint8, affine) on a 512x512xdepth grid, built slice by slice."""
    n = 512
    ct = np.empty((n, n, depth), dtype=np.int16)
    labels = np.zeros((n, n, depth), dtype=np.uint8)
    x = (np.arange(n) - n / 2)[:, None]
    y = (np.arange(n) - n / 2)[None, :]
    torso = (x / 220.0) ** 2 + (y / 160.0) ** 2 < 1.0
    centres = rng.uniform(-0.5, 0.5, size=(len(ORGAN_IDS), 3)) * [250, 160, depth * 0.8]
    radii = rng.uniform(15, 45, size=(len(ORGAN_IDS), 3)) * [1, 1, depth / 256]
    for k in range(depth):
        z = k - depth / 2
        noise = rng.normal(0.0, 20.0, (n, n)).astype(np.float32)
        ct[:, :, k] = np.where(torso, 40.0 + noise, -1000.0).astype(np.int16)
        plane = np.where(torso, 200, 0).astype(np.uint8)
        for ident, (cx, cy, cz), (rx, ry, rz) in zip(ORGAN_IDS, centres, radii):
            inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 < 1.0
            plane[inside & torso] = ident
        labels[:, :, k] = plane
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [204.4, 204.4, -160.0]
    return ct, labels, affine


def timed(write, *args) -> tuple[float, int]:
    """(seconds, peak RSS rise in bytes) of one call."""
    before = reset_peak()
    start = time.perf_counter()
    write(*args)
    return time.perf_counter() - start, status_bytes("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "nrrd_write_512.json")
    options = parser.parse_args()

    start = time.perf_counter()
    ct, labels, affine = synthetic_pair(options.depth, np.random.default_rng(0))
    build_s = time.perf_counter() - start
    entries = label_colour_table()
    voxels = ct.size
    writers = {
        "image.nrrd": (write_nrrd_image, ct),
        "labels.seg.nrrd": (lambda path, data, a: write_seg_nrrd(path, data, a, entries), labels),
        "image.nii.gz": (write_nifti, ct),
        "labels.nii.gz": (write_nifti, labels),
    }
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (write, data) in writers.items():
            path = Path(folder) / name
            runs = [timed(write, path, data, affine) for _ in range(options.repeats)]
            results[name] = {
                "seconds": [round(s, 3) for s, _ in runs],
                "median_s": round(statistics.median(s for s, _ in runs), 3),
                "mb": round(path.stat().st_size / 1e6, 2),
                "peak_rss_rise_bytes_per_voxel": round(max(peak for _, peak in runs) / voxels, 2),
            }
            print(name, results[name], flush=True)

    document = {
        "what": "write_nrrd_image and write_seg_nrrd (20 labels + body) beside write_nifti (see the script's "
                "docstring); gzip level 1 in both formats",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}",
        "size": list(ct.shape),
        "segments": int(len(np.unique(labels)) - 1),
        "raw_mb": {"image": round(ct.nbytes / 1e6, 2), "labels": round(labels.nbytes / 1e6, 2)},
        "build_s": round(build_s, 1),
        "results": results,
        "pair_nrrd_s": round(results["image.nrrd"]["median_s"] + results["labels.seg.nrrd"]["median_s"], 2),
        "pair_nifti_s": round(results["image.nii.gz"]["median_s"] + results["labels.nii.gz"]["median_s"], 2),
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
