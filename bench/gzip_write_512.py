"""Seconds to write one 512x512x512 pair (int16 CT + uint8 labels) as `maisi generate` writes it, by writer:

- `stdlib gzip level 1`: the writer before python-isal (gzip.compress, level 1, mtime 0, one stream);
- `zlib blocks`: io/nifti.gzip_bytes on the standard library's zlib (the fallback without python-isal);
- `zlib-ng level 1`: zlib_ng's gzip.compress, one stream (only where zlib-ng is installed; not adopted);
- `isal blocks` (adopted, the default): io/nifti.gzip_bytes on python-isal's isal_zlib, level 1, 8 MiB blocks on the
  machine's threads (output independent of the thread count);
- `nii`: uncompressed (`--format nii`).

Each writer makes the NIfTI bytes and writes them atomically (io/files.write_atomic, fsync included) into a fresh
folder; the median of `--repeats` is reported with the file sizes and the peak resident memory rise. The pair is
bench/nrrd_write_512.py's synthetic torso (noise 20 HU, so it compresses as a CT does).

Usage: python bench/gzip_write_512.py [--depth 512] [--repeats 3]  → bench/results/gzip_write_512.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from maisi_cli.io import nifti
from maisi_cli.io.files import write_atomic

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from nrrd_write_512 import synthetic_pair  # noqa: E402
from rss import reset_peak, status_bytes  # noqa: E402


def stdlib_gzip(payload: bytes) -> bytes:
    return gzip.compress(payload, compresslevel=1, mtime=0)


def writers() -> dict[str, object]:
    found = {"stdlib gzip level 1": stdlib_gzip,
             "zlib blocks": lambda payload: nifti.gzip_bytes(payload, backend=zlib)}
    try:
        from zlib_ng import gzip_ng

        found["zlib-ng level 1"] = lambda payload: gzip_ng.compress(payload, compresslevel=1, mtime=0)
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        found["isal blocks (adopted)"] = lambda payload: nifti.gzip_bytes(payload, backend=isal_zlib)
    except ImportError:
        pass
    found["nii (uncompressed)"] = None
    return found


def write_pair(folder: Path, compress, ct: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    suffix = ".nii" if compress is None else ".nii.gz"
    sizes, seconds = {}, {}
    for name, array in (("image", ct), ("label", labels)):
        start = time.perf_counter()
        payload = nifti.nifti_bytes_uncompressed(array, affine)
        if compress is not None:
            payload = compress(payload)
        path = folder / f"sample_0000_{name}{suffix}"
        write_atomic(path, payload)
        seconds[f"{name}_s"] = time.perf_counter() - start
        sizes[f"{name}_mb"] = round(path.stat().st_size / 1e6, 2)
        if compress is not None:  # readable as one gzip stream, the same voxels
            assert gzip.decompress(path.read_bytes()) == nifti.nifti_bytes_uncompressed(array, affine)
    return {**seconds, "pair_s": sum(seconds.values()), **sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gzip_write_512.json")
    options = parser.parse_args()
    ct, labels, affine = synthetic_pair(options.depth, np.random.default_rng(0))
    results = {}
    for name, compress in writers().items():
        runs, peaks = [], []
        for _ in range(options.repeats):
            with tempfile.TemporaryDirectory(dir=HERE) as folder:
                base = reset_peak()
                runs.append(write_pair(Path(folder), compress, ct, labels, affine))
                peaks.append(status_bytes("VmHWM") - base)
        results[name] = {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}
        results[name]["peak_rss_rise_mb"] = round(max(peaks) / 1e6)
        print(name, results[name], flush=True)
    baseline = results["stdlib gzip level 1"]["pair_s"]
    for entry in results.values():
        entry["speedup_vs_stdlib"] = round(baseline / entry["pair_s"], 2)
    document = {
        "what": f"one 512x512x{options.depth} pair (int16 CT + uint8 labels) made into NIfTI bytes and written "
                "atomically, by writer; median of the repeats",
        "machine": {"cpus": os.cpu_count(), "gzip_threads": nifti.gzip_threads(), "platform": platform.platform(),
                    "load_average_at_end": [round(v, 1) for v in os.getloadavg()]},
        "repeats": options.repeats,
        "results": results,
    }
    options.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
