"""The recipe of the `demo` model shipped in the package: phantoms → VAE → latents → diffusion UNet → ControlNet,
every step through maisi's own commands (`maisi data …`, `maisi train …`), then the packaged files.

    python bench/demo/recipe.py [--work DIR] [--install]

Deterministic: every command gets a fixed seed, the threads are fixed (OMP_NUM_THREADS=2, the CI machines' cores)
and the data loaders run in the main process. Budget: under 60 minutes on 2 CPU cores. Writes
`bench/demo/results/recipe.log` (every command, its output and its wall time) and `recipe.json` (per stage: seconds,
final losses; per packaged file: bytes and sha256). With `--install` the trained files are copied into
`maisi_cli/resources/demo/` (the `demo` model's bundled folder, see resources/models/demo.json):

    models/autoencoder.pt, models/diff_unet.pt, models/controlnet.pt   (released layouts)
    datasets/candidate_masks.json + datasets/masks/*.nii.gz           (phantom label maps, seeds unseen in training)
    datasets/image_median_statistics.json                              (organ HU medians of the training phantoms)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "maisi_cli" / "resources" / "models" / "demo.json"
BUNDLE = REPO / "maisi_cli" / "resources" / "demo"
RESULTS = Path(__file__).resolve().parent / "results"

SIZE = 64  # phantoms at 64³, 6 mm: the phantom's whole 384 mm field of view
TRAIN_PHANTOMS = 200  # fold = index mod 5: the VAE validates on fold 0 and trains on the other 160
DATABASE_PHANTOMS = 40
DATABASE_SEED = 7  # the candidate masks come from phantoms the networks never saw

# The VAE trains on whole 64³ volumes: its GroupNorm statistics are taken over the whole input, so a VAE trained on
# patches and then run on whole volumes (as embed and generate do) sees other statistics — patch-trained runs at
# 16³/32³ reconstructed the liver 300 HU off, whole-volume training 5 HU off after the same time (recipe notes in
# bench/demo/README.md). lr 3e-4: 1e-3 oscillated. KL 0: at this latent size the reference's 1e-7 already weighs as
# much as the L1 term and holds the latent mean down, so sampling noise dominates the decoder's input.
# --no-latent-sampling: the decoder learns from the latent mean (and embed stores the mean): a sampled 16³×4 latent
# carried so much noise that the VAE plateaued with soft tissue near 20 HU. recon_loss l2 + lr_decay cosine: with L1
# and a constant LR the organ HU of the last weights swung by ±40 HU from epoch to epoch (batch-1 snapshots); L2
# spends the first epochs on the voxels far off (bone, organ contrast). The spec's 8 latent channels (MAISI: 4) give
# the decoder room for detail finer than a 24 mm latent voxel (pilots in bench/demo/README.md).
VAE_SETTINGS = ["--amp", "--patch-size", "64", "--perceptual-weight", "0", "--adversarial-weight", "0",
                "--kl-weight", "0", "--val-every", "5", "--no-latent-sampling"]  # both VAE stages
VAE = ["--epochs", "12", "--lr", "3e-4", *VAE_SETTINGS]
VAE_SCHEDULE = 'warmup = false\nrandom_aug = false\n'  # short runs: no 10-epoch LR warm-up, phantoms vary enough
VAE_CONFIG = VAE_SCHEDULE + 'recon_loss = "l2"\nlr_decay = "cosine"\n'
# --amp: bf16 autocast on the CPU. Per step it costs the VAE 0.46x of fp32 (the trainer fuses MONAI's per-group
# GroupNorm loop), the UNet 0.32x and the ControlNet 0.28x (bench/train_cpu_amp.py, session 6). The epochs spend
# what that saves: a longer ControlNet lifted QC from 0 % to 80 % in the session-4 pilot, and 10 epochs more on
# session 5's 14 lifted kidney 97 → 110 HU and the liver Dice 0.67 → 0.70, where more VAE epochs or another VAE
# loss did not (bench/demo/README.md, "Session 6").
# Then 8 epochs of L1 with bone weighted 10× (`bright_weight`: target ≥ 300 HU), from the L2 VAE. L2 alone decodes
# 1–2-voxel ribs at soft-tissue HU (ribs 121 HU against 402); the weight lifts them, and L1, median-seeking, keeps
# the soft tissue smoother than L2 under the same weight (session-8 pilots, bench/demo/README.md).
VAE_FINE_TUNE_CONFIG = VAE_SCHEDULE + 'recon_loss = "l1"\nlr_decay = "cosine"\nbright_weight = 10\n'
VAE_FINE_TUNE = ["--epochs", "8", "--lr", "1.5e-4", *VAE_SETTINGS]
DIFFUSION = ["--epochs", "20", "--lr", "5e-4", "--amp"]
CONTROLNET_SETTINGS = ["--lr", "2e-4", "--amp"]  # both ControlNet stages
CONTROLNET = ["--epochs", "28", *CONTROLNET_SETTINGS]
# Then 6 epochs more from those weights under a fresh LR schedule (a warm restart): with the L1 bone VAE the liver
# Dice came out at 0.696 after 28 epochs and 0.715 after the 6 more (0.705 → 0.712 on another seed; session 10,
# bench/demo/README.md). 6 and not 10: each epoch costs ~33 s and the recipe must stay under 60 minutes.
CONTROLNET_MORE = ["--epochs", "6", *CONTROLNET_SETTINGS]


class Recipe:
    def __init__(self, work: Path, results: Path):
        self.work = work
        self.log = (results / "recipe.log").open("w")
        self.stages: dict[str, dict] = {}

    def maisi(self, stage: str, *args: object) -> dict:
        """Run `python -m maisi_cli --json ARGS`, log it, return its JSON summary."""
        command = [sys.executable, "-m", "maisi_cli", "--json", *map(str, args)]
        self.log.write(f"$ maisi {' '.join(map(str, args))}\n")
        self.log.flush()
        start = time.perf_counter()
        cpu_before = children_cpu_seconds()
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
        seconds = time.perf_counter() - start
        cpu = children_cpu_seconds() - cpu_before
        self.log.write(result.stderr)
        self.log.write(result.stdout)
        self.log.write(f"# {stage}: exit {result.returncode}, {seconds:.1f} s wall, {cpu:.1f} s CPU\n\n")
        self.log.flush()
        if result.returncode != 0:
            raise SystemExit(f"{stage} failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
        summary = json.loads(result.stdout) if result.stdout.strip() else {}
        self.stages[stage] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "summary": summary}
        return summary


def children_cpu_seconds() -> float:
    """CPU time (user + system) of the finished child processes: the wall time a stage would take on 2 idle cores
    is about half of it, whatever else ran beside it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def organ_median_statistics(phantoms: Path, count: int) -> dict:
    """Per QC organ: the distribution of the phantoms' organ median HU, in the packaged statistics' format."""
    import nibabel as nib

    from maisi_cli.engine.qc import ORGAN_LABELS

    medians: dict[str, list[float]] = {organ: [] for organ in ORGAN_LABELS}
    for k in range(count):
        image = np.asarray(nib.load(str(phantoms / f"phantom_{k:04d}_image.nii.gz")).dataobj)
        labels = np.asarray(nib.load(str(phantoms / f"phantom_{k:04d}_label.nii.gz")).dataobj)
        for organ, ids in ORGAN_LABELS.items():
            inside = np.isin(labels, ids)
            if inside.any():
                medians[organ].append(float(np.median(image[inside])))
    statistics = {}
    for organ, values in medians.items():
        if not values:
            continue
        v = np.asarray(values)
        mean, sigma = float(v.mean()), float(v.std())
        statistics[organ] = {
            "min_median": float(v.min()), "max_median": float(v.max()), "median": float(np.median(v)),
            "percentile_0_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)),
            "sigma_6_low": mean - 6 * sigma, "sigma_6_high": mean + 6 * sigma,
            "sigma_12_low": mean - 12 * sigma, "sigma_12_high": mean + 12 * sigma,
            "phantoms": len(values),
        }
    return statistics


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/maisi-demo-recipe"))
    parser.add_argument("--install", action="store_true", help="copy the results into maisi_cli/resources/demo/")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where recipe.log and recipe.json go")
    args = parser.parse_args()
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    recipe = Recipe(work, results)
    started = time.perf_counter()

    recipe.maisi("phantoms", "data", "phantoms", "--num", TRAIN_PHANTOMS, "--size", SIZE, "--seed", 0,
                 "--out", work / "phantoms")
    datalist = work / "phantoms" / "datalist.json"
    (work / "vae.toml").write_text(VAE_CONFIG)
    recipe.maisi("vae", "train", "vae", "--data", datalist, "--out", work / "vae", "--model", SPEC, "--device", "cpu",
                 "--seed", 0, "--config", work / "vae.toml", *VAE)

    (work / "vae-bone.toml").write_text(VAE_FINE_TUNE_CONFIG)
    recipe.maisi("vae-bone", "train", "vae", "--data", datalist, "--out", work / "vae-bone", "--model", SPEC,
                 "--device", "cpu", "--seed", 0, "--config", work / "vae-bone.toml", "--init",
                 work / "vae" / "autoencoder.pt", *VAE_FINE_TUNE)

    weights = work / "weights"
    (weights / "models").mkdir(parents=True)
    shutil.copy(work / "vae-bone" / "autoencoder.pt", weights / "models" / "autoencoder.pt")
    recipe.maisi("embed", "data", "embed", datalist, "--out", work / "latents", "--model", SPEC, "--weights-dir",
                 weights, "--device", "cpu", "--seed", 0, "--mean")
    embeddings = work / "latents" / "embeddings.json"
    recipe.maisi("diffusion", "train", "diffusion", "--data", embeddings, "--out", work / "diffusion", "--model",
                 SPEC, "--device", "cpu", "--seed", 0, *DIFFUSION)
    shutil.copy(work / "diffusion" / "diff_unet.pt", weights / "models" / "diff_unet.pt")
    recipe.maisi("controlnet", "train", "controlnet", "--data", embeddings, "--out", work / "controlnet", "--model",
                 SPEC, "--weights-dir", weights, "--device", "cpu", "--seed", 0, *CONTROLNET)
    recipe.maisi("controlnet-more", "train", "controlnet", "--data", embeddings, "--out", work / "controlnet-more",
                 "--model", SPEC, "--weights-dir", weights, "--device", "cpu", "--seed", 0, "--init",
                 work / "controlnet" / "controlnet.pt", *CONTROLNET_MORE)
    shutil.copy(work / "controlnet-more" / "controlnet.pt", weights / "models" / "controlnet.pt")

    # The candidate-mask database: label maps of phantoms from another seed, indexed by `maisi data masks index`.
    recipe.maisi("database-phantoms", "data", "phantoms", "--num", DATABASE_PHANTOMS, "--size", SIZE, "--seed",
                 DATABASE_SEED, "--out", work / "database-phantoms")
    masks = weights / "datasets" / "masks"
    masks.mkdir(parents=True)
    for k in range(DATABASE_PHANTOMS):
        shutil.copy(work / "database-phantoms" / f"phantom_{k:04d}_label.nii.gz", masks / f"mask_{k:04d}.nii.gz")
    recipe.maisi("mask-database", "data", "masks", "index", masks, "--out", weights / "datasets" / "candidate_masks.json")
    statistics = organ_median_statistics(work / "phantoms", TRAIN_PHANTOMS)
    (weights / "datasets" / "image_median_statistics.json").write_text(json.dumps(statistics, indent=1) + "\n")

    files = sorted(p for p in weights.rglob("*") if p.is_file())
    report = {
        "spec": str(SPEC.relative_to(REPO)),
        "total_seconds": round(time.perf_counter() - started, 1),
        "total_cpu_seconds": round(children_cpu_seconds(), 1),
        "load_average_at_end": os.getloadavg(),
        "threads": 2,
        "stages": recipe.stages,
        "files": {str(p.relative_to(weights)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
        "phantom_statistics": statistics,
    }
    (results / "recipe.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"recipe done in {report['total_seconds']:.0f} s; {report['total_bytes'] / 1e6:.1f} MB of files")
    if args.install:
        if BUNDLE.exists():
            shutil.rmtree(BUNDLE)
        shutil.copytree(weights, BUNDLE)
        print(f"installed into {BUNDLE}")


if __name__ == "__main__":
    main()
