"""Seconds per denoising step of tumour-presence guidance against none, with the full-size rflow-ct ControlNet and
UNet (random weights: speed does not depend on their values) at a 64³ image (16³ latents), fp32, on the CPU.

Guided steps run both networks on a batch of 2 ([mask, mask without its tumours], modality [1, 0]), so expect about
2× (issue 24). The two kinds of step alternate, `--repeats` rounds of `--steps` steps each; medians per step.

Usage: python bench/guidance_cpu.py [--size 64] [--steps 5] [--repeats 3]  → bench/results/guidance_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maisi_cli.engine.masks.tumours import remove_tumours  # noqa: E402
from maisi_cli.engine.networks import build_network  # noqa: E402
from maisi_cli.engine.sampling import Denoiser, label_bit_planes, modality_condition, spacing_condition  # noqa: E402
from maisi_cli.models import get_model  # noqa: E402
from tests.helpers import fill_random, phantom_labels  # noqa: E402


def seconds_per_step(denoiser: Denoiser, latents: torch.Tensor, steps: int) -> float:
    with torch.inference_mode(), denoiser.ready():
        start = time.perf_counter()
        for step in range(steps):
            denoiser(latents, torch.tensor([1000.0 - 30.0 * step]))
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "guidance_cpu.json")
    options = parser.parse_args()
    spec = get_model("rflow-ct")
    unet, controlnet = build_network(spec, "diffusion_unet"), build_network(spec, "controlnet")
    fill_random(unet, 1)
    fill_random(controlnet, 2)
    size = (options.size,) * 3
    labels = phantom_labels(size)
    labels[size[0] // 4:size[0] // 4 + 4, size[1] // 2:size[1] // 2 + 4, size[2] // 4:size[2] // 4 + 4] = 26
    cond = label_bit_planes(torch.from_numpy(labels)[None, None])
    uncond = label_bit_planes(torch.from_numpy(remove_tumours(labels))[None, None])
    spacing, modality = spacing_condition((1.5, 1.5, 1.5)), modality_condition(1)
    latents = torch.randn((1, *spec.latent_shape(size)), generator=torch.Generator().manual_seed(0))

    def denoiser(guided: bool) -> Denoiser:
        return Denoiser(unet, controlnet, cond, {"spacing_tensor": spacing, "class_labels": modality},
                        {"class_labels": modality}, guidance_scale=2.0 if guided else None,
                        controlnet_uncond=uncond if guided else None)

    seconds_per_step(denoiser(False), latents, 1)  # warm-up
    runs: dict[str, list[float]] = {"off": [], "guided": []}
    for _ in range(options.repeats):
        for kind in ("off", "guided"):
            runs[kind].append(seconds_per_step(denoiser(kind == "guided"), latents, options.steps))
            print(kind, round(runs[kind][-1], 3), flush=True)
    off, guided = statistics.median(runs["off"]), statistics.median(runs["guided"])
    document = {
        "what": "seconds per denoising step (ControlNet + UNet), full-size rflow-ct networks, random weights, fp32",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "image": list(size), "latent": list(spec.latent_shape(size)), "steps_per_run": options.steps,
        "runs_s_per_step": {k: [round(v, 3) for v in values] for k, values in runs.items()},
        "off_s_per_step": round(off, 3), "guided_s_per_step": round(guided, 3), "ratio": round(guided / off, 2),
        "numpy": np.__version__,
    }
    options.out.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
