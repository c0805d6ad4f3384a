"""The `demo` model's quality on 20 generated pairs, measured through the CLI as a user would.

    python bench/demo/quality.py [--samples 20] [--seed 100] [--work DIR]

1. `maisi generate --model demo -n 20 --no-qc`: condition masks from the demo's candidate database (phantoms of a
   seed the networks never saw), augmented; QC is off so that the first attempt of every sample is judged.
2. QC: `maisi qc IMAGE LABEL --model demo` (the organ medians against the demo's phantom statistics) on each pair —
   the share that passes.
3. HU: per organ (liver, spleen, kidney, lung, bone: the QC label sets), the median HU of each generated image under
   the condition mask; the median of those over the samples against the phantoms' median (the `median` of
   `datasets/image_median_statistics.json`, computed from the 200 training phantoms). Target: within 40 HU.
4. Dice between the condition mask's organ and the organ segmented back from the image by HU thresholds:
   - lung: HU < −400 inside the body (mask ≠ 0), against the union of the five lobes;
   - liver: HU within ±45 HU of the phantoms' liver median, inside the liver dilated by 3 voxels (18 mm), largest
     connected component, against the liver. The dilation limits the search to the liver's neighbourhood: spleen,
     kidney and muscle share its HU elsewhere in the torso, so a global threshold would measure the anatomy, not
     the model. Target: Dice ≥ 0.7 for both.
   The same segmentation run on the training phantoms' own CTs gives the ceiling of each Dice (`phantom_dice`).
Writes bench/demo/results/quality.json and prints a summary; `--work` keeps the generated files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
ORGANS = ("liver", "spleen", "kidney", "lung", "bone")
HU_TOLERANCE = 40.0
LIVER_HALF_WINDOW = 45.0
LUNG_THRESHOLD = -400.0


def maisi(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "maisi_cli", *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if check and result.returncode != 0:
        raise SystemExit(f"maisi {' '.join(map(str, args[:3]))} failed: {result.stderr.strip()[-400:]}")
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else float("nan")


def lung_from_hu(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (image < LUNG_THRESHOLD) & (labels != 0)


def liver_from_hu(image: np.ndarray, labels: np.ndarray, liver_median: float) -> np.ndarray:
    from scipy import ndimage

    near = ndimage.binary_dilation(labels == 1, iterations=3)
    candidate = near & (np.abs(image - liver_median) <= LIVER_HALF_WINDOW)
    components, count = ndimage.label(candidate)
    if count == 0:
        return candidate
    sizes = np.bincount(components.ravel())[1:]
    return components == (1 + int(np.argmax(sizes)))


def organ_dice(image: np.ndarray, labels: np.ndarray, liver_median: float) -> dict[str, float]:
    lung = np.isin(labels, (28, 29, 30, 31, 32))
    return {"liver": dice(liver_from_hu(image, labels, liver_median), labels == 1),
            "lung": dice(lung_from_hu(image, labels), lung)}


def organ_medians(image: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    from maisi_cli.engine.qc import ORGAN_LABELS

    out = {}
    for organ in ORGANS:
        inside = np.isin(labels, ORGAN_LABELS[organ])
        out[organ] = float(np.median(image[inside])) if inside.any() else None
    return out


def main() -> None:
    import nibabel as nib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--phantoms", type=int, default=20, help="training phantoms used for the Dice ceiling")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="maisi-demo-quality-"))
    statistics = json.loads((REPO / "maisi_cli/resources/demo/datasets/image_median_statistics.json").read_text())
    liver_median = statistics["liver"]["median"]

    start = time.perf_counter()
    run = json.loads(maisi("--json", "generate", "--model", "demo", "-n", args.samples, "--seed", args.seed,
                           "--no-qc", "--out", work / "generated").stdout)
    generate_seconds = time.perf_counter() - start

    samples = []
    for k in range(args.samples):
        image_path = work / "generated" / f"sample_{k:04d}_image.nii.gz"
        label_path = work / "generated" / f"sample_{k:04d}_label.nii.gz"
        qc = maisi("--json", "qc", image_path, label_path, "--model", "demo", check=False)
        if qc.returncode not in (0, 3):
            raise SystemExit(f"maisi qc failed: {qc.stderr.strip()}")
        image = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(label_path)).dataobj)
        samples.append({"sample": k, "qc_passed": qc.returncode == 0,
                        "qc_failures": [o["organ"] for o in json.loads(qc.stdout)["organs"] if o["verdict"] == "fail"],
                        "median_hu": organ_medians(image, labels), "dice": organ_dice(image, labels, liver_median)})

    # The ceiling: the same HU segmentation on the phantoms' own CTs (phantoms re-made with the recipe's seed).
    phantoms = work / "phantoms"
    maisi("--quiet", "data", "phantoms", "--num", args.phantoms, "--size", 64, "--seed", 0, "--out", phantoms)
    ceiling = []
    for k in range(args.phantoms):
        image = np.asarray(nib.load(str(phantoms / f"phantom_{k:04d}_image.nii.gz")).dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(phantoms / f"phantom_{k:04d}_label.nii.gz")).dataobj)
        ceiling.append(organ_dice(image, labels, liver_median))

    hu = {}
    for organ in ORGANS:
        values = [s["median_hu"][organ] for s in samples if s["median_hu"][organ] is not None]
        generated = float(np.median(values))
        reference = statistics[organ]["median"]
        hu[organ] = {"generated_median_hu": round(generated, 1), "phantom_median_hu": round(reference, 1),
                     "difference_hu": round(generated - reference, 1),
                     "within_tolerance": abs(generated - reference) <= HU_TOLERANCE,
                     "samples_within_tolerance": sum(abs(v - reference) <= HU_TOLERANCE for v in values),
                     "samples": len(values)}
    dice_summary = {}
    for organ in ("liver", "lung"):
        values = [s["dice"][organ] for s in samples]
        dice_summary[organ] = {"median": round(float(np.median(values)), 3), "mean": round(float(np.mean(values)), 3),
                               "min": round(float(np.min(values)), 3),
                               "phantom_median": round(float(np.median([c[organ] for c in ceiling])), 3)}
    qc_rate = sum(s["qc_passed"] for s in samples) / len(samples)
    report = {
        "samples": args.samples, "seed": args.seed, "size": run.get("size"),
        "generate_seconds": round(generate_seconds, 1),
        "qc_pass_rate": qc_rate, "qc_target": 0.9,
        "median_hu": hu, "hu_tolerance": HU_TOLERANCE,
        "dice": dice_summary, "dice_target": 0.7,
        "targets_met": {"qc": qc_rate >= 0.9, "hu": all(v["within_tolerance"] for v in hu.values()),
                        "dice": all(dice_summary[o]["median"] >= 0.7 for o in dice_summary)},
        "per_sample": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"QC pass {qc_rate:.0%} | " + " | ".join(
        f"{o} {v['generated_median_hu']:+.0f} vs {v['phantom_median_hu']:+.0f} HU" for o, v in hu.items())
        + " | Dice " + ", ".join(f"{o} {v['median']:.2f} (phantom {v['phantom_median']:.2f})"
                                 for o, v in dice_summary.items()))
    print(json.dumps(report["targets_met"]))


if __name__ == "__main__":
    main()
