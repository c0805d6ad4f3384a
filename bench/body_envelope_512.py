"""Seconds and peak memory of the body envelope (engine/masks/body.add_body_envelope) at the size users run:
a 512x512x512 CT at 0.8 mm with its organ labels (no 200), the patient lying on a scanner table.

The volume is synthetic, built slice by slice here (the phantoms of engine/phantoms.py would take minutes at this
size): an elliptical torso whose width varies along z (soft tissue 40 HU, a fat rim -100 HU, noise 15 HU), two
lungs (-850 HU, labelled), a liver and a spine (labelled), bowel gas pockets (-950 HU, unlabelled), and under the
back a 8 mm foam mattress (-920 HU) on a curved sandwich table (3 mm shells at 150 HU round a 25 mm foam core at
-930 HU) across the whole width. Peak memory: the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over its RSS before the call, per voxel, against ENVELOPE_BYTES_PER_VOXEL (the host-memory
check of read_body_ct). The Dice against the torso as drawn, and the table voxels labelled, check the result; the
sha256 of the output tells whether another implementation gives it voxel for voxel.

The envelope works in the box around what is not exterior air, so its worst case is a box as large as the volume:
`whole_box` is one more run with a voxel of soft tissue in two opposite corners of the CT (which puts them outside
the exterior air), for the seconds and the peak memory there.

Usage: python bench/body_envelope_512.py [--size 512] [--repeats 2] [--whole-box-runs 1] [--previous FILE]
       [--out FILE]  → bench/results/body_envelope_512.json at 512³
--previous: the results file of a run of the implementation before (run this script with PYTHONPATH on that
checkout and --out); its figures go under "before", and "same_output_as_before" compares the outputs' sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the bench's own helpers
from rss import reset_peak, status_bytes  # noqa: E402

HERE = Path(__file__).parent


def synthetic_case(n: int, rng: np.random.Generator):
    """(ct int16, labels uint8 without 200, true body bool, table bool) on an n³ grid of 409.6 mm."""
    spacing = 409.6 / n
    ct = np.full((n, n, n), -1000, dtype=np.int16)
    labels = np.zeros((n, n, n), dtype=np.uint8)
    body = np.zeros((n, n, n), dtype=bool)
    table = np.zeros((n, n, n), dtype=bool)
    x = ((np.arange(n) - (n - 1) / 2) * spacing)[:, None]  # left-right (mm)
    y = ((np.arange(n) - (n - 1) / 2) * spacing)[None, :]  # posterior-anterior (mm)
    back_y = -110.0  # the back's lowest point (mm)
    table_top = back_y - 8.0 + x**2 / 1600.0  # under an 8 mm mattress, curved
    for k in range(n):
        z = (k - (n - 1) / 2) * spacing
        lateral = 165.0 + 12.0 * np.sin(z / 70.0)
        anterior, posterior = 115.0 + 8.0 * np.sin(z / 55.0), 110.0
        rho = np.sqrt((x / lateral) ** 2 + (y / np.where(y > 0, anterior, posterior)) ** 2)
        torso = rho < 1.0
        fat = torso & (rho > 0.88)
        noise = rng.normal(0.0, 15.0, (n, n)).astype(np.float32)
        plane = np.where(torso, np.where(fat, -100.0, 40.0) + noise, -1000.0)
        plane_labels = np.zeros((n, n), dtype=np.uint8)
        if z > -40:  # lungs above the diaphragm
            for side, label in ((-1, 28), (1, 31)):
                lung = ((x - side * 75) / 60.0) ** 2 + ((y - 10) / 75.0) ** 2 < 1.0 - ((z - 120) / 170.0) ** 2
                plane = np.where(lung, -850.0 + noise, plane)
                plane_labels[lung] = label
        liver = ((x - 60) / 90.0) ** 2 + ((y - 10) / 70.0) ** 2 < 1.0 - ((z + 60) / 90.0) ** 2
        plane = np.where(liver, 90.0 + noise, plane)
        plane_labels[liver] = 1
        spine = (x / 22.0) ** 2 + ((y + 70) / 20.0) ** 2 < 1.0
        plane = np.where(spine, 400.0 + noise, plane)
        plane_labels[spine] = 33
        if z < -80:  # bowel gas, unlabelled
            gas = ((x + 40) / 20.0) ** 2 + ((y - 40) / 15.0) ** 2 < 1.0
            plane = np.where(gas, -950.0 + noise, plane)
        depth = table_top - y  # mm below the table's top surface
        layers = ((-8.0, 0.0, -920.0), (0.0, 3.0, 150.0), (3.0, 28.0, -930.0), (28.0, 31.0, 150.0))
        for low, high, hu in layers:
            layer = (depth > low) & (depth <= high) & ~torso
            plane = np.where(layer, hu + noise, plane)
            table[:, :, k] |= layer
        ct[:, :, k] = np.clip(np.rint(plane), -1000, 1000).astype(np.int16)
        labels[:, :, k] = plane_labels
        body[:, :, k] = torso
    return ct, labels, body, table


def _source_commit(module_file: str) -> str:
    """The commit of the checkout the measured module comes from, "+modified" when its file differs from it."""
    folder = Path(module_file).parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", module_file],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+modified" if changed else "")


def _measure(envelope, labels: np.ndarray, ct: np.ndarray) -> tuple[np.ndarray, float, int]:
    """(output, seconds, rise of the peak RSS in bytes) of one call."""
    base = reset_peak()
    started = time.perf_counter()
    out = envelope(labels, ct)
    seconds = time.perf_counter() - started
    return out, seconds, status_bytes("VmHWM") - base


def main() -> None:
    from maisi_cli.engine.masks import body as module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--whole-box-runs", type=int, default=1)
    parser.add_argument("--previous", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    ct, labels, body, table = synthetic_case(args.size, np.random.default_rng(0))
    build_s = time.perf_counter() - started
    seconds, rises = [], []
    for _ in range(args.repeats):
        out, took, rise = _measure(module.add_body_envelope, labels, ct)
        seconds.append(took)
        rises.append(rise)
        got = out > 0
        dice = 2.0 * np.count_nonzero(got & body) / (np.count_nonzero(got) + np.count_nonzero(body))
        table_labelled = int(np.count_nonzero(got & table))
        digest = hashlib.sha256(out.tobytes()).hexdigest()
        del out, got
    voxels = args.size**3
    result = {
        "what": "add_body_envelope on a synthetic CT with a scanner table (see the script's docstring)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
                   f"scipy {__import__('scipy').__version__}",
        "commit": _source_commit(module.__file__),
        "size": [args.size] * 3,
        "build_s": round(build_s, 1),
        "seconds": [round(s, 2) for s in seconds],
        "median_s": round(statistics.median(seconds), 2),
        "peak_rss_rise_bytes": max(rises),
        "peak_rss_rise_gib": round(max(rises) / 1024**3, 3),
        "bytes_per_voxel": round(max(rises) / voxels, 2),
        "envelope_bytes_per_voxel_constant": module.ENVELOPE_BYTES_PER_VOXEL,
        "inputs_bytes_per_voxel": ct.itemsize + labels.itemsize,
        "dice_vs_drawn_body": round(float(dice), 5),
        "table_voxels_labelled": table_labelled,
        "table_voxels": int(np.count_nonzero(table)),
        "output_sha256": digest,
    }
    if args.whole_box_runs:
        ct[0, 0, 0] = ct[-1, -1, -1] = 40
        runs = [_measure(module.add_body_envelope, labels, ct)[1:] for _ in range(args.whole_box_runs)]
        result["whole_box"] = {"seconds": [round(took, 2) for took, _ in runs],
                               "peak_rss_rise_gib": round(max(rise for _, rise in runs) / 1024**3, 3),
                               "bytes_per_voxel": round(max(rise for _, rise in runs) / voxels, 2)}
    if args.previous is not None:
        previous = json.loads(args.previous.read_text())
        keys = ("date", "commit", "seconds", "median_s", "peak_rss_rise_gib", "bytes_per_voxel", "output_sha256")
        result["before"] = {key: previous[key] for key in keys if key in previous}
        result["same_output_as_before"] = previous.get("output_sha256") == digest
    print(json.dumps(result, indent=1))
    out_path = args.out or (HERE / "results" / "body_envelope_512.json" if args.size == 512 else None)
    if out_path is not None:
        out_path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
