"""Seconds per training step on the CPU of `maisi train vae|diffusion|controlnet` at the tiny test configuration.

Tiny spec (tests/helpers.py), 10 phantoms at 64³ from `maisi data phantoms` (8 train the VAE, 2 validate), VAE with
16³ patches, perceptual weight 0, a 2-layer discriminator, batch 1; diffusion and ControlNet on the 10 latents (16³)
of `maisi data embed`, batch 1. A step is the time between two consecutive step events of the engine (data loading
included); the first 2 steps are the warm-up and are dropped; the median of the rest is reported.

Run: `python bench/train_cpu.py [--out bench/results/train_cpu.json]`.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_times(run) -> list[float]:
    stamps: list[float] = []

    def on_event(event) -> None:  # a ProgressEvent
        if event.stage == "train":
            stamps.append(time.perf_counter())

    run(on_event)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_cpu.json")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import torch
    from typer.testing import CliRunner

    from maisi_cli.cli.app import app
    from maisi_cli.engine.train.controlnet import ControlNetTrainConfig, train_controlnet
    from maisi_cli.engine.train.diffusion import DiffusionTrainConfig, train_diffusion
    from maisi_cli.engine.train.vae import VaeTrainConfig, train_vae
    from tests.helpers import tiny_spec_document

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        spec = root / "tiny-rflow.json"
        spec.write_text(json.dumps(tiny_spec_document("rflow")))
        assert CliRunner().invoke(app, ["--quiet", "data", "phantoms", "--out", str(root / "ph"), "--num", "10",
                                        "--size", "64"]).exit_code == 0
        datalist = root / "ph" / "datalist.json"
        vae = VaeTrainConfig(data=datalist, out=root / "vae", model=str(spec), device="cpu", patch_size=16,
                             perceptual_weight=0.0, discriminator_layers=2, random_aug=False, warmup=False, lr=1e-3)
        times = {"vae": step_times(lambda cb: train_vae(vae, cb))}
        models = root / "weights" / "models"
        models.mkdir(parents=True)
        (models / "autoencoder_v1.pt").write_bytes((root / "vae" / "autoencoder.pt").read_bytes())
        assert CliRunner().invoke(app, ["--quiet", "data", "embed", str(datalist), "--out", str(root / "emb"),
                                        "--model", str(spec), "--weights-dir", str(root / "weights"), "--device",
                                        "cpu"]).exit_code == 0
        embeddings = root / "emb" / "embeddings.json"
        diffusion = DiffusionTrainConfig(data=embeddings, out=root / "diff", model=str(spec), device="cpu")
        times["diffusion"] = step_times(lambda cb: train_diffusion(diffusion, cb))
        (models / "diff_unet_3d_rflow-ct.pt").write_bytes((root / "diff" / "diff_unet.pt").read_bytes())
        controlnet = ControlNetTrainConfig(data=embeddings, out=root / "cn", model=str(spec), device="cpu",
                                           weights_dir=root / "weights")
        times["controlnet"] = step_times(lambda cb: train_controlnet(controlnet, cb))
    for name, values in times.items():
        kept = values[args.warmup - 1:]  # intervals after the first `warmup` steps
        results[name] = {"seconds_per_step_median": round(statistics.median(kept), 4),
                         "seconds_per_step_min": round(min(kept), 4), "seconds_per_step_max": round(max(kept), 4),
                         "steps_measured": len(kept)}
    document = {"what": "seconds per optimiser step, tiny spec, CPU fp32, batch 1 (VAE: 16³ patches, 2-layer "
                        "discriminator, no perceptual loss; diffusion/ControlNet: 16³ latents of 64³ phantoms)",
                "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "machine": platform.machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
