"""Seconds, megabytes on disk and peak memory to write a 512x512x128 int16 CT as a DICOM CT series (one instance
per slice, io/dicom.write_ct_series) and its label map as a DICOM SEG (io/dicom.write_segmentation) on this CPU.

The case is synthetic, built here: an elliptical torso (body, label 200) holding 19 ellipsoid organs with the ids
and names of the label dictionary, HU by structure plus noise, on a RAS grid of 0.8 x 0.8 x 2.5 mm. Peak memory:
the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before each write.

Usage: python bench/dicom_write_512.py [--size 512] [--slices 128] [--repeats 2] [--out FILE]
       → bench/results/dicom_write_512.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maisi_cli._version import __version__
from maisi_cli.io.dicom import DicomIdentity, write_ct_series, write_segmentation
from maisi_cli.labels import label_dictionary

sys.path.insert(0, str(Path(__file__).parent))  # the bench's own helpers
from rss import reset_peak, status_bytes  # noqa: E402

HERE = Path(__file__).parent
ORGANS = ("liver", "spleen", "pancreas", "aorta", "inferior vena cava", "gallbladder", "stomach", "esophagus",
          "duodenum", "left kidney", "right kidney", "left adrenal gland", "right adrenal gland", "bladder",
          "left lung upper lobe", "right lung upper lobe", "vertebrae L1", "vertebrae L2", "hepatic tumor")


def phantom(size: int, slices: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(ct int16 HU, labels uint8, {id: name}) of a torso with 19 organs, built slice by slice (no float64 volume)."""
    dictionary = label_dictionary()
    ids = {dictionary[name]: name for name in ORGANS if name in dictionary}
    ids[dictionary["body"]] = "body"
    ct = np.full((size, size, slices), -1000, dtype=np.int16)
    labels = np.zeros((size, size, slices), dtype=np.uint8)
    x = np.linspace(-1, 1, size, dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, size, dtype=np.float32)[None, :]
    organs = [(ident, rng.uniform(-0.5, 0.5, 3), rng.uniform(0.06, 0.2, 3), rng.integers(-100, 300))
              for ident in ids if ids[ident] != "body"]
    for k in range(slices):
        z = -1 + 2 * k / max(slices - 1, 1)
        body = (x / 0.85) ** 2 + (y / 0.6) ** 2 <= 1
        labels[:, :, k][body] = dictionary["body"]
        ct[:, :, k][body] = 40
        for ident, centre, radii, hu in organs:
            inside = (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                      + ((z - centre[2]) / (radii[2] * 3)) ** 2 <= 1) & body
            labels[:, :, k][inside] = ident
            ct[:, :, k][inside] = hu
        ct[:, :, k] += rng.normal(0, 15, (size, size)).astype(np.int16)
    return ct, labels, ids


def colour_of(ident: int) -> tuple[int, int, int]:
    """A fixed colour per id (the bench needs some colour, not the project's palette)."""
    return (ident * 97) % 256, (ident * 57 + 80) % 256, (ident * 151 + 40) % 256


def timed(write, *args) -> tuple[float, int]:
    before = reset_peak()
    start = time.perf_counter()
    write(*args)
    return time.perf_counter() - start, status_bytes("VmHWM") - before


def megabytes(path: Path) -> float:
    files = [path] if path.is_file() else list(path.iterdir())
    return sum(f.stat().st_size for f in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dicom_write_512.json")
    options = parser.parse_args()

    import_start = time.perf_counter()
    import highdicom  # imported once per process by the writers: timed apart from the writes
    import pydicom

    import_s = time.perf_counter() - import_start
    build_start = time.perf_counter()
    ct, labels, names = phantom(options.size, options.slices, np.random.default_rng(0))
    build_s = time.perf_counter() - build_start
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-204.4, -204.4, -160.0]
    identity = DicomIdentity("bench:0", "rflow-ct", 0, 0, __version__)
    colours = {ident: colour_of(ident) for ident in names}
    ct_runs, seg_runs, same = [], [], []
    with tempfile.TemporaryDirectory() as root:
        first_ct, first_seg = Path(root) / "ct0", Path(root) / "seg0.dcm"
        for repeat in range(options.repeats):
            folder, seg = Path(root) / f"ct{repeat}", Path(root) / f"seg{repeat}.dcm"
            ct_runs.append(timed(write_ct_series, folder, ct, affine, identity))
            seg_runs.append(timed(write_segmentation, seg, labels, affine, folder, identity, names, colours))
            ct_mb, seg_mb = megabytes(folder), megabytes(seg)
            if repeat:  # a re-run writes the same bytes
                same.append(all((first_ct / f.name).read_bytes() == f.read_bytes() for f in folder.iterdir())
                            and seg.read_bytes() == first_seg.read_bytes())
                shutil.rmtree(folder)
        filesystem = subprocess.run(["df", "--output=fstype", root], capture_output=True, text=True).stdout.split()[-1]

    result = {
        "what": "write_ct_series + write_segmentation of a synthetic torso (see the script's docstring)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), numpy {np.__version__}, "
                   f"pydicom {pydicom.__version__}, highdicom {highdicom.__version__}, temporary folder on "
                   f"{filesystem}",
        "size": list(ct.shape),
        "labels_present": len(names),
        "import_pydicom_highdicom_s": round(import_s, 2),
        "build_s": round(build_s, 1),
        "ct_series_s": [round(s, 2) for s, _ in ct_runs],
        "ct_series_median_s": round(statistics.median(s for s, _ in ct_runs), 2),
        "ct_series_mb": round(ct_mb, 1),
        "ct_series_files": options.slices,
        "ct_peak_rss_rise_mib": round(max(m for _, m in ct_runs) / 2 ** 20, 1),
        "seg_s": [round(s, 2) for s, _ in seg_runs],
        "seg_median_s": round(statistics.median(s for s, _ in seg_runs), 2),
        "seg_mb": round(seg_mb, 1),
        "seg_peak_rss_rise_mib": round(max(m for _, m in seg_runs) / 2 ** 20, 1),
        "repeats_same_bytes": all(same) if same else None,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
