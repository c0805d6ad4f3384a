"""Why the demo's bone and kidney miss their HU targets: what the shipped VAE reconstructs per structure, and what
partial-volume phantoms would change (bench/demo/README.md, "Session 4 pilot").

    python bench/demo/bone_ceiling.py [--phantoms 40] [--out bench/demo/results/bone_ceiling.json]

1. Phantoms 0 and 5 of the recipe's seed, encoded to their latent means and decoded by the packaged demo VAE: median
   HU of ribs, vertebrae, the vertebrae's interior (one-voxel erosion), kidney and liver, reconstructed vs true; the
   liver's spread and the share of its voxels inside quality.py's Dice window; the mean absolute error.
2. Point-sampled phantoms (as `maisi data phantoms` makes them) vs partial-volume ones: the same phantom seed made on
   a 3× finer grid (the seed fixes the anatomy whatever the grid) and averaged over 3³ blocks, labels taken at the
   block centres (= the coarse voxel centres). Per kind: the bone median over the phantoms, the QC floor
   (mean − 6σ of the per-phantom bone medians) and the bone median after a 2× blur (2³ average-pool, trilinear back).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi_cli.engine.phantoms import LEFT_RIBS, RIGHT_RIBS, VERTEBRAE, default_spacing, make_phantom
from maisi_cli.engine.qc import ORGAN_LABELS
from maisi_cli.engine.seeds import derive_sample_seed
from quality import LIVER_HALF_WINDOW  # bench/demo/quality.py: the window its liver Dice segments by

SIZE, RECIPE_SEED = 64, 0
STATISTICS = Path(__file__).resolve().parents[2] / "maisi_cli/resources/demo/datasets/image_median_statistics.json"
STRUCTURES = {"ribs": (*LEFT_RIBS, *RIGHT_RIBS), "vertebrae": VERTEBRAE, "kidney": ORGAN_LABELS["kidney"],
              "liver": ORGAN_LABELS["liver"]}


def phantom(index: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(image HU float32, labels) of recipe phantom `index` at 64³ / 6 mm, averaged over supersample³ blocks."""
    fine = SIZE * supersample
    made = make_phantom((fine,) * 3, default_spacing((fine,) * 3), derive_sample_seed(RECIPE_SEED, index))
    image = made.image.astype(np.float32)
    if supersample == 1:
        return image, made.labels
    k, centre = supersample, supersample // 2
    image = image.reshape(SIZE, k, SIZE, k, SIZE, k).mean(axis=(1, 3, 5))
    return image, made.labels[centre::k, centre::k, centre::k]


def blur2(image: np.ndarray) -> np.ndarray:
    pooled = image.reshape(SIZE // 2, 2, SIZE // 2, 2, SIZE // 2, 2).mean(axis=(1, 3, 5))
    return ndimage.zoom(pooled, 2, order=1)


def vae_reconstruction(indices: tuple[int, ...]) -> list[dict]:
    import torch

    from maisi_cli.engine.networks import build_network
    from maisi_cli.engine.weights import load_into, locate_weight
    from maisi_cli.models import get_model

    spec = get_model("demo")
    vae = build_network(spec, "autoencoder").eval()
    load_into(vae, locate_weight(spec, "autoencoder", None), spec)
    liver_centre = json.loads(STATISTICS.read_text())["liver"]["median"]
    rows = []
    for index in indices:
        image, labels = phantom(index)
        with torch.no_grad():
            z_mu, _ = vae.encode(torch.from_numpy((image + 1000) / 2000)[None, None])
            decoded = vae.decode(z_mu)[0, 0].numpy() * 2000 - 1000
        row = {"phantom": index}
        vertebrae = np.isin(labels, VERTEBRAE)
        masks = {name: np.isin(labels, ids) for name, ids in STRUCTURES.items()}
        masks["vertebrae_interior"] = ndimage.binary_erosion(vertebrae)
        for name, mask in masks.items():
            row[name] = {"voxels": int(mask.sum()), "true": round(float(np.median(image[mask]))),
                         "reconstructed": round(float(np.median(decoded[mask])))}
        # What quality.py's liver Dice sees: the spread inside the liver and the share in its ±45 HU window.
        liver = masks["liver"]
        for key, volume in (("true", image), ("reconstructed", decoded)):
            values = volume[liver]
            row["liver"][f"{key}_std"] = round(float(values.std()), 1)
            in_window = np.abs(values - liver_centre) <= LIVER_HALF_WINDOW
            row["liver"][f"{key}_in_window"] = round(float(in_window.mean()), 3)
        row["mean_abs_error"] = round(float(np.abs(decoded - image).mean()), 1)
        rows.append(row)
    return rows


def bone_statistics(count: int, supersample: int) -> dict:
    medians, blurred = [], []
    for index in range(count):
        image, labels = phantom(index, supersample)
        bone = np.isin(labels, ORGAN_LABELS["bone"])
        medians.append(float(np.median(image[bone])))
        if index < 8:
            blurred.append(float(np.median(blur2(image)[bone])))
    v = np.asarray(medians)
    return {"phantoms": count, "bone_median": round(float(np.median(v)), 1),
            "qc_floor_mean_minus_6_sigma": round(float(v.mean() - 6 * v.std()), 1),
            "bone_median_after_2x_blur_first_8": round(float(np.median(blurred)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bone_ceiling.json")
    args = parser.parse_args()
    report = {"vae_reconstruction": vae_reconstruction((0, 5)),
              "point_sampled": bone_statistics(args.phantoms, 1),
              "partial_volume_3x": bone_statistics(args.phantoms, 3)}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "vae_reconstruction"}))
    for row in report["vae_reconstruction"]:
        print(row["phantom"], {k: (v["reconstructed"], v["true"]) if isinstance(v, dict) else v
                               for k, v in row.items() if k != "phantom"})
        print("  liver", {k: v for k, v in row["liver"].items() if k.endswith(("std", "window"))})


if __name__ == "__main__":
    main()
