"""Seconds and peak memory of reading a TotalSegmentator class folder (engine/masks/class_folder.read_class_folder) at
the size users bring: 117 binary uint8 files of 512x512x300, one per class of task "total", as TotalSegmentator
writes them (gzipped; most classes absent, so their files are all zero).

The folder is synthetic: 30 classes hold an ellipsoid each (a few of them overlapping, so the overlap rule runs),
the other 87 are all zero. It is read with one reader thread (the order-by-order read before the threads came) and
with the default (up to MAX_READ_THREADS, as many as the CPUs and the free memory allow); the two merged maps must be
equal voxel for voxel. Peak memory: the rise of the process's peak RSS (VmHWM) over its RSS before the call.

Usage: python bench/class_folder_read_512.py [--shape 512x512x300] [--repeats 1] [--out FILE]
       → bench/results/class_folder_read_512.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the bench's own helpers
from rss import reset_peak, status_bytes  # noqa: E402

from maisi_cli.engine.masks import class_folder  # noqa: E402
from maisi_cli.label_schemes import label_scheme  # noqa: E402

HERE = Path(__file__).parent


def write_folder(folder: Path, shape: tuple[int, int, int], rng: np.random.Generator) -> None:
    scheme = label_scheme("totalsegmentator")
    names = [name for ident, name in sorted(scheme.class_names.items()) if ident != 200]
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    filled = set(rng.choice(len(names), size=30, replace=False).tolist())
    empty = None  # the absent classes' files are all the same bytes: compressed once
    for index, name in enumerate(names):
        path = folder / f"{name}.nii.gz"
        if index not in filled and empty is not None:
            path.write_bytes(empty)
            continue
        data = np.zeros(shape, dtype=np.uint8)
        if index in filled:
            centre = [rng.uniform(0.25, 0.75) * n for n in shape]
            radii = [rng.uniform(0.05, 0.15) * n for n in shape]
            inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
            data[inside] = 1
        nib.save(nib.Nifti1Image(data, affine), str(path))
        if index not in filled:
            empty = path.read_bytes()


def timed_read(folder: Path, threads: int | None) -> tuple[float, int, str]:
    scheme = label_scheme("totalsegmentator")
    saved = class_folder.MAX_READ_THREADS
    if threads is not None:
        class_folder.MAX_READ_THREADS = threads
    try:
        before = reset_peak()
        start = time.perf_counter()
        merged, _affine, _warnings = class_folder.read_class_folder(folder, scheme)
        seconds = time.perf_counter() - start
        peak = status_bytes("VmHWM") - before
    finally:
        class_folder.MAX_READ_THREADS = saved
    return seconds, peak, hashlib.sha256(np.ascontiguousarray(merged).tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512x512x300")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "class_folder_read_512.json")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    with tempfile.TemporaryDirectory(prefix="maisi-class-folder-") as root:
        folder = Path(root) / "segmentations"
        folder.mkdir()
        start = time.perf_counter()
        write_folder(folder, shape, np.random.default_rng(0))
        written = time.perf_counter() - start
        runs: dict[str, dict] = {}
        for label, threads in (("one_thread", 1), ("default_threads", None)):
            results = [timed_read(folder, threads) for _ in range(args.repeats)]
            runs[label] = {"seconds": [round(r[0], 2) for r in results],
                           "median_s": round(statistics.median(r[0] for r in results), 2),
                           "peak_rise_mib": round(max(r[1] for r in results) / 2**20, 1),
                           "merged_sha256": results[0][2]}
        folder_bytes = sum(f.stat().st_size for f in folder.iterdir())
    document = {
        "what": "read_class_folder of 117 TotalSegmentator-style class files (30 holding a structure)",
        "shape": list(shape), "files": 117, "folder_mib": round(folder_bytes / 2**20, 1),
        "write_folder_s": round(written, 1),
        "runs": runs,
        "threads_default": min(class_folder.MAX_READ_THREADS, os.cpu_count() or 1),
        "same_map": runs["one_thread"]["merged_sha256"] == runs["default_threads"]["merged_sha256"],
        "speedup": round(runs["one_thread"]["median_s"] / runs["default_threads"]["median_s"], 2),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
