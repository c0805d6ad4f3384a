"""Seconds and megabytes to write one 512x512x128 pair (int16 CT + uint8 labels, 20 organs and the body) in each
`maisi generate --format`, through the writers generate uses (maisi_cli/engine/outputs.py write_image, write_label).

The pair is bench/nrrd_write_512.py's synthetic torso (noise 20 HU, so it compresses as a CT does). Each format is
written `--repeats` times into a fresh folder; the median is reported. DICOM needs the dicom extra.

Usage: python bench/output_formats_512.py [--depth 128] [--repeats 2]  → bench/results/output_formats_512.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maisi_cli.engine.outputs import OUTPUT_FORMATS, PairIdentity, pair_paths, write_image, write_label

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from nrrd_write_512 import synthetic_pair  # noqa: E402  (the same synthetic pair as the NRRD bench)


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def write_once(folder: Path, output_format: str, ct: np.ndarray, labels: np.ndarray,
               affine: np.ndarray) -> dict[str, float]:
    image_path, label_path = pair_paths(folder, "sample_0000", output_format)
    identity = PairIdentity("bench:0", "bench", 0, 0)
    start = time.perf_counter()
    write_image(image_path, ct, affine, output_format, identity)
    image_s = time.perf_counter() - start
    start = time.perf_counter()
    write_label(label_path, labels, affine, output_format, identity, image_path)
    label_s = time.perf_counter() - start
    return {"image_s": image_s, "label_s": label_s, "image_mb": size_mb(image_path), "label_mb": size_mb(label_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "output_formats_512.json")
    options = parser.parse_args()
    ct, labels, affine = synthetic_pair(options.depth, np.random.default_rng(0))
    results = {}
    for output_format in OUTPUT_FORMATS:
        runs = []
        for _ in range(options.repeats):
            folder = Path(tempfile.mkdtemp())
            try:
                runs.append(write_once(folder, output_format, ct, labels, affine))
            finally:
                shutil.rmtree(folder)
        results[output_format] = {
            "image_s": round(statistics.median(r["image_s"] for r in runs), 2),
            "label_s": round(statistics.median(r["label_s"] for r in runs), 2),
            "pair_s": round(statistics.median(r["image_s"] + r["label_s"] for r in runs), 2),
            "image_mb": runs[0]["image_mb"], "label_mb": runs[0]["label_mb"],
            "runs_pair_s": [round(r["image_s"] + r["label_s"], 2) for r in runs],
        }
        print(output_format, results[output_format], flush=True)
    document = {
        "what": "one pair written by maisi_cli.engine.outputs in each --format (see the script's docstring)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), numpy {np.__version__}",
        "size": list(ct.shape),
        "segments": int(len(np.unique(labels)) - 1),
        "results": results,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
