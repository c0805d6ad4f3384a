"""Issue 9, part 2: which CPU settings speed up a denoise step and the decode of the full-size rflow-ct networks at a
64³ image (latent 16³; `--size 96`: latent 24³) — measured, not assumed.

One ControlNet + UNet step (inference mode unless the variant says otherwise, batch 1, fp32, 2 threads) and one
whole VAE decode, per variant, each in a fresh process (imports, weights and allocator state do not carry over):

    baseline        torch.inference_mode, fp32, 2 threads (what `maisi generate` runs on a CPU)
    no_grad         torch.no_grad instead of inference_mode
    channels_last   networks and inputs in torch.channels_last_3d
    bf16            torch.autocast("cpu", bfloat16)
    threads_1       torch.set_num_threads(1)
    compile         torch.compile(unet), torch.compile(controlnet) (inductor; compile time reported apart)
    decode_tiles    the decode by sliding window, 8³ latent tiles, overlap 0.25, instead of whole

Random weights (speed does not depend on their values). Rounds interleave the variants to share the machine's
noise; the median step time per variant is reported with its ratio to the baseline.

    python bench/cpu_options.py [--rounds 2] [--steps 5] [--size 64] [--variants a,b]
        → bench/results/cpu_options.json (64³) or cpu_options_{size}.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
VARIANTS = ("baseline", "no_grad", "channels_last", "bf16", "threads_1", "compile", "decode_tiles")


def measure(variant: str, steps: int, size: int = 64) -> dict:
    """Runs in the child process: seconds per step (median of `steps` after 2 warm-up steps) and per decode."""
    import contextlib

    import torch

    sys.path.insert(0, str(ROOT))
    from maisi_cli.engine.networks import build_network
    from maisi_cli.models import get_model
    from tests.helpers import fill_random

    torch.set_num_threads(1 if variant == "threads_1" else 2)
    spec = get_model("rflow-ct")
    unet, controlnet, vae = (build_network(spec, c).eval() for c in ("diffusion_unet", "controlnet", "autoencoder"))
    for seed, network in enumerate((unet, controlnet, vae)):
        fill_random(network, seed, scale=0.02)
    from maisi_cli.engine.networks import set_tp_splits

    set_tp_splits(vae, 1)
    latent = size // 4
    x = torch.randn(1, 4, latent, latent, latent)
    cond = torch.randint(0, 2, (1, 8, size, size, size)).float()
    spacing, modality = torch.tensor([[150.0, 150.0, 150.0]]), torch.tensor([1])
    if variant == "channels_last":
        unet, controlnet, vae = (n.to(memory_format=torch.channels_last_3d) for n in (unet, controlnet, vae))
        x, cond = x.to(memory_format=torch.channels_last_3d), cond.to(memory_format=torch.channels_last_3d)
    compile_s = None
    if variant == "compile":
        start = time.perf_counter()
        unet, controlnet = torch.compile(unet), torch.compile(controlnet)
    grad_mode = torch.no_grad if variant == "no_grad" else torch.inference_mode
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext())

    def step(t: float) -> None:
        tt = torch.tensor([t])
        down, mid = controlnet(x=x, timesteps=tt, controlnet_cond=cond, class_labels=modality)
        unet(x=x, timesteps=tt, spacing_tensor=spacing, class_labels=modality,
             down_block_additional_residuals=down, mid_block_additional_residual=mid)

    times = []
    with grad_mode(), autocast:
        for k in range(steps + 2):
            start_step = time.perf_counter()
            step(900.0 - 30 * k)
            times.append(time.perf_counter() - start_step)
            if variant == "compile" and k == 0:
                compile_s = time.perf_counter() - start
        start = time.perf_counter()
        if variant == "decode_tiles":
            from monai.inferers import SlidingWindowInferer

            SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1, overlap=0.25, mode="gaussian")(
                x, vae.decode_stage_2_outputs)
        else:
            vae.decode_stage_2_outputs(x)
        decode_s = time.perf_counter() - start
    return {"step_s": statistics.median(times[2:]), "decode_s": decode_s, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--size", type=int, default=64, help="image size (a multiple of 4)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, baseline always runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.size)))
        return
    out = args.out or RESULTS / ("cpu_options.json" if args.size == 64 else f"cpu_options_{args.size}.json")
    chosen = ["baseline", *(v for v in args.variants.split(",") if v in VARIANTS and v != "baseline")]
    runs: dict[str, list[dict]] = {v: [] for v in chosen}
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for round_ in range(args.rounds):
        for variant in chosen:
            try:
                done = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                                       "--size", str(args.size)], capture_output=True, text=True, timeout=600, env=env)
            except subprocess.TimeoutExpired:
                runs[variant].append({"error": "timed out after 600 s"})
                continue
            if done.returncode != 0:
                runs[variant].append({"error": done.stderr.strip().splitlines()[-1][:300]})
            else:
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(round_, variant, runs[variant][-1], flush=True)
    summary = {}
    for variant, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            summary[variant] = {"error": results[-1]["error"]}
            continue
        summary[variant] = {"step_s": round(statistics.median(r["step_s"] for r in ok), 3),
                            "decode_s": round(statistics.median(r["decode_s"] for r in ok), 3)}
        if ok[0].get("compile_s") is not None:
            summary[variant]["compile_s"] = round(statistics.median(r["compile_s"] for r in ok), 1)
    base = summary["baseline"]
    for variant, row in summary.items():
        if "step_s" in row:
            row["step_vs_baseline"] = round(row["step_s"] / base["step_s"], 3)
            row["decode_vs_baseline"] = round(row["decode_s"] / base["decode_s"], 3)
    report = {"what": f"full-size rflow-ct ControlNet+UNet step and whole VAE decode, {args.size}³ image, CPU",
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": __import__("torch").__version__, "rounds": args.rounds, "steps": args.steps,
              "summary": summary, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for variant, row in summary.items():
        print(variant, row)


if __name__ == "__main__":
    main()
