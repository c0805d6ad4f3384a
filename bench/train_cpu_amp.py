"""Seconds per training step on the CPU, fp32 against `--amp` (bf16 autocast on the CPU), for the demo model's
networks at the demo recipe's sizes: the VAE on whole 64³ phantoms (mean latent, no discriminator or perceptual
loss), the diffusion UNet and the ControlNet on the recipe's 16³×8 latents. Batch 1, 2 threads.

Needs a finished demo recipe work folder (`bench/demo/recipe.py --work DIR`): its phantoms, latents and weights.
A step is the time between two consecutive step events (data loading included); the first 2 are dropped and the
median of the next ones is reported. fp32 and bf16 alternate per network.

    python bench/train_cpu_amp.py [--work /tmp/maisi-demo-recipe] [--steps 10]  → bench/results/train_cpu_amp.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Enough(Exception):
    """Stops a run after the steps it was asked for."""


def step_seconds(run, steps: int) -> float:
    stamps: list[float] = []

    def on_event(event) -> None:  # a ProgressEvent
        if event.stage == "train":
            stamps.append(time.perf_counter())
            if len(stamps) > steps + 2:
                raise Enough

    try:
        run(on_event)
    except Enough:
        pass
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][2:]
    return statistics.median(gaps)


def training_run(network: str, amp: bool, work: Path, out: Path):
    """One epoch of the demo recipe's `network` training ("vae", "diffusion" or "controlnet") on a finished recipe
    work folder, as `run(on_event)`; the VAE as the recipe configures it (whole 64³ volumes, mean latent, L2, cosine
    LR, no discriminator or perceptual loss). Imports torch: set OpenMP variables before calling it."""
    spec = str(ROOT / "maisi_cli" / "resources" / "models" / "demo.json")
    latents = work / "latents" / "embeddings.json"
    if network == "vae":
        from maisi_cli.engine.train.vae import VaeTrainConfig, train_vae

        config = VaeTrainConfig(
            data=work / "phantoms" / "datalist.json", out=out, model=spec, device="cpu", epochs=1, lr=3e-4,
            patch_size=64, perceptual_weight=0.0, adversarial_weight=0.0, kl_weight=0.0, latent_sampling=False,
            warmup=False, random_aug=False, recon_loss="l2", lr_decay="cosine", val_fold=None, amp=amp)
        return lambda on: train_vae(config, on)
    if network == "diffusion":
        from maisi_cli.engine.train.diffusion import DiffusionTrainConfig, train_diffusion

        config = DiffusionTrainConfig(data=latents, out=out, model=spec, device="cpu", epochs=1, lr=5e-4, amp=amp)
        return lambda on: train_diffusion(config, on)
    from maisi_cli.engine.train.controlnet import ControlNetTrainConfig, train_controlnet

    config = ControlNetTrainConfig(data=latents, out=out, model=spec, device="cpu", epochs=1, lr=2e-4,
                                   weights_dir=work / "weights", amp=amp)
    return lambda on: train_controlnet(config, on)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/maisi-demo-recipe"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_cpu_amp.json")
    args = parser.parse_args()
    # `maisi train` leaves libgomp's wait policy at its default (cli/app.py default_wait_policy); so does this bench
    # since session 6 (its first figures ran under PASSIVE, which slowed the small UNet steps 2×).

    import torch

    from maisi_cli.engine.runtime import cpu_computes_bf16

    torch.set_num_threads(2)
    work, scratch = args.work, Path(tempfile.mkdtemp(prefix="maisi-amp-"))
    results = {}
    for name in ("vae", "diffusion", "controlnet"):
        row = {}
        for precision, amp in (("fp32", False), ("bf16", True)):
            run = training_run(name, amp, work, scratch / f"{name}-{precision}")
            row[f"{precision}_step_s"] = round(step_seconds(run, args.steps), 3)
        row["bf16_vs_fp32"] = round(row["bf16_step_s"] / row["fp32_step_s"], 3)
        results[name] = row
        print(name, row, flush=True)
    report = {"what": "seconds per training step, demo networks, batch 1, CPU, fp32 vs --amp (bf16 autocast)",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "cpu_native_bf16": cpu_computes_bf16(), "steps": args.steps,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
