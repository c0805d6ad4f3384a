"""bf16 autocast against fp32 on the CPU, end to end through `maisi generate`: what it changes in the images and
what it saves in time (issue 9, part 2: should the `cpu` profile default to bf16?).

Two cases, each generated twice with the same seed and masks, once with `--precision fp32`, once `--precision bf16`:
- `demo`: the trained demo model shipped in the package, 64³, its candidate masks (`-n SAMPLES`). The figures that
  matter: per-voxel |ΔHU|, the organ medians that QC checks (liver, spleen, kidney, lung, bone), labels identical.
- `rflow-ct`: the full-size networks (random weights in the released layout, as `generate_cpu.py`) at `--size`:
  the time that bf16 saves end to end (the demo's networks are too small for that to show). Random weights make
  the images meaningless, so only the times are read from this case.

QC is off (`--no-qc`) so both precisions judge the first attempt of each sample with the same mask.

Usage: python bench/bf16_cpu.py [--samples 4] [--size 64]   → bench/results/bf16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))
ORGANS = ("liver", "spleen", "kidney", "lung", "bone")


def generate(out: Path, precision: str, *args: object) -> float:
    """Run `maisi generate … --precision P --out OUT`; wall seconds."""
    command = [sys.executable, "-m", "maisi_cli", "--quiet", "generate", "--no-qc", "--device", "cpu",
               "--precision", precision, "--out", str(out), *map(str, args)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MAISI_HOME": str(out.parent / "home")})
    if result.returncode != 0:
        raise SystemExit(f"maisi generate --precision {precision} failed: {result.stderr.strip()[-400:]}")
    return time.perf_counter() - start


def stage_seconds(out: Path) -> dict[str, float]:
    totals: dict[str, float] = {}
    for report in sorted(out.glob("sample_*.json")):
        for key, value in json.loads(report.read_text())["timings"].items():
            totals[key] = round(totals.get(key, 0.0) + value, 3)
    return totals


def compare_pairs(fp32: Path, bf16: Path) -> dict:
    import nibabel as nib

    from maisi_cli.engine.qc import ORGAN_LABELS

    differences, organ_shift, labels_identical = [], {organ: [] for organ in ORGANS}, True
    for image32 in sorted(fp32.glob("sample_*_image.nii.gz")):
        image16 = bf16 / image32.name
        label_name = image32.name.replace("_image", "_label")
        a = np.asarray(nib.load(str(image32)).dataobj, dtype=np.float32)
        b = np.asarray(nib.load(str(image16)).dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(fp32 / label_name)).dataobj)
        labels_identical &= bool(np.array_equal(labels, np.asarray(nib.load(str(bf16 / label_name)).dataobj)))
        differences.append(np.abs(a - b).ravel())
        for organ in ORGANS:
            inside = np.isin(labels, ORGAN_LABELS[organ])
            if inside.any():
                organ_shift[organ].append(float(np.median(b[inside]) - np.median(a[inside])))
    delta = np.concatenate(differences)
    return {
        "pairs": len(differences),
        "abs_delta_hu": {"mean": round(float(delta.mean()), 2), "median": float(np.median(delta)),
                         "p99": float(np.percentile(delta, 99)), "max": float(delta.max())},
        "organ_median_shift_hu": {organ: {"mean": round(float(np.mean(v)), 2), "max_abs": float(np.max(np.abs(v)))}
                                  for organ, v in organ_shift.items() if v},
        "labels_identical": labels_identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4, help="demo pairs per precision")
    parser.add_argument("--size", type=int, default=64, help="image size of the full-size rflow-ct case")
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "maisi-bench-weights")
    parser.add_argument("--tag", default="")
    options = parser.parse_args()

    import torch

    from maisi_cli.engine.runtime import cpu_computes_bf16

    from maisi_cli.models import get_model
    from tests.helpers import write_mask, write_released_weights

    work = Path(tempfile.mkdtemp(prefix="maisi-bf16-"))
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "cpu_native_bf16": cpu_computes_bf16(),
    }

    demo = {}
    for precision in ("fp32", "bf16"):
        out = work / f"demo-{precision}"
        demo[precision] = {"wall_s": round(generate(out, precision, "--model", "demo", "-n", options.samples,
                                                    "--seed", 11), 2),
                           "stages_s": stage_seconds(out)}
    results["demo"] = {"what": f"demo model (trained), 64³, {options.samples} pairs, seed 11", **demo,
                       **compare_pairs(work / "demo-fp32", work / "demo-bf16")}

    spec = get_model("rflow-ct")
    if not (options.weights / spec.weights["controlnet"]).exists():
        write_released_weights(spec, options.weights)
    size = options.size
    mask = write_mask(work / "mask.nii.gz", (size,) * 3, (1.5,) * 3)
    full = {}
    for precision in ("fp32", "bf16"):
        out = work / f"full-{precision}"
        full[precision] = {"wall_s": round(generate(out, precision, "--weights-dir", options.weights, "--mask", mask,
                                                    "--size", size, "--spacing", 1.5, "--allow-any-size"), 2),
                           "stages_s": stage_seconds(out)}
    full["bf16_vs_fp32_wall"] = round(full["bf16"]["wall_s"] / full["fp32"]["wall_s"], 3)
    results["rflow_ct_full_size"] = {"what": f"rflow-ct full-size networks, random weights, {size}³, 30 steps", **full}

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bf16_cpu{options.tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
